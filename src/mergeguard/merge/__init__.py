"""Merging task vectors: the method registry and the streaming engine.

The registry imports no torch; the engine (`merge_checkpoints`, `MergeResult`) is imported when first named.
"""

from mergeguard.merge.registry import METHODS, MergeMethod, Param, get_method

__all__ = ["METHODS", "MergeMethod", "MergeResult", "Param", "get_method", "merge_checkpoints"]


def __getattr__(name: str):
    if name in ("MergeResult", "merge_checkpoints"):
        from mergeguard.merge import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'mergeguard.merge' has no attribute {name!r}")
