"""Package attributes imported on first use (PEP 562), so that importing a package costs nothing until it is used.

``sspo --version`` and ``sspo --help`` import :mod:`sspo_analysis` and each area's
``cli`` module (inside its package); with the packages' re-exports resolved lazily,
neither torch nor transformers is imported until a command needs them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose names ``exports`` (``{name: module}``) load on first use.

    A loaded name is stored in the package's namespace, so the next access is a plain attribute lookup.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
