#!/usr/bin/env bash
# Creates (once) the pinned Python environment for export/ and the PyTorch reference,
# cached outside the clone and keyed by export/requirements.txt, and prints its path.
# Usage: VENV=$(scripts/setup_python.sh)
# FLOWSTEP_VENV=DIR uses that environment instead (one you made, with export/requirements.txt's
# packages); it is printed as given, nothing is installed into it.
set -euo pipefail
if [[ -n "${FLOWSTEP_VENV:-}" ]]; then
    if [[ ! -x "$FLOWSTEP_VENV/bin/python" ]]; then
        echo "setup_python: FLOWSTEP_VENV=$FLOWSTEP_VENV has no bin/python" >&2; exit 1
    fi
    echo "$FLOWSTEP_VENV"; exit 0
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/export/requirements.txt"
key="$(sha256sum "$req" | cut -c1-16)"
cache="${FLOWSTEP_CACHE:-$HOME/.cache/flowstep}"
venv="$cache/venv-$key"
if [[ ! -f "$venv/.complete" ]]; then
    echo "setup_python: installing $req into $venv (first run downloads ~5 GB)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    "$venv/bin/pip" install --quiet -r "$req" >&2
    touch "$venv/.complete"
fi
echo "$venv"
