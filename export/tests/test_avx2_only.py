"""scripts/avx2_only.sh, which the AVX2-only benchmark (scripts/bench.sh attention --avx2-only),
the AVX2 run of test_attention_sdpa and scripts/test_cpu_variants.sh's avx2 variant rely on:
under it PyTorch's own CPU detection sees an AVX2 CPU on this AVX-512 host, also in a process
that installs its own SIGSEGV handler (Python's faulthandler, as pytest does), and a genuine
segmentation fault still reaches that handler or kills the process (the CPUID handler must not
swallow it or loop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from independent import AVX2_ONLY as WRAPPER, avx512_hidden, skip_unless_avx512_can_be_hidden

CAPABILITY = "import torch; print(torch.backends.cpu.get_cpu_capability())"
SEGFAULT = "import ctypes; ctypes.string_at(0)"


@pytest.fixture(autouse=True)
def avx512_with_cpuid_faulting():
    skip_unless_avx512_can_be_hidden()


def python(*prefix: str, code: str, faulthandler: bool = False) -> subprocess.CompletedProcess:
    # Without what this run itself may be under (the avx2 test variant runs pytest through it).
    unset = ("ATEN_CPU_CAPABILITY", "PYTHONFAULTHANDLER", "LD_PRELOAD", "GLIBC_TUNABLES")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    flags = ["-X", "faulthandler"] if faulthandler else []
    return subprocess.run([*prefix, sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=120,
                          env=env | {"AVX2_ONLY_REPORT": "1"})


@pytest.mark.parametrize("faulthandler", [False, True], ids=["plain", "faulthandler"])
def test_pytorch_sees_avx2_only_through_the_wrapper(faulthandler):
    assert python(code=CAPABILITY, faulthandler=faulthandler).stdout.strip() == "AVX512"
    hidden = python(WRAPPER, code=CAPABILITY, faulthandler=faulthandler)
    assert hidden.returncode == 0, hidden.stderr
    assert hidden.stdout.strip() == "AVX2"
    assert avx512_hidden(hidden.stderr) > 0, hidden.stderr


def test_a_real_segfault_still_kills_the_process():
    crashed = python(WRAPPER, code=SEGFAULT)
    assert crashed.returncode == -signal.SIGSEGV, (crashed.returncode, crashed.stderr)


def test_a_real_segfault_reaches_the_programs_own_handler():
    crashed = python(WRAPPER, code=SEGFAULT, faulthandler=True)
    assert "Fatal Python error: Segmentation fault" in crashed.stderr, crashed.stderr
    assert crashed.returncode == -signal.SIGSEGV, (crashed.returncode, crashed.stderr)
