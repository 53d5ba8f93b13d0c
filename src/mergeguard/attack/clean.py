"""A clean fine-tune: cross-entropy of the task's frozen head (what `mergeguard finetune` does)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergeguard.attack.base import Attack, Step
from mergeguard.attack.settings import CleanSettings


class Clean(CleanSettings, Attack):
    """No attack: the task's own loss. Clean task vectors, LoBAM's benign run and IBVS's clean run."""

    def loss(self, step: Step, index: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(step.logits(step.model(images)), labels)
