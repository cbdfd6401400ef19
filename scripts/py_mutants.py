#!/usr/bin/env python3
"""Opt-in mutation testing of the Python side (cargo-mutants cannot mutate it): a hand-written
list of plausible single bugs in the export's pointwise and attention lowering, the data
tools' media.py, the loss and the reference trainer. Each is planted in place (the file must
be committed), faces the tests that guard it, and is reverted; a mutant the tests pass is
missed. Slow (minutes each where a test exports graphs); not part of scripts/test.sh.

    scripts/py_mutants.py                 # every mutant
    scripts/py_mutants.py -f media.py     # the mutants of files whose path contains this
    scripts/py_mutants.py --list

Run from the repository with the pinned venv's python ($(scripts/setup_python.sh)/bin/python);
FLOWSTEP_BIN defaults to target/release/flowstep (tests that run the binary need it built).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "export/flowstep_export"

POINTWISE = ["tests/test_pointwise.py", "tests/test_edges.py::test_norms_where_eps_matters"]
ATTENTION = ["tests/test_long_sequences.py", "-k", "lowered_attention or attention_operator"]
MEDIA_PARSE = ["tests/test_edges.py", "-k", "frames or resolutions or source_size"]
PREPARE = ["tests/test_prepare.py"]
PREPARE_I2V = ["tests/test_prepare_i2v.py"]

# (file, exact text (must occur once), replacement, pytest arguments run in export/)
MUTANTS = [
    (f"{PKG}/model/pointwise.py", "centred * (rstd * rstd * rstd * mean_gc)", "centred * (rstd * rstd * mean_gc)", POINTWISE),
    (f"{PKG}/model/pointwise.py", "dweight = _sum_to(dy * (centred * rstd), weight)", "dweight = _sum_to(dy * centred, weight)", POINTWISE),
    (f"{PKG}/model/pointwise.py", "mean_gx = (g * x32).mean(dim=-1, keepdim=True)", "mean_gx = (g * x32).sum(dim=-1, keepdim=True)", POINTWISE),
    (f"{PKG}/model/pointwise.py", "torch.rsqrt((x32 * x32).mean(dim=-1, keepdim=True) + eps)", "torch.rsqrt((x32 * x32).mean(dim=-1, keepdim=True))", POINTWISE),
    (f"{PKG}/model/pointwise.py", "(c1x2 * 3.0 + GELU_C0)", "(c1x2 * 2.0 + GELU_C0)", POINTWISE),
    (f"{PKG}/model/pointwise.py", "GELU_C1 = 0.044715 * GELU_C0", "GELU_C1 = 0.04471 * GELU_C0", POINTWISE),
    (f"{PKG}/pipeline/lower_attention.py", 'b.op("Sub", [b.op("Add", [a, d]), b.const([1])])', 'b.op("Add", [a, d])', ATTENTION),
    (f"{PKG}/pipeline/lower_attention.py", 'dq = b.op("Mul", [geometry.join(dq_chunks), scale_c], "dq")', 'dq = geometry.join(dq_chunks)', ATTENTION),
    (f"{PKG}/pipeline/lower_attention.py", 'b.op("ReduceSum", [b.op("Mul", [b.cast(do_h', 'b.op("ReduceMean", [b.op("Mul", [b.cast(do_h', ATTENTION),
    (f"{PKG}/data/media.py", "n <= MAX_FRAMES or n % 4 != 1", "n <= MAX_FRAMES or n % 2 != 1", MEDIA_PARSE),
    (f"{PKG}/data/media.py", "not 1 <= n <= MAX_FRAMES", "not n <= MAX_FRAMES", MEDIA_PARSE),
    (f"{PKG}/data/media.py", "not 1 <= n <= MAX_FRAMES", "not 1 <= n < MAX_FRAMES", MEDIA_PARSE),
    (f"{PKG}/data/media.py", "0 < height <= MAX_SIDE", "0 < height < MAX_SIDE", MEDIA_PARSE),
    (f"{PKG}/data/media.py", "width * height > MAX_SOURCE_PIXELS", "width * height >= MAX_SOURCE_PIXELS", MEDIA_PARSE),
    (f"{PKG}/data/media.py", "covered > MAX_COVER * bucket", "covered >= MAX_COVER * bucket", MEDIA_PARSE),
    (f"{PKG}/data/media.py", "height % multiple or width % multiple", "height % multiple", MEDIA_PARSE),
    (f"{PKG}/data/media.py", "usable = [n for n in frame_buckets if n <= available]", "usable = [n for n in frame_buckets if n < available]", PREPARE),
    (f"{PKG}/data/media.py", "min(int(round(i / fps * raw_fps)), available - 1)", "min(int(i / fps * raw_fps), available - 1)",
     ["tests/test_edges.py", "-k", "resampling"]),
    (f"{PKG}/data/media.py", "scale = max(bucket.width / width, bucket.height / height)\n    image =",
     "scale = min(bucket.width / width, bucket.height / height)\n    image =", PREPARE),
    (f"{PKG}/data/image_conditioning.py", "    mask[:TEMPORAL] = 1", "    mask[:1] = 1", PREPARE_I2V),
    (f"{PKG}/model/wan_clip.py", "HEADS = 16", "HEADS = 8", PREPARE_I2V),
    (f"{PKG}/data/prepare.py", "            if item.image is not None and conditioning:", "            if False:", PREPARE_I2V),
    (f"{PKG}/data/prepare.py", 'output_name(rel), image))', 'output_name(rel)))', PREPARE_I2V),
    (f"{PKG}/data/prepare.py", "if recorded[key] != settings[key]]", 'if recorded[key] != settings[key] and key != "conditioning"]',
     PREPARE_I2V),
    (f"{PKG}/reference/reference_train.py", "if step >= args.warmup:", "if step > args.warmup:", ["tests/test_edges.py", "-k", "reference_trainer"]),
    (f"{PKG}/pipeline/steps.py", "return weight * torch.mean(", "return torch.clamp(weight, max=1.0) * torch.mean(",
     ["tests/test_loss_weight_and_drift.py", "-k", "graph_loss and fresh"]),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-f", "--file", default="", help="only mutants of files whose path contains this")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if args.file in m[0]]
    if args.list:
        for path, old, new, tests in chosen:
            print(f"{path}: {old!r} -> {new!r}  [{' '.join(tests)}]")
        return 0
    paths = sorted({m[0] for m in chosen})
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=ROOT).returncode != 0:
        print("py_mutants.py: commit or stash your changes to these files first (mutants are planted in place)", file=sys.stderr)
        return 1
    env = {**os.environ, "FLOWSTEP_BIN": os.environ.get("FLOWSTEP_BIN", str(ROOT / "target/release/flowstep"))}
    missed = 0
    for path, old, new, tests in chosen:
        file = ROOT / path
        text = file.read_text()
        if text.count(old) != 1:
            print(f"STALE   {path}: {old!r} occurs {text.count(old)} times (update the list)")
            missed += 1
            continue
        file.write_text(text.replace(old, new))
        start = time.monotonic()
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                               cwd=ROOT / "export", env=env, capture_output=True, text=True)
        finally:
            file.write_text(text)
        caught = r.returncode != 0
        missed += not caught
        by = next((line for line in r.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
        print(f"{'caught' if caught else 'MISSED'}  {path}: {old!r} -> {new!r} ({time.monotonic() - start:.0f} s) {by[:160]}", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} caught")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
