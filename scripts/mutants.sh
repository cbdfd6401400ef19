#!/usr/bin/env bash
# Opt-in mutation testing (slow; not part of scripts/test.sh or CI) of the training-step and
# sampling code: src/scheduler.rs, sft.rs, optim.rs, sample.rs, data.rs, executor/state.rs,
# checkpoint.rs, lora_io/ (mod.rs, read.rs) and train/. Needs cargo-mutants (`cargo install
# cargo-mutants --locked`). Each mutant is built in place (release profile, reusing target/)
# and faces a fast subset: the library's unit tests, the integration tests that train and
# sample, the edge tests (tests/edges.rs: thresholds, nearest invalid values, data order, LoRA
# layouts), the pinned draws (tests/draws_golden.rs), plus the independent PyTorch reference
# loop (tests/reference_loop.rs, through FLOWSTEP_PYTHON). The Python side (pointwise and
# attention lowering, media.py, the loss) has its own planted list: scripts/py_mutants.py.
#
#   scripts/mutants.sh                    # every mutant (many hours on 2 cores)
#   scripts/mutants.sh --shard 0/12       # a slice; other cargo-mutants options pass through
#   scripts/mutants.sh -f src/sample.rs   # only this file's mutants (-f replaces the list)
#   scripts/mutants.sh --list             # just list them
#
# Results go to mutants.out/ (outcomes.json, caught.txt, missed.txt, timeout.txt, unviable.txt).
# Excluded: TrainingGraphs::state / pair / load return-value replacements (dozens of
# `Ok((vec![..], ..))` variants of one accessor that every training test catches).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
command -v cargo-mutants >/dev/null || { echo "mutants.sh: install cargo-mutants: cargo install cargo-mutants --locked" >&2; exit 1; }
scripts/setup_ort.sh >/dev/null
export FLOWSTEP_PYTHON="$(scripts/setup_python.sh)/bin/python"
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    echo "mutants.sh: commit or stash your changes first (mutants are applied in place)" >&2
    exit 1
fi
files=(-f src/scheduler.rs -f src/sft.rs -f src/optim.rs -f src/sample.rs -f src/data.rs -f src/executor/state.rs -f src/checkpoint.rs
       -f src/lora_io/mod.rs -f src/lora_io/read.rs -f 'src/train/*.rs')
# A -f of the caller's replaces the list (cargo-mutants would otherwise take the union).
for arg in "$@"; do
    if [[ "$arg" == -f || "$arg" == --file || "$arg" == --file=* ]]; then files=(); fi
done
exec cargo mutants --in-place --no-shuffle "${files[@]}" \
    --exclude-re 'TrainingGraphs::state -> |replace pair -> |TrainingGraphs::load -> ' \
    --cargo-arg=--release --timeout "${MUTANTS_TIMEOUT:-240}" --build-timeout 600 "$@" \
    -- --lib --test train --test faults --test scheduler_golden --test golden_graphs --test reference_loop \
    --test edges --test draws_golden --test sample --test buckets \
    -- --skip kill_and_resume --skip second_trainer --skip ctrl_c --skip bad_artifacts --skip bad_data
