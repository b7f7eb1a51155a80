"""The offline TRL quickstart: docs/integrations.md shows examples/trl_quickstart.py verbatim, and it runs offline."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.trl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "trl_quickstart.py"


def test_the_docs_show_the_script_verbatim():
    page = (ROOT / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert SCRIPT.read_text() in blocks


def test_quickstart_runs_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert "'clip_ratio/region_mean': 0.0" in last and "'objective/gate_weight_mean'" in last
