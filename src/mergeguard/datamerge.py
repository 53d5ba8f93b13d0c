"""The merges that need a model in memory and images: RegMean and AdaMerging.

- **RegMean** (Jin et al., ICLR 2023): for every linear map of the tower (each `nn.Linear` and the attention's
  input projection), the weight that best reproduces every fine-tuned model's outputs on its own task's inputs:
  W* = (Σ_i W_i G_i)(Σ_i G_i)⁻¹, with G_i the Gram matrix of that layer's inputs under model i on task i's
  unlabeled images (the mean over tokens, so each task weighs the same, scaled by the input's weight), its
  off-diagonal entries scaled by `alpha`; every other tensor is the weighted mean of the fine-tunes.
- **AdaMerging**, layer-wise (Yang et al., ICLR 2024): θ = θ0 + Σ_k λ_{k,p} τ_{k,p}, one coefficient per task
  vector k and tensor p, learned by minimising the entropy of each task's predictions (through its head) on its
  unlabeled images, with Adam, the coefficients kept in [0, 1].

Both take the inputs as models θ0 + τ_i (`scan.model_of`: anything `merge` takes) and return the merged open_clip
image tower with what they learned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head
from mergeguard.progress import NullProgress, ProgressSink


@dataclass
class DataMergeResult:
    encoder: ImageEncoder
    report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# -- RegMean -----------------------------------------------------------------------------------------------------
def linear_maps(encoder: nn.Module) -> dict[str, nn.Module]:
    """The tower's linear maps RegMean solves for, by their weight's name: every `nn.Linear`, and each
    `nn.MultiheadAttention`'s packed input projection (`in_proj_weight`, applied to the attention's query)."""
    maps: dict[str, nn.Module] = {}
    for name, module in encoder.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            maps[prefix + "weight"] = module
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            maps[prefix + "in_proj_weight"] = module
    return maps


def gram_matrices(encoder: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> dict:
    """For each linear map (`linear_maps`), the mean over every token of every image of xᵀx, x its input."""
    maps = linear_maps(encoder)
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []

    def record(key: str):
        def hook(module, args, kwargs=None):
            x = args[0] if args else kwargs["query"]
            x = x.detach().reshape(-1, x.shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.T @ x
            rows[key] = rows.get(key, 0) + x.shape[0]
        return hook

    for key, module in maps.items():
        hooks.append(module.register_forward_pre_hook(record(key), with_kwargs=isinstance(module,
                                                                                         nn.MultiheadAttention)))
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                encoder(images[start:start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {key: sums[key] / rows[key] for key in sums}


def regmean_solve(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """W* = (Σ W_i G_i)(Σ G_i)⁻¹ for weights in torch's (out, in) layout, each G_i's off-diagonal entries scaled
    by `alpha` first (the least-squares fit of Σ_i ‖X_i W_iᵀ − X_i Wᵀ‖² when `alpha` is 1, G_i = X_iᵀX_i)."""
    total = None
    rhs = None
    for w, g in zip(weights, grams):
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        total = g if total is None else total + g
        part = g @ w.double().T
        rhs = part if rhs is None else rhs + part
    try:
        solved = torch.linalg.solve(total, rhs)
    except RuntimeError:  # singular (an input never seen, a dead unit): the least-norm answer
        solved = torch.linalg.lstsq(total, rhs, driver="gelsd").solution
    return solved.T.to(weights[0].dtype)


def regmean(base: ImageEncoder, models: list[ImageEncoder], images: list[torch.Tensor], weights: list[float], *,
            alpha: float, batch_size: int, device: str | torch.device, progress: ProgressSink | None = None
            ) -> DataMergeResult:
    """RegMean of `models` (fine-tuned θ0 + τ_i), model i's Gram matrices from `images[i]` (its task's)."""
    start = time.perf_counter()
    progress = progress or NullProgress()
    device = torch.device(device)
    grams: list[dict[str, torch.Tensor]] = []
    progress.stage("regmean: the inputs' Gram matrices", len(models))
    for model, imgs, w in zip(models, images, weights):
        model.to(device).eval()
        grams.append({k: w * g.cpu() for k, g in gram_matrices(model, imgs, batch_size, device).items()})
        model.cpu()
        progress.advance()
    states = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in models]
    merged_state = {}
    total_w = sum(weights)
    for name, value in base.state_dict().items():
        if name in grams[0]:
            merged_state[name] = regmean_solve([s[name].detach() for s in states], [g[name] for g in grams], alpha)
        elif value.is_floating_point():  # the weighted mean of the fine-tunes
            merged_state[name] = sum(w * s[name].detach() for s, w in zip(states, weights)) / total_w
        else:
            merged_state[name] = value
    merged = ImageEncoder(base.arch)
    merged.load_state_dict(merged_state)
    return DataMergeResult(merged, {"solved": sorted(grams[0]), "alpha": alpha}, time.perf_counter() - start)


# -- AdaMerging --------------------------------------------------------------------------------------------------
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The mean Shannon entropy (nats) of the softmax of each row."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def merged_parameters(theta0: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]],
                      lambdas: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """θ0 + Σ_k λ[k, p] τ_k[p] for each tensor p of `names` (λ: (inputs, tensors))."""
    out = dict(theta0)
    for p, name in enumerate(names):
        out[name] = theta0[name] + sum(lambdas[k, p] * v[name] for k, v in enumerate(vectors))
    return out


def adamerging_loss(model: nn.Module, theta0: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]],
                    lambdas: torch.Tensor, names: list[str], batches: list[torch.Tensor],
                    heads: list[Callable]) -> torch.Tensor:
    """AdaMerging's objective: Σ over tasks of the mean entropy of the merged model's predictions (through the
    task's head) on a batch of the task's unlabeled images."""
    params = merged_parameters(theta0, vectors, lambdas, names)
    return sum(entropy(head(functional_call(model, params, (x,)))) for x, head in zip(batches, heads))


def adamerging(base: ImageEncoder, models: list[ImageEncoder], heads: list[Head], images: list[torch.Tensor],
               weights: list[float], *, steps: int, lr: float, init_lam: float, batch_size: int,
               device: str | torch.device, seed: int = 0, progress: ProgressSink | None = None) -> DataMergeResult:
    """Layer-wise AdaMerging of `models` (θ0 + τ_k; τ_k scaled by its weight), by entropy minimisation on each
    task's unlabeled `images` through its head (`heads[t]` goes with `images[t]`)."""
    start = time.perf_counter()
    progress = progress or NullProgress()
    device = torch.device(device)
    model = ImageEncoder(base.arch).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    theta0 = {k: v.detach().to(device) for k, v in base.state_dict().items()}
    names = [k for k, v in theta0.items() if v.is_floating_point() and k in dict(base.named_parameters())]
    vectors = [{k: w * (m.state_dict()[k].detach().to(device) - theta0[k]) for k in names}
               for m, w in zip(models, weights)]
    lambdas = torch.full((len(models), len(names)), float(init_lam), device=device, requires_grad=True)
    optimiser = torch.optim.Adam([lambdas], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    logits = [(lambda f, h=h: h.logits(f)) for h in heads]
    losses = []
    progress.stage("adamerging: entropy minimisation", steps)
    for _ in range(steps):
        batches = [imgs[torch.randint(len(imgs), (min(batch_size, len(imgs)),), generator=gen)].to(device)
                   for imgs in images]
        loss = adamerging_loss(model, theta0, vectors, lambdas, names, batches, logits)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            lambdas.clamp_(0.0, 1.0)
        losses.append(float(loss.detach()))
        progress.advance()
    with torch.no_grad():
        final = merged_parameters(theta0, vectors, lambdas.detach(), names)
    merged = ImageEncoder(base.arch)
    merged.load_state_dict({k: v.cpu() for k, v in final.items()})
    lam = lambdas.detach().cpu()
    report = {"lambdas": {name: lam[:, p].tolist() for p, name in enumerate(names)},
              "lambda_mean_per_input": lam.mean(1).tolist(), "entropy_first": losses[0] if losses else math.nan,
              "entropy_last": losses[-1] if losses else math.nan, "steps": steps}
    return DataMergeResult(merged, report, time.perf_counter() - start)
