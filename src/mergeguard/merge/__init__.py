"""Merging task vectors: the method registry and the streaming engine."""

from mergeguard.merge.engine import MergeResult, merge_checkpoints
from mergeguard.merge.registry import METHODS, MergeMethod, Param, get_method

__all__ = ["METHODS", "MergeMethod", "MergeResult", "Param", "get_method", "merge_checkpoints"]
