"""Data: image folders, procedural tasks and triggers, all in [0, 1] pixel space."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def stack_images(dataset: Dataset, workers: int = 0) -> torch.Tensor:
    """Every image of a dataset of (image, label) pairs, in order, as one tensor (N, 3, H, W)."""
    loader = DataLoader(dataset, batch_size=256, shuffle=False, num_workers=workers)
    return torch.cat([x for x, _ in loader])
