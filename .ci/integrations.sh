#!/usr/bin/env bash
# The verl cross-checks, in their own environment, with verl 0.9.1's GPU-extra transformers (5.9.0; verl pins < 5.11),
# the main environment has 5.24. Builds .venv-verl from scratch (in CI, or when it is
# missing, or with SSPO_VERL_FRESH=1) and runs tests/test_integrations_verl.py (verl's clip_cov / kl_cov included) there.
# The TRL tests run in the main environment with the rest of the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
start=$SECONDS
VENV=.venv-verl
LOG=$VENV/ci-install.log  # inside the (gitignored) environment

# The versions tested together. verl's full dependency set (wandb, tensorboard, vLLM, ...) is not needed to
# import verl.trainer.ppo.core_algos and verl.trainer.main_ppo (what the example's `--cfg job` check runs), so
# verl goes in with --no-deps and these are what those two import.
VERL_DEPS=(
    "transformers==5.9.0" "tensordict==0.10.0" "ray==2.60.0" "hydra-core==1.3.8" "omegaconf==2.3.1"
    "pandas==3.1.1" "numpy>=2,<3" "codetiming==1.4.0" "packaging" "pytest>=8,<10" "hypothesis>=6.100,<7"
    "datasets==5.2.0" "pillow==13.0.0" "torchdata==0.11.0" "peft==0.21.2" "accelerate==1.15.0" "dill==0.4.1"
    "pylatexenc==2.11" "pybind11==3.1.0" "pyarrow==26.0.1"
)

if [ "${CI:-}" = "true" ] || [ "${SSPO_VERL_FRESH:-0}" = "1" ] || [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    {
        # torch first and pinned: it is the CPU build on this machine's disk (an unpinned torch pulls CUDA).
        # --no-compile: byte-compiling torch's sources at install time costs more than the install itself.
        "$VENV/bin/pip" install --no-compile 'torch==2.13.0' &&
        "$VENV/bin/pip" install --no-compile --no-deps 'verl==0.9.1' &&
        "$VENV/bin/pip" install --no-compile "${VERL_DEPS[@]}" &&
        "$VENV/bin/pip" install --no-compile --no-deps -e .
    } > "$LOG" 2>&1 || { echo "integrations: building $VENV failed:" >&2; tail -n 60 "$LOG" >&2; exit 1; }
    echo "integrations: built $VENV in $((SECONDS - start)) s"
fi

# Fail loudly rather than let pytest.importorskip skip every verl test.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import verl.trainer.main_ppo  # noqa: F401  (the example's entry point: its imports must resolve)
import verl.trainer.ppo.core_algos  # noqa: F401
import sspo_analysis.integrations.verl as sv
print("integrations: verl", md.version("verl"), "transformers", md.version("transformers"),
      "torch", md.version("torch"), "registered", ", ".join(sv.REGISTERED))
PY

"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_integrations_verl.py
echo "integrations: verl checks done in $((SECONDS - start)) s"
