#!/usr/bin/env bash
# The lowest versions pyproject.toml declares, where they can be installed here, in their own environment
# (.venv-lowest): the library's fast tests run against them. torch is the exception: only 2.13.0 (CPU) is on the
# test machines' disk, so torch's declared floor (2.4) is not tested; see the README's "Versions".
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
start=$SECONDS
VENV=.venv-lowest
LOG=$VENV/ci-install.log

# The floors of pyproject.toml's ranges (the lowest patch release of each floor that has Python 3.11 wheels).
LOWEST=(
    "numpy==2.0.2" "scipy==1.13.1" "pandas==2.2.3" "matplotlib==3.8.4" "rich==13.9.4" "tomli-w==1.0.0"
    "transformers==5.0.0" "trl==1.16.0" "datasets==4.7.0"
)

if [ "${CI:-}" = "true" ] || [ "${SSPO_LOWEST_FRESH:-0}" = "1" ] || [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    {
        "$VENV/bin/pip" install --no-compile 'torch==2.13.0' &&
        "$VENV/bin/pip" install --no-compile "${LOWEST[@]}" -e '.[test,trl]'
    } > "$LOG" 2>&1 || { echo "lowest: building $VENV failed:" >&2; tail -n 60 "$LOG" >&2; exit 1; }
    echo "lowest: built $VENV in $((SECONDS - start)) s"
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
print("lowest:", ", ".join(f"{p} {md.version(p)}" for p in
      ("numpy", "scipy", "pandas", "matplotlib", "rich", "tomli-w", "transformers", "trl", "datasets", "torch")))
PY

"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_gates.py tests/test_objectives.py tests/test_theory.py tests/test_simulation.py tests/test_analysis.py \
    tests/test_training.py tests/test_outputs.py tests/test_cli_conventions.py tests/test_integrations_trl.py \
    tests/test_trl_quickstart.py tests/test_figures_units.py tests/test_tasks_data.py
echo "lowest: checks done in $((SECONDS - start)) s"
