"""Merging task vectors: the method registry and the streaming engine.

The registry imports no torch; the engine (`merge_checkpoints`, `MergeResult`) is imported when first named.
"""

from mergeguard.lazy import lazy_exports
from mergeguard.merge.registry import METHODS, MergeMethod, get_method

__all__ = ["METHODS", "MergeMethod", "MergeResult", "get_method", "merge_checkpoints"]
__getattr__ = lazy_exports(__name__, {"MergeResult": "engine", "merge_checkpoints": "engine"})
