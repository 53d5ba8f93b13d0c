"""Reading a YAML file the user wrote (a merge config, a gate policy, a lock file): its content, or one sentence
saying why not (cannot be read, not text, not valid YAML, with the line and column)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergeguard.errors import MergeguardError


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed content of `path`; `what` names it in the sentence ("the config", "the policy")."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MergeguardError(f"cannot read {what} {path}: {exc.strerror or exc}.") from exc
    except UnicodeDecodeError as exc:
        raise MergeguardError(f"{what} {path} is not text (a YAML file is).") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MergeguardError(f"{what} {path} is not valid YAML{where}: {problem}.") from exc
