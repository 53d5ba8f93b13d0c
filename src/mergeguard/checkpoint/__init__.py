"""Checkpoints in and out: resolve sources, lazy per-tensor reads, sharded atomic writes, provenance.

This layer knows files and the Hub, nothing about models. Its names are imported when first used (reading
and writing need torch; `paths` and the command line's start-up do not).
"""

_WHERE = {
    "Checkpoint": "reader", "TensorInfo": "reader", "from_tensors": "reader", "read_header": "reader",
    "open_checkpoint": "resolve",
    "CheckpointWriter": "writer", "PlannedTensor": "writer", "parse_size": "writer", "write_tensors": "writer",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"mergeguard.checkpoint.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mergeguard.checkpoint' has no attribute {name!r}")
