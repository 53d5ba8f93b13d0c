"""Checkpoints in and out: resolve sources, lazy per-tensor reads, sharded atomic writes, provenance.

This layer knows files and the Hub, nothing about models.
"""

from mergeguard.checkpoint.reader import Checkpoint, TensorInfo, from_tensors, read_header
from mergeguard.checkpoint.resolve import open_checkpoint
from mergeguard.checkpoint.writer import CheckpointWriter, PlannedTensor, parse_size, write_tensors

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "PlannedTensor",
    "TensorInfo",
    "from_tensors",
    "open_checkpoint",
    "parse_size",
    "read_header",
    "write_tensors",
]
