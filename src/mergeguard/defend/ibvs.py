"""IBVS (seed 002, eq. 81): the defender injects its own known trigger into a task it has labeled
data for, fine-tunes a backdoored `Vb` and a clean `Vc` from θ0, and subtracts the difference:
`Δθ'm = Δθm − λ (Vb − Vc)`, λ = 2 by default."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, replace
from typing import Any

import torch
from torch.utils.data import Dataset

from mergeguard.attack.poison import PoisonConfig, poison_finetune
from mergeguard.data.triggers import patch_trigger
from mergeguard.errors import MergeguardError
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head
from mergeguard.progress import ProgressSink


def defend_ibvs(merged: ImageEncoder, base: ImageEncoder, head: Head, dataset: Dataset, task: str,
                cfg: PoisonConfig, *, lam: float = 2.0,
                progress: ProgressSink | None = None) -> tuple[ImageEncoder, dict[str, Any]]:
    """Returns (θm − λ (θ_b − θ_c), report); the defender's trigger is its own random patch."""
    from mergeguard.attack.poison import check_config
    from mergeguard.defend.lfpm import check_same_architecture

    if not (math.isfinite(lam) and lam > 0):  # a negative λ would add the backdoor direction, not remove it
        raise MergeguardError(f"--lam must be a positive number (got {lam}).")
    check_same_architecture(merged, base, "IBVS")
    check_config(replace(cfg, kind="badnets"), head, task, encoder=base)
    start = time.perf_counter()
    trigger = patch_trigger(base.image_size, cfg.trigger_area, target_class=cfg.target_class, target_task=task,
                            seed=cfg.seed + 99)
    clean, _, _ = poison_finetune(base, head, dataset, task, replace(cfg, kind="clean"), progress=progress)
    backdoored, _, _ = poison_finetune(base, head, dataset, task, replace(cfg, kind="badnets"), trigger=trigger,
                                       progress=progress)
    defended = copy.deepcopy(merged).cpu()
    vb, vc = backdoored.cpu().state_dict(), clean.cpu().state_dict()
    with torch.no_grad():
        for name, value in defended.state_dict().items():
            if value.is_floating_point():
                value -= lam * (vb[name] - vc[name])
    norm = float(torch.sqrt(sum((vb[k] - vc[k]).float().pow(2).sum() for k in vb if vb[k].is_floating_point())))
    config = {k: v for k, v in asdict(cfg).items() if k != "kind"}  # both runs' settings: clean and badnets
    return defended, {"defense": "ibvs", "lam": lam, "task": task, "runs": ["clean", "badnets"], "config": config,
                      "vb_minus_vc_norm": norm, "seconds": time.perf_counter() - start}
