"""A package's names imported when first used (PEP 562), so importing the package costs nothing: the
command line's `--help` and argument errors load no torch (docs/architecture.md, "Start-up")."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, where: dict[str, str], default: str | None = None) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: name -> `package.<where[name]>`'s attribute of that name (any
    other name from `package.<default>`, when given), imported on first use."""

    def __getattr__(name: str) -> Any:
        module = where.get(name, default)
        if module is not None:
            try:
                return getattr(importlib.import_module(f"{package}.{module}"), name)
            except AttributeError:
                pass
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
