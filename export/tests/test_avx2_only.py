"""scripts/avx2_only.sh, which the AVX2-only benchmark (scripts/bench.sh attention --avx2-only)
and the AVX2 run of test_attention_sdpa rely on: under it, PyTorch's own CPU detection sees an
AVX2 CPU on this AVX-512 host, and a genuine segmentation fault still kills the process (the
CPUID handler must not swallow it or loop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from independent import ROOT, cpu_flags

WRAPPER = str(ROOT / "scripts" / "avx2_only.sh")
CAPABILITY = "import torch; print(torch.backends.cpu.get_cpu_capability())"


@pytest.fixture(autouse=True)
def avx512_with_cpuid_faulting():
    flags = cpu_flags()
    if "avx512f" not in flags or "cpuid_fault" not in flags:
        pytest.skip("needs an AVX-512 host with CPUID faulting")


def python(*prefix: str, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"} | {"AVX2_ONLY_REPORT": "1"}
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_pytorch_sees_avx2_only_through_the_wrapper():
    assert python(code=CAPABILITY).stdout.strip() == "AVX512"
    hidden = python(WRAPPER, code=CAPABILITY)
    assert hidden.returncode == 0, hidden.stderr
    assert hidden.stdout.strip() == "AVX2"
    report = [line for line in hidden.stderr.splitlines() if line.startswith("avx2_only:")]
    assert report and int(report[-1].split()[-4]) > 0, hidden.stderr


def test_a_real_segfault_still_kills_the_process():
    crashed = python(WRAPPER, code="import ctypes; ctypes.string_at(0)")
    assert crashed.returncode == -signal.SIGSEGV, (crashed.returncode, crashed.stderr)
