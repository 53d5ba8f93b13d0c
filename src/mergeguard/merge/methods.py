"""The merge methods: small pure functions over one tensor name's task-vector deltas.

Each returns the merged *delta* (the engine adds it to the base). Deltas arrive in
float32, one per input that has the tensor, with the per-input weights alongside.
Each method's declaration (`MergeMethod`: name, parameters, help, and this module's function by
name) is in `registry.py`, which imports no torch, so the CLI builds its flags without loading it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mergeguard.merge.base import Passes, TensorContext


# -- building blocks --------------------------------------------------------------
def weighted_sum(deltas: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ w_i δ_i."""
    out = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights.tolist()):
        out.add_(d, alpha=w)
    return out


def _kth_largest(magnitudes: torch.Tensor, k: int, *, scratch: bool = False) -> float:
    """The k-th largest of a 1-D float tensor, by numpy's introselect (several times faster than
    torch.kthvalue on the CPU; on an accelerator, torch.topk where the tensor is, no copy to the host).
    With `scratch`, the tensor's storage is reordered in place."""
    if magnitudes.device.type != "cpu":
        return _kth_largest_topk(magnitudes, k)
    n = magnitudes.numel()
    array = magnitudes.float().numpy()
    if scratch and magnitudes.dtype == torch.float32:
        array.partition(n - k)
        return float(array[n - k])
    return float(np.partition(array, n - k)[n - k])


def _kth_largest_topk(magnitudes: torch.Tensor, k: int) -> float:
    """The k-th largest by torch.topk on the tensor's own device (an accelerator's; tested on the CPU)."""
    return float(torch.topk(magnitudes.float(), k, sorted=False).values.min())


def magnitude_threshold(delta: torch.Tensor, keep_fraction: float) -> float:
    """The |value| at or above which the top `int(keep_fraction * numel)` entries lie (inf: none)."""
    n = delta.numel()
    k = int(keep_fraction * n)
    if k <= 0:
        return math.inf
    if k >= n:
        return 0.0
    return _kth_largest(delta.detach().abs().reshape(-1), k, scratch=True)


def magnitude_trim(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the entries whose magnitude is at least `threshold` (`magnitude_threshold`'s), in place."""
    return delta.masked_fill_(delta.abs() < threshold, 0)


def dare_seed(seed: int, name: str, index: int) -> int:
    """The RNG seed of DARE's drop mask for input `index` on tensor `name`: stable across runs."""
    digest = hashlib.blake2b(f"{seed}|{name}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_drop(delta: torch.Tensor, keep_fraction: float, seed: int) -> torch.Tensor:
    """Drop each entry with probability 1 - keep_fraction and rescale the survivors by 1/keep_fraction."""
    if keep_fraction >= 1:
        return delta
    gen = torch.Generator().manual_seed(seed)
    mask = torch.bernoulli(torch.full_like(delta, keep_fraction), generator=gen)
    return delta * mask / keep_fraction


def sign_consensus(deltas: list[torch.Tensor], weights: torch.Tensor, normalize: str) -> torch.Tensor:
    """TIES' elect + disjoint merge: keep entries whose sign agrees with the sign of the weighted sum.

    The positive and negative parts are summed separately: the elected sign is that of their
    total (zero elects +), and the agreeing entries' sum is simply the part of that sign. Works
    input by input with no stacked copy; scales `deltas` by their weights in place.
    """
    ws = weights.tolist()
    if any(w != 1 for w in ws):
        deltas = [d.mul_(w) for d, w in zip(deltas, ws)]
    pos = torch.zeros_like(deltas[0])
    neg = torch.zeros_like(deltas[0])
    for d in deltas:
        pos.add_(d.clamp(min=0))
        neg.add_(d.clamp(max=0))
    elect_pos = (pos + neg) >= 0
    merged = torch.where(elect_pos, pos, neg)
    if normalize == "mean":
        count_pos = torch.zeros_like(merged)
        count_neg = torch.zeros_like(merged)
        for d, w in zip(deltas, ws):
            count_pos.add_((d > 0).to(merged.dtype), alpha=w)
            count_neg.add_((d < 0).to(merged.dtype), alpha=w)
        divisor = torch.where(elect_pos, count_pos, count_neg)
        divisor[divisor == 0] = 1
        merged.div_(divisor)
    return merged


# -- whole-vector magnitude thresholds (two streaming passes, exact) ----------------
def _abs_bits(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as float32 bit patterns: for non-negative floats, integer order is value order."""
    return delta.abs().float().reshape(-1).view(torch.int32)


def _select_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """In a histogram over ascending bins, the bin holding the k-th largest item and how many
    items of that bin are still needed to reach k."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    above = int(from_top[j - 1]) if j > 0 else 0
    return len(hist) - 1 - j, k - above


def vector_thresholds(passes: Passes, n_inputs: int, keep_fraction: float) -> list[float]:
    """Per input, the exact magnitude of its `int(keep_fraction * numel)`-th largest entry over the
    whole task vector, found by a radix select on float32 bits in two streaming passes."""
    hi = torch.zeros(n_inputs, 1 << 15, dtype=torch.int64)
    for _, deltas, idx, _ in passes():
        for d, i in zip(deltas, idx):
            hi[i] += torch.bincount(_abs_bits(d) >> 16, minlength=1 << 15)
    ks = [int(keep_fraction * int(hi[i].sum())) for i in range(n_inputs)]
    picks = [_select_from_top(hi[i], k) if k > 0 else (-1, 0) for i, k in enumerate(ks)]

    lo = torch.zeros(n_inputs, 1 << 16, dtype=torch.int64)
    for _, deltas, idx, _ in passes():
        for d, i in zip(deltas, idx):
            if picks[i][0] < 0:
                continue
            bits = _abs_bits(d)
            bits = bits[(bits >> 16) == picks[i][0]]
            if bits.numel():
                lo[i] += torch.bincount(bits & 0xFFFF, minlength=1 << 16)
    out = []
    for i, (bin_hi, need) in enumerate(picks):
        if bin_hi < 0:
            out.append(math.inf)
            continue
        bin_lo, _ = _select_from_top(lo[i], need)
        bits = torch.tensor([(bin_hi << 16) | bin_lo], dtype=torch.int32)
        out.append(bits.view(torch.float32).item())
    return out


def _prepare_trim(passes: Passes, n_inputs: int, params: dict) -> dict | None:
    if params.get("trim_scope") != "vector":
        return None
    return {"thresholds": vector_thresholds(passes, n_inputs, params["density"])}


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """Threads for the per-input trim thresholds: numpy's introselect runs on one core and releases the GIL."""
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="mergeguard-trim")


def _thresholds(deltas: list[torch.Tensor], ctx: TensorContext, density_: float) -> list[float]:
    """Each input's trim threshold on this tensor: the whole vector's (`trim_scope` vector), else the tensor's,
    found for several inputs at once."""
    if ctx.state and "thresholds" in ctx.state:
        return [ctx.state["thresholds"][i] for i in ctx.inputs]
    if density_ >= 1:
        return [0.0] * len(deltas)
    return list(_pool().map(lambda d: magnitude_threshold(d, density_), deltas))


def _ties_fused(deltas: list[torch.Tensor], weights: torch.Tensor, ctx: TensorContext, density_: float,
                normalize: str) -> torch.Tensor:
    """TIES' trim, elect and disjoint merge in one pass per input, without the trimmed copies: an input's kept
    positive entries are `threshold(δ, below t)`, its kept negative ones the same of −δ, where `below t` is the
    float32 just under its threshold t (so |δ| >= t is kept, as `magnitude_trim` keeps it). The same numbers as
    `sign_consensus(_trimmed(...))` (its weighted counts for `mean`), summed in the same order; `deltas` are
    used up."""
    thresholds = _thresholds(deltas, ctx, density_)
    pos, neg = torch.zeros_like(deltas[0]), torch.zeros_like(deltas[0])
    counts = (torch.zeros_like(pos), torch.zeros_like(pos)) if normalize == "mean" else None
    for d, w, t in zip(deltas, weights.tolist(), thresholds):
        below = float(np.nextafter(np.float32(t), np.float32(-np.inf))) if math.isfinite(t) else t
        kept_pos = torch.nn.functional.threshold(d, below, 0.0)
        kept_neg = torch.nn.functional.threshold(d.neg_(), below, 0.0)  # |δ| of the kept negative entries
        up, down = (kept_pos, kept_neg) if w >= 0 else (kept_neg, kept_pos)  # a negative weight turns signs
        pos.add_(up, alpha=abs(w))
        neg.sub_(down, alpha=abs(w))
        if counts is not None:  # sign_consensus's divisor: Σ w over the inputs whose weighted entry has that sign
            counts[0].add_(up > 0, alpha=w)
            counts[1].add_(down > 0, alpha=w)
    elect_pos = (pos + neg) >= 0
    merged = torch.where(elect_pos, pos, neg)
    if counts is not None:
        divisor = torch.where(elect_pos, *counts)
        divisor[divisor == 0] = 1
        merged.div_(divisor)
    return merged


def _trimmed(deltas: list[torch.Tensor], ctx: TensorContext, density_: float) -> list[torch.Tensor]:
    return [magnitude_trim(d, t) for d, t in zip(deltas, _thresholds(deltas, ctx, density_))]


# -- the methods -------------------------------------------------------------------
def task_arithmetic(deltas, weights, ctx, *, lam):
    return weighted_sum(deltas, weights).mul_(lam)


def average(deltas, weights, ctx):
    return weighted_sum(deltas, weights).div_(float(weights.sum()))


def ties(deltas, weights, ctx, *, lam, density, normalize, trim_scope):
    return _ties_fused(deltas, weights, ctx, density, normalize).mul_(lam)


def magnitude_prune(deltas, weights, ctx, *, lam, density, trim_scope):
    return weighted_sum(_trimmed(deltas, ctx, density), weights).mul_(lam)


def _dare(deltas, ctx, density_):
    return [dare_drop(d, density_, dare_seed(ctx.seed, ctx.name, i)) for d, i in zip(deltas, ctx.inputs)]


def dare_linear(deltas, weights, ctx, *, lam, density):
    return weighted_sum(_dare(deltas, ctx, density), weights).mul_(lam)


def dare_ties(deltas, weights, ctx, *, lam, density, normalize):
    return sign_consensus(_dare(deltas, ctx, density), weights, normalize).mul_(lam)


def breadcrumbs_mask(delta: torch.Tensor, density_: float, gamma: float) -> torch.Tensor:
    """Keep the middle magnitude band: drop the top `gamma` fraction and the smallest entries,
    so that `density` of the entries remain (fewer top entries dropped if both don't fit)."""
    n = delta.numel()
    n_top = int(gamma * n)
    n_bottom = n - int(density_ * n) - n_top
    if n_bottom < 0:
        n_top += n_bottom
        n_bottom = 0
    mag = delta.abs().reshape(-1)
    if n_bottom >= n:
        return torch.zeros_like(delta, dtype=torch.bool)
    keep = torch.ones_like(mag, dtype=torch.bool)
    if n_bottom > 0:
        keep &= mag >= torch.kthvalue(mag, n_bottom + 1).values
    if n_top > 0:
        keep &= mag < torch.kthvalue(mag, n - n_top + 1).values
    return keep.view_as(delta)


def breadcrumbs(deltas, weights, ctx, *, lam, density, gamma):
    kept = [d * breadcrumbs_mask(d, density, gamma) for d in deltas]
    return weighted_sum(kept, weights).mul_(lam)


# -- LATA: layer-aware task arithmetic --------------------------------------------
_LAYER = re.compile(r"^(.*?(?:^|\.)(?:resblocks|layers|layer|blocks|h)\.\d+)\.")


def layer_of(name: str) -> str | None:
    """The transformer layer a tensor belongs to (`...resblocks.3`), or None for the rest."""
    m = _LAYER.match(name)
    return m.group(1) if m else None


def _prepare_lata(passes: Passes, n_inputs: int, params: dict) -> dict:
    dot: dict = defaultdict(float)
    sq: dict = defaultdict(float)
    ref_sq: dict = defaultdict(float)
    for name, deltas, idx, ref in passes():
        layer = layer_of(name)
        if layer is None or ref is None:
            continue
        ref_sq[layer] += float(ref.pow(2).sum())
        for d, i in zip(deltas, idx):
            dot[i, layer] += float((d * ref).sum())
            sq[i, layer] += float(d.pow(2).sum())
    layers = sorted(ref_sq)
    cosines: dict[int, dict[str, float]] = {}
    weights: dict[tuple[int, str], float] = {}
    for i in range(n_inputs):
        cos = {
            layer: dot[i, layer] / math.sqrt(sq[i, layer] * ref_sq[layer])
            if sq[i, layer] > 0 and ref_sq[layer] > 0 else 0.0
            for layer in layers
        }
        cosines[i] = cos
        if params["mode"] == "mask":
            n_keep = max(1, math.ceil(params["keep"] * len(layers)))
            kept = set(sorted(layers, key=lambda layer: cos[layer])[:n_keep])
            for layer in layers:
                weights[i, layer] = 1.0 if layer in kept else 0.0
        else:
            raw = {layer: max(0.0, 1.0 - c) for layer, c in cos.items()}
            mean = sum(raw.values()) / len(raw) if raw else 1.0
            for layer in layers:
                weights[i, layer] = raw[layer] / mean if mean > 0 else 1.0
    return {"cosines": cosines, "layer_weights": weights}


def lata(deltas, weights, ctx, *, lam, mode, keep):
    layer = layer_of(ctx.name)
    if layer is not None and ctx.state is not None:
        scale = [ctx.state["layer_weights"].get((i, layer), 1.0) for i in ctx.inputs]
        weights = weights * torch.tensor(scale, dtype=weights.dtype)
    return weighted_sum(deltas, weights).mul_(lam)



# -- spectral merges of weight matrices (data-free) --------------------------------
def _spectral(deltas) -> bool:
    """Whether a tensor gets the papers' SVD treatment: a 2-D weight matrix (the rest is averaged)."""
    return deltas[0].dim() == 2 and min(deltas[0].shape) > 1


def _weighted_mean(deltas, weights):
    return weighted_sum(deltas, weights).div_(len(deltas))


def iso_c(deltas, weights, ctx, *, lam):
    """Iso-C (Marczak et al., ICML 2025): the summed task matrix M = U S Vᵀ with every singular value
    replaced by their mean, σ̄ U Vᵀ; other tensors are the task vectors' mean; all scaled by λ."""
    if not _spectral(deltas):
        return _weighted_mean(deltas, weights).mul_(lam)
    u, s, vh = torch.linalg.svd(weighted_sum(deltas, weights), full_matrices=False)
    return (u * s.mean()) @ vh * lam


def _orthogonal(basis: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to `basis` (polar factor P Qᵀ of its SVD P Σ Qᵀ)."""
    p, _, qh = torch.linalg.svd(basis, full_matrices=False)
    return p @ qh


def iso_cts(deltas, weights, ctx, *, lam, common):
    """Iso-CTS (Marczak et al., ICML 2025): of the rank r, the top k = r − T·s directions of the summed task
    matrix (the common subspace, k ≈ `common`·r with r − k split evenly, s per task) and, per task, the top s
    singular directions of what its matrix holds outside that subspace (Δ_t − U_k U_kᵀ Δ_t); the stacked bases
    are made orthonormal and given one singular value, the mean of those kept, σ̄ U⊥ V⊥ᵀ; other tensors are
    the task vectors' mean; all scaled by λ."""
    if not _spectral(deltas):
        return _weighted_mean(deltas, weights).mul_(lam)
    tasks = [d * w for d, w in zip(deltas, weights.tolist())]
    rank = min(tasks[0].shape)
    per_task = min(round((rank - int(rank * common)) / len(tasks)), rank // len(tasks))
    k = rank - len(tasks) * per_task
    u, s, vh = torch.linalg.svd(torch.stack(tasks).sum(0), full_matrices=False)
    us, ss, vhs = [u[:, :k]], [s[:k]], [vh[:k]]
    for t in tasks if per_task else []:
        ut, st, vht = torch.linalg.svd(t - us[0] @ (us[0].T @ t), full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    return (_orthogonal(torch.cat(us, dim=1)) * torch.cat(ss).mean()) @ _orthogonal(torch.cat(vhs, dim=0)) * lam


def tsv_m(deltas, weights, ctx, *, lam):
    """TSV-Merge (Gargiulo et al., CVPR 2025): per task the top 1/T of its matrix's singular triplets; the
    stacked left and right bases are made orthonormal (whitened) and the sum rebuilt with the kept singular
    values, U⊥ diag(σ) V⊥ᵀ; other tensors are the task vectors' mean; all scaled by λ."""
    if not _spectral(deltas):
        return _weighted_mean(deltas, weights).mul_(lam)
    keep = max(1, int(min(deltas[0].shape) / len(deltas)))
    us, ss, vhs = [], [], []
    for d, w in zip(deltas, weights.tolist()):
        u, s, vh = torch.linalg.svd(d * w, full_matrices=False)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vhs.append(vh[:keep])
    return (_orthogonal(torch.cat(us, dim=1)) * torch.cat(ss)) @ _orthogonal(torch.cat(vhs, dim=0)) * lam
