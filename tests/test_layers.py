"""The folders are the layers: every import (module-level or deferred) points down, never up or into paper_figures.

A module may import from its own area or from an area of lower rank; each area's command-line module
(``*/cli.py``, ``cli_common``, ``check_cli``) sits on top. A new module in a new area must be ranked here.
"""

import ast
import pathlib

import sspo_analysis

RANK = {
    "primitives": 0, "io": 0, "lazy": 0, "sandbox": 0, "gates": 1, "objectives": 2, "failure": 3, "testing": 3,
    "theory": 3, "simulation": 4, "analysis": 4, "training": 5, "integrations": 6, "plotting": 6, "study": 7,
    "cli_common": 7, "check_cli": 7, "cli": 8,
}
ROOT = pathlib.Path(sspo_analysis.__file__).parent


def _area(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "sspo_analysis" or len(parts) == 1:
        return None
    return "cli" if parts[-1] == "cli" else parts[1]


def _imports(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def _edges() -> list[tuple[str, str]]:
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(("sspo_analysis", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        edges += [(module, target) for target in _imports(ast.parse(path.read_text()))]
    return edges


def test_every_area_is_ranked():
    areas = {_area(m) for m, _ in _edges()} - {None}
    assert areas <= set(RANK), sorted(areas - set(RANK))


def test_imports_point_down_the_layers():
    upward = [(m, t) for m, t in _edges()
              if _area(m) in RANK and _area(t) in RANK and RANK[_area(t)] > RANK[_area(m)]]
    assert upward == []


def test_the_library_never_imports_paper_figures():
    assert [(m, t) for m, t in _edges() if t.startswith("paper_figures")] == []
