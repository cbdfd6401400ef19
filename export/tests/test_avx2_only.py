"""scripts/avx2_only.sh, which the AVX2-only benchmark (scripts/bench.sh attention --avx2-only),
the AVX2 run of test_attention_sdpa and scripts/test_cpu_variants.sh's avx2 variant rely on:
under it PyTorch's own CPU detection sees an AVX2 CPU on this AVX-512 host, also in a process
that installs its own SIGSEGV handler (Python's faulthandler, as pytest does), and a genuine
segmentation fault still reaches that handler or kills the process (the CPUID handler must not
swallow it or loop). And scripts/intel_vendor.sh, which `--mkl-as-on-intel` relies on: MKL, which
chooses its kernels by CPU vendor, takes its Intel AVX-512 path under it, its AVX2 one with
AVX-512 hidden too, while ATen's detection sees the features as they are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from independent import AVX2_ONLY as WRAPPER, ROOT, avx512_hidden, skip_unless_avx512_can_be_hidden

INTEL_VENDOR = str(ROOT / "scripts" / "intel_vendor.sh")

CAPABILITY = "import torch; print(torch.backends.cpu.get_cpu_capability())"
SEGFAULT = "import ctypes; ctypes.string_at(0)"
# One MKL product; MKL_VERBOSE=1 makes MKL name the code path it chose on its first call.
MKL_PRODUCT = "import torch; print(torch.backends.cpu.get_cpu_capability()); a = torch.randn(64, 64); a @ a"


@pytest.fixture(autouse=True)
def avx512_with_cpuid_faulting():
    skip_unless_avx512_can_be_hidden()


def python(*prefix: str, code: str, faulthandler: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # Without what this run itself may be under (the avx2 test variant runs pytest through it).
    unset = ("ATEN_CPU_CAPABILITY", "PYTHONFAULTHANDLER", "LD_PRELOAD", "GLIBC_TUNABLES", "AVX2_ONLY_HIDE", "AVX2_ONLY_VENDOR")
    base = {k: v for k, v in os.environ.items() if k not in unset}
    flags = ["-X", "faulthandler"] if faulthandler else []
    return subprocess.run([*prefix, sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=120,
                          env=base | {"AVX2_ONLY_REPORT": "1"} | (env or {}))


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


@pytest.mark.parametrize(("prefix", "capability", "mkl_path"), [
    ((INTEL_VENDOR,), "AVX512", "Intel(R) Advanced Vector Extensions 512"),
    ((WRAPPER, INTEL_VENDOR), "AVX2", "Intel(R) Advanced Vector Extensions 2"),
], ids=["intel_vendor", "avx2_only+intel_vendor"])
def test_mkl_takes_its_intel_path_through_intel_vendor(prefix, capability, mkl_path):
    run = python(*prefix, code=MKL_PRODUCT, env={"MKL_VERBOSE": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == capability, run.stdout
    assert mkl_path in run.stdout, run.stdout
    replaced = [int(line.split()[-2]) for line in run.stderr.splitlines() if line.startswith("cpuid vendor: GenuineIntel")]
    assert replaced and max(replaced) > 0, run.stderr
