"""Checkpoints in and out: resolve sources, lazy per-tensor reads, sharded atomic writes, provenance.

This layer knows files and the Hub, nothing about models. Its names are imported when first used (reading
and writing need torch; `paths` and the command line's start-up do not).
"""

from mergeguard.lazy import lazy_exports

_WHERE = {
    "Checkpoint": "reader", "TensorInfo": "reader", "from_tensors": "reader", "read_header": "reader",
    "open_checkpoint": "resolve",
    "CheckpointWriter": "writer", "PlannedTensor": "writer", "parse_size": "writer", "write_tensors": "writer",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
