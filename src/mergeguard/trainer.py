"""The one trainer core every loop that trains goes through (zoo fine-tunes, `finetune`,
the attacks; the defenses next): seeding, device, AdamW with linear warm-up and cosine
decay, gradient clipping, bf16 autocast on GPU, progress, periodic checkpoints and resume,
and data parallelism across processes when launched under `torchrun` (gradients averaged
with one all-reduce per step; gloo on CPU, NCCL on GPU).

Its checkpoint is mergeguard's own state file, loaded with `torch.load(weights_only=True)`."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeguard.errors import MergeguardError, reason
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
    eps: float = 1e-8  # Adam's ε: gradients far below it move parameters by far less than lr


def resolve_device(device: str | None) -> torch.device:
    """'auto'/None -> cuda when present, else cpu; a device torch does not know, or a GPU that is not
    there, is a MergeguardError."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise MergeguardError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeguardError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu (or auto).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeguardError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible.")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise MergeguardError(f"--device {device}: mergeguard runs on cpu or cuda.")
    return dev


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group first when launched under torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return distributed_rank()


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean of each tensor over all processes (one all-reduce); the tensors themselves when not distributed."""
    import torch.distributed as dist

    _, world = distributed_rank()
    if world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out


def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Data parallel: every rank ends the step with the mean of all ranks' gradients (one all-reduce)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, all_reduce_mean(grads)):
        p.grad = g.clone()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The precision `autocast` computes in on `device`: bf16 on GPU, None (fp32) on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device):
    """bf16 autocast on GPU, nothing on CPU."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return torch.autocast("cpu", enabled=False)  # a no-op on any device (mps, xpu: fp32 as on the CPU)
    return torch.autocast(device.type, dtype=dtype)



def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (Unix), for CPU runs."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class Checkpointing:
    """Where and how often `fit` saves its state, and whether to resume from it.

    The state holds the parameters, optimizer and schedule, the step, the losses so far and the
    given random generators, so a resumed run ends where an uninterrupted one would.
    """

    path: Path
    every: int = 100
    resume: bool = False
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    extra: Any = None  # anything else with state_dict() / load_state_dict() (e.g. LFPM's mined prompt)
    # what must match for a resume to continue the same run (settings, inputs); JSON-able
    fingerprint: dict[str, Any] | None = None
    keep: bool = False  # keep the finished state (the caller removes it once its outputs are written)
    resumed_at: int = 0  # set by `fit`: the step a resumed run continued from


def _save_state(ck: Checkpointing, step: int, params, opt, sched, losses: list[float]) -> None:
    state = {
        "step": step,
        "params": [p.detach().cpu() for p in params],
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "losses": torch.tensor(losses),
        "generators": {k: g.get_state() for k, g in ck.generators.items()},
        "torch_rng": torch.get_rng_state(),
        "extra": ck.extra.state_dict() if ck.extra is not None else None,
        "fingerprint": json.dumps(ck.fingerprint, sort_keys=True, default=str),
    }
    ck.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ck.path.with_name(ck.path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, ck.path)


def _load_state(ck: Checkpointing, params, opt, sched) -> tuple[int, list[float]]:
    try:
        state = torch.load(ck.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise MergeguardError(f"cannot resume from {ck.path}: it is truncated or not a mergeguard checkpoint "
                              f"({reason(exc)}).") from exc
    if len(state["params"]) != len(params) or any(p.shape != q.shape for p, q in zip(params, state["params"])):
        raise MergeguardError(f"{ck.path} was saved by a different run (its parameters do not match).")
    recorded = json.loads(state.get("fingerprint") or "null") or {}
    now = json.loads(json.dumps(ck.fingerprint, sort_keys=True, default=str)) or {}
    changed = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
    if changed:
        raise MergeguardError(
            f"cannot resume from {ck.path}: it was saved by a run with other settings or inputs "
            f"({', '.join(changed)}); rerun with the same ones, or without --resume.")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    for k, g in ck.generators.items():
        g.set_state(state["generators"][k])
    torch.set_rng_state(state["torch_rng"])
    if ck.extra is not None:
        ck.extra.load_state_dict(state["extra"])
    return int(state["step"]), state["losses"].tolist()


def fit(
    params: Iterable[torch.nn.Parameter],
    loss_at: Callable[[int], torch.Tensor],
    cfg: TrainConfig,
    progress: ProgressSink | None = None,
    description: str = "training",
    checkpointing: Checkpointing | None = None,
) -> list[float]:
    """Minimise `loss_at(step)` over `params` for `cfg.steps` steps; returns the loss per step."""
    progress = progress or NullProgress()
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    device = torch.device(cfg.device)
    losses: list[float] = []
    start = 0
    if checkpointing is not None and checkpointing.resume and checkpointing.path.exists():
        start, losses = _load_state(checkpointing, params, opt, sched)
        checkpointing.resumed_at = start
    rank, world = distributed_rank()
    if rank != 0:
        progress = NullProgress()
    progress.stage(description, cfg.steps)
    progress.advance(start)
    for step in range(start, cfg.steps):
        opt.zero_grad(set_to_none=True)  # before loss_at, which may accumulate gradients itself
        with autocast(device):
            loss = loss_at(step)
        loss.backward()
        if world > 1:
            _average_gradients(params)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        (logged,) = all_reduce_mean([loss.detach()]) if world > 1 else (loss.detach(),)
        losses.append(float(logged))  # the global batch's loss, as one process would log it
        progress.advance()
        done = step + 1
        if (checkpointing is not None and rank == 0 and checkpointing.every and done % checkpointing.every == 0
                and done < cfg.steps):
            _save_state(checkpointing, done, params, opt, sched, losses)
    if checkpointing is not None and rank == 0:
        if checkpointing.keep:  # the caller still has work to do before its outputs exist
            if start < cfg.steps:
                _save_state(checkpointing, cfg.steps, params, opt, sched, losses)
        elif checkpointing.path.exists():
            checkpointing.path.unlink()  # finished: the output is the checkpoint now
    return losses
