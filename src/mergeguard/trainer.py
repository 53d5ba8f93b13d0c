"""The one trainer core every loop that trains goes through (zoo fine-tunes now; attacks and
defenses build on it): seeding, device, AdamW with linear warm-up and cosine decay,
gradient clipping, bf16 autocast on GPU, progress."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from mergeguard.progress import NullProgress, ProgressSink


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup: int = 0
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "cpu"


def resolve_device(device: str | None) -> torch.device:
    """'auto'/None -> cuda when present, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))


def autocast(device: torch.device):
    """bf16 autocast on GPU, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def fit(
    params: Iterable[torch.nn.Parameter],
    loss_at: Callable[[int], torch.Tensor],
    cfg: TrainConfig,
    progress: ProgressSink | None = None,
    description: str = "training",
) -> list[float]:
    """Minimise `loss_at(step)` over `params` for `cfg.steps` steps; returns the loss per step."""
    progress = progress or NullProgress()
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    device = torch.device(cfg.device)
    losses = []
    progress.stage(description, cfg.steps)
    for step in range(cfg.steps):
        with autocast(device):
            loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        progress.advance()
    return losses
