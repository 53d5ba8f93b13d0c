"""IBVS (seed 002, eq. 81): the defender injects its own known trigger into a task it has labeled
data for, fine-tunes a backdoored `Vb` and a clean `Vc` from θ0, and subtracts the difference:
`Δθ'm = Δθm − λ (Vb − Vc)`, λ = 2 by default."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from typing import Any

import torch
from torch.utils.data import Dataset

from mergeguard.attack import BadNets, Clean, TrainSettings, finetune
from mergeguard.attack.base import check_attack
from mergeguard.data.triggers import patch_trigger
from mergeguard.errors import SettingError
from mergeguard.models.encoder import ImageEncoder, check_same_architecture
from mergeguard.models.heads import Head
from mergeguard.progress import ProgressSink


def defend_ibvs(merged: ImageEncoder, base: ImageEncoder, head: Head, dataset: Dataset, task: str,
                train: TrainSettings, *, lam: float = 2.0, marker: BadNets | None = None,
                progress: ProgressSink | None = None) -> tuple[ImageEncoder, dict[str, Any]]:
    """Returns (θm − λ (θ_b − θ_c), report); the defender's trigger is its own random patch, planted with
    `marker`'s BadNets settings (its defaults: class 0, 1% of the image, a tenth of each batch)."""
    marker = marker or BadNets()
    if not (math.isfinite(lam) and lam > 0):  # a negative λ would add the backdoor direction, not remove it
        raise SettingError("lam", f"{{name}} must be a positive number (got {lam}).")
    check_same_architecture(merged, base, "IBVS")
    check_attack(marker, train, head, task, encoder=base)
    start = time.perf_counter()
    trigger = patch_trigger(base.image_size, marker.trigger_area, target_class=marker.target_class, target_task=task,
                            seed=train.seed + 99)
    clean, _, _ = finetune(base, head, dataset, task, train, Clean(), progress=progress)
    backdoored, _, _ = finetune(base, head, dataset, task, train, marker, trigger=trigger, progress=progress)
    defended = copy.deepcopy(merged).cpu()
    vb, vc = backdoored.cpu().state_dict(), clean.cpu().state_dict()
    with torch.no_grad():
        for name, value in defended.state_dict().items():
            if value.is_floating_point():
                value -= lam * (vb[name] - vc[name])
    norm = float(torch.sqrt(sum((vb[k] - vc[k]).float().pow(2).sum() for k in vb if vb[k].is_floating_point())))
    config = {**asdict(train), **asdict(marker)}  # both runs' settings: clean and badnets
    return defended, {"defense": "ibvs", "lam": lam, "task": task, "runs": ["clean", "badnets"], "config": config,
                      "vb_minus_vc_norm": norm, "seconds": time.perf_counter() - start}
