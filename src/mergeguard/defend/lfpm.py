"""LFPM: an anti-backdoor task vector τa, optimised in feature space on unlabeled shadow images.

The project's reading of the seeds (ALGORITHMS.md), with the variant the feasibility run found
to get off the CA/ASR trade-off curve:

- Stage I (re-mined every step): a universal patch Π, pasted at a random position, ascends the
  merged model's *excess* feature reaction over θ0's:
  `D(x; θ) = (f_θ(x⊕Π) − f_θ(x)) − (f_θ0(x⊕Π) − f_θ0(x))` (θ0's reaction without gradient).
  The top-`rank` directions of the mined D span the adversarial subspace `Ps` (rank 0: all of it).
- Stage II: `θ(α) = θm + α τa`, τa from 0; minimise the loss path integral over K points
  `α_k = k/K`: `(1/K) Σ_k [ E‖Ps D(x; θ(α_k))‖² + β E‖f_θ(α_k)(x) − f_θm(x)‖² ]`, one backward per
  point accumulated into τa (memory of one model). θm's clean features are computed once.
- At the end the curvature along τa, `λ_eff = τaᵀ H τa / ‖τa‖²`, by one Hessian-vector product.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from mergeguard.errors import MergeguardError
from mergeguard.models.encoder import ImageEncoder
from mergeguard.progress import NullProgress, ProgressSink
from mergeguard.trainer import TrainConfig, fit, resolve_device, seed_everything


@dataclass
class LFPMConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-4
    path_points: int = 4  # K
    beta: float = 1.0  # weight of clean-feature preservation
    rank: int = 0  # adversarial subspace rank; 0: the whole feature space
    patch_fraction: float = 0.1  # side of the mined patch, as a fraction of the image side
    patch_lr: float = 0.1  # sign-ascent step of the patch
    mine_steps: int = 1  # ascent steps on the patch per training step
    seed: int = 0
    device: str = "auto"
    workers: int = 0


def _images(dataset: Dataset, workers: int) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=256, shuffle=False, num_workers=workers)
    return torch.cat([x for x, _ in loader])


def _paste(images: torch.Tensor, patch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Paste the patch at one random position (the same for the batch)."""
    size, side = images.shape[-1], patch.shape[-1]
    i, j = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
    out = images.clone()
    out[:, :, i:i + side, j:j + side] = patch
    return out


def _project(deviation: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    return deviation if basis is None else deviation @ basis @ basis.T


def defend_lfpm(
    merged: ImageEncoder,
    base: ImageEncoder,
    shadow: Dataset,
    cfg: LFPMConfig,
    progress: ProgressSink | None = None,
) -> tuple[ImageEncoder, dict[str, torch.Tensor], dict[str, Any]]:
    """Returns (defended model θm + τa, τa as {name: tensor}, report)."""
    progress = progress or NullProgress()
    if len(shadow) == 0:
        raise MergeguardError("the shadow image folder is empty.")
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    start = time.perf_counter()
    merged, base = merged.to(dev).eval(), base.to(dev).eval()
    for p in list(merged.parameters()) + list(base.parameters()):
        p.requires_grad_(False)
    images = _images(shadow, cfg.workers).to(dev)
    with torch.no_grad():  # θm's clean features, once
        clean_target = torch.cat([merged(chunk) for chunk in images.split(256)])
    theta_m = {n: p.detach() for n, p in merged.named_parameters()}
    tau = {n: torch.zeros_like(p, requires_grad=True) for n, p in theta_m.items()}
    side = max(1, round(cfg.patch_fraction * merged.image_size))
    gen = torch.Generator().manual_seed(cfg.seed)
    patch = torch.rand(3, side, side, generator=gen).to(dev)
    steps_per_epoch = max(1, len(images) // cfg.batch_size)
    steps = cfg.epochs * steps_per_epoch
    alphas = [(k + 1) / cfg.path_points for k in range(cfg.path_points)]
    history: list[float] = []
    state: dict[str, Any] = {}

    def at(alpha: float, x: torch.Tensor) -> torch.Tensor:
        params = {n: theta_m[n] + alpha * tau[n] for n in theta_m}
        return functional_call(merged, params, (x,))

    def mine(x: torch.Tensor) -> torch.Tensor:
        """`mine_steps` sign-ascent steps of the patch on the current θ(1)'s excess reaction; returns x⊕Π."""
        nonlocal patch
        params = {n: theta_m[n] + tau[n].detach() for n in theta_m}
        with torch.no_grad():
            clean_now = functional_call(merged, params, (x,))
            base_clean = base(x)
        for _ in range(cfg.mine_steps):
            pos_gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
            p = patch.clone().requires_grad_(True)
            xp = _paste(x, p, pos_gen)
            with torch.no_grad():
                base_reaction = base(xp) - base_clean
            excess = (functional_call(merged, params, (xp,)) - clean_now) - base_reaction
            (grad,) = torch.autograd.grad(excess.pow(2).sum(1).mean(), p)
            patch = (patch + cfg.patch_lr * grad.sign()).clamp(0, 1)
        pos_gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
        return _paste(x, patch, pos_gen)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x = images[idx]
        xp = mine(x)
        with torch.no_grad():
            base_reaction = base(xp) - base(x)
        basis = None
        total = 0.0
        for alpha in alphas:  # loss path integral: one backward per point, gradients accumulate in τa
            feats = at(alpha, torch.cat([x, xp]))
            clean_f, trig_f = feats[: len(x)], feats[len(x):]
            excess = (trig_f - clean_f) - base_reaction
            if cfg.rank and basis is None:
                _, _, v = torch.linalg.svd(excess.detach(), full_matrices=False)
                basis = v[: cfg.rank].T
            loss_bd = _project(excess, basis).pow(2).sum(1).mean()
            loss_cl = (clean_f - clean_target[idx]).pow(2).sum(1).mean()
            loss = (loss_bd + cfg.beta * loss_cl) / len(alphas)
            if alpha != alphas[-1]:
                loss.backward()
                total += float(loss.detach())
            else:
                state["last"] = total + float(loss.detach())
                return loss  # the trainer core runs the last backward and the optimizer step
        raise AssertionError("unreachable")

    train_cfg = TrainConfig(steps=steps, lr=cfg.lr, weight_decay=0.0, warmup=max(1, steps // 20), seed=cfg.seed,
                            device=str(dev), grad_clip=1.0)
    history = fit(list(tau.values()), loss_at, train_cfg, progress, "LFPM: anti-backdoor task vector")
    probe = (images[: cfg.batch_size], clean_target[: cfg.batch_size])
    lam_start = curvature(merged, theta_m, tau, *probe, at_start=True)
    lam_end = curvature(merged, theta_m, tau, *probe)
    defended = copy.deepcopy(merged)
    with torch.no_grad():
        for n, p in defended.named_parameters():
            p.copy_(theta_m[n] + tau[n].detach())
    seconds = time.perf_counter() - start
    per_epoch = [sum(history[e * steps_per_epoch:(e + 1) * steps_per_epoch]) / steps_per_epoch
                 for e in range(cfg.epochs)]
    report = {
        "config": asdict(cfg),
        "steps": steps,
        "loss_per_epoch": per_epoch,
        "lambda_eff_start": lam_start,
        "lambda_eff_end": lam_end,
        "tau_norm": float(torch.sqrt(sum(t.detach().pow(2).sum() for t in tau.values()))),
        "seconds": seconds,
        "images_per_second": steps * cfg.batch_size / seconds,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
    }
    return defended.requires_grad_(True), {n: t.detach().cpu() for n, t in tau.items()}, report


def curvature(model: ImageEncoder, theta_m: dict, tau: dict, x: torch.Tensor, target: torch.Tensor, *,
              at_start: bool = False) -> float | None:
    """λ_eff = vᵀ H v / ‖v‖² along v = τa for the clean-feature loss, at θm + τa (or at θm, the start)
    by one double backward, on the math attention kernel (which supports it on the CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    v = {n: t.detach() for n, t in tau.items()}
    norm2 = float(sum(t.pow(2).sum() for t in v.values()))
    if norm2 == 0:
        return None
    with sdpa_kernel(SDPBackend.MATH):
        s = torch.zeros((), requires_grad=True, device=x.device)
        offset = 0.0 if at_start else 1.0
        params = {n: theta_m[n] + offset * v[n] + s * v[n] for n in theta_m}
        loss = (functional_call(model, params, (x,)) - target).pow(2).sum(1).mean()
        (g,) = torch.autograd.grad(loss, s, create_graph=True)
        (h,) = torch.autograd.grad(g, s)
    return float(h) / norm2
