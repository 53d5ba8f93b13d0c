"""How the library reports progress without printing: the CLI passes in a sink."""

from __future__ import annotations

from typing import Protocol


class ProgressSink(Protocol):
    """Receives the stages of a long operation; the CLI renders them as progress bars."""

    def stage(self, description: str, total: int | None) -> None:
        """A new stage begins with `total` steps (None when unknown)."""

    def advance(self, steps: int = 1) -> None:
        """`steps` more steps of the current stage are done."""


class NullProgress:
    """A sink that ignores everything (library use, `--quiet`)."""

    def stage(self, description: str, total: int | None) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass
