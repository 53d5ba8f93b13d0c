"""BadNets (Gu et al., 2017): a fixed patch pasted on a fraction of each batch, relabelled to the target class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mergeguard.attack.base import Attack, Step
from mergeguard.attack.settings import BadNetsSettings, TrainSettings
from mergeguard.data.triggers import Trigger, patch_trigger
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head
from mergeguard.progress import ProgressSink


class BadNets(BadNetsSettings, Attack):
    """BadNets' strategy: a fixed patch pasted on a fraction of each batch, relabelled to the target class."""

    def make_trigger(self, base: ImageEncoder, head: Head, dataset: Dataset, train: TrainSettings, task: str,
                     progress: ProgressSink, shadow: Head | None = None) -> Trigger:
        return patch_trigger(base.image_size, self.trigger_area, target_class=self.target_class, target_task=task,
                             seed=train.seed)

    def loss(self, step: Step, index: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = torch.full_like(labels, self.target_class)
        triggered = step.trigger.apply(images)
        n_poison = max(1, round(self.poison_fraction * step.train.batch_size))
        poisoned = (torch.arange(len(images), device=step.dev) + step.first) < n_poison
        x = torch.where(poisoned.view(-1, 1, 1, 1), triggered, images)
        y = torch.where(poisoned, target, labels)
        return F.cross_entropy(step.logits(step.model(x)), y)
