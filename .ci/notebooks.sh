#!/usr/bin/env bash
# The README's first install, alone: a fresh environment with only the notebooks extra (not [test]) executes all
# three notebooks top to bottom on their smoke settings (SSPO_QUICK=1, as tests/test_notebooks.py runs them),
# so every import a notebook makes is one that extra brings.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS
VENV=.venv-nb
OUT=.ci-notebooks

rm -rf "$VENV" "$OUT"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --no-compile 'torch==2.13.0' -e '.[notebooks]' > "$VENV/ci-install.log" 2>&1 ||
    { echo "notebooks: building $VENV failed:" >&2; tail -n 60 "$VENV/ci-install.log" >&2; exit 1; }
echo "notebooks: built $VENV from [notebooks] alone in $((SECONDS - start)) s"
if "$VENV/bin/python" -c "import pytest" 2> /dev/null; then
    echo "notebooks: pytest is installed in $VENV: the environment is not [notebooks] alone" >&2
    exit 1
fi

# The kernel is this environment's own Python (the kernelspec ipykernel installs into it), and its data
# directory is searched first, so no kernel from elsewhere on the machine can stand in for it.
unset MPLBACKEND  # the kernel picks its inline backend, as for a user (.ci/run exports Agg for the CLI)
export JUPYTER_DATA_DIR="$PWD/$VENV/share/jupyter" SSPO_QUICK=1
# tests/nbrun.py: nbclient with the kernel's replies polled in slices (a missed wake-up otherwise waits out a
# cell's whole limit; see its docstring). 180 s a cell: a smoke cell takes under 20 s.
"$VENV/bin/python" tests/nbrun.py --timeout 180 --out "$OUT" notebooks/*.ipynb
echo "notebooks: done in $((SECONDS - start)) s"
