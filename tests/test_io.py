"""Writing files (``sspo_analysis.io``): written JSON is always JSON (NaN and infinities as null)."""

from __future__ import annotations

import json
import math


def test_written_json_is_always_json(tmp_path):
    from sspo_analysis.io import write_json

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    path = write_json(tmp_path / "x.json", {"loss": math.nan, "history": [{"v": math.inf}, 1.5], "n": 2})
    assert json.loads(path.read_text(), parse_constant=refuse) == {"loss": None, "history": [{"v": None}, 1.5], "n": 2}
