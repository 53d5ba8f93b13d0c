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
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.data import Dataset

from mergeguard import scan, settings
from mergeguard.data import stack_images
from mergeguard.defend.settings import LFPMConfig
from mergeguard.errors import MergeguardError, SettingError
from mergeguard.models.encoder import ImageEncoder, check_same_architecture, weights_digest
from mergeguard.progress import NullProgress, ProgressSink
from mergeguard.trainer import (
    Checkpointing,
    TrainConfig,
    all_reduce_mean,
    autocast,
    autocast_dtype,
    fit,
    init_distributed,
    resolve_device,
    seed_everything,
)

# bf16 rounds features to ~3 significant digits: θ0 compared with itself in other batch shapes, or with
# fp32 features, leaves a loss of ~2e-5 × E‖f‖² (tiny zoo), which Adam would turn into lr-sized steps;
# the smallest real loss measured, a clean merge's first step, is ~1e-2 × E‖f‖²
BF16_IDLE_TOLERANCE = 1e-4
FEW_SHADOW = 1000  # the tiny zoo, clean merge, 3 seeds: 512 images cost 2.0-2.9 CA points, 2048 cost 1.3-1.8
log = logging.getLogger(__name__)


def check_config(cfg: LFPMConfig, merged: ImageEncoder, base: ImageEncoder) -> None:
    """One sentence for a setting or an input pair LFPM cannot run with."""
    settings.check(cfg)
    dim = merged.arch["embed_dim"]
    if cfg.subspace_rank > dim:
        raise SettingError("subspace_rank", f"{{name}} {cfg.subspace_rank} exceeds the feature dimension {dim}.")
    check_same_architecture(merged, base, "LFPM")


def fingerprint(cfg: LFPMConfig, merged: ImageEncoder, base: ImageEncoder, shadow_size: int) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the checkpoint: the settings that shape the
    result, the shadow set's size, and a digest of both models' weights (their bytes: exact on any device)."""
    return {**settings.fingerprint(cfg), "shadow_images": shadow_size, "merged_weights": weights_digest(merged),
            "base_weights": weights_digest(base)}


def held_out_count(n: int) -> int:
    """Shadow images kept out of training to measure the clean-feature drift on: an eighth, at most 512,
    none below 64 images."""
    return 0 if n < 64 else min(512, n // 8)


def task_vector_rms(merged: ImageEncoder, base: ImageEncoder) -> float:
    """RMS over every parameter of the merge's own task vector θm − θ0 (fp32)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for p, q in zip(merged.parameters(), base.parameters()):
            total += float((p.float() - q.float()).pow(2).sum())
            count += p.numel()
    return (total / max(count, 1)) ** 0.5


def choose(cfg: LFPMConfig, merged: ImageEncoder, base: ImageEncoder) -> dict[str, dict[str, Any]]:
    """The settings LFPM derives from its inputs where the user left them unset: {name: {value, why}}."""
    if cfg.lr is not None:
        return {"lr": {"value": cfg.lr, "why": "set by the user"}}
    rms = task_vector_rms(merged, base)
    if rms == 0:  # θm = θ0: nothing to remove (every step is idle); any positive step will do
        return {"lr": {"value": 1e-4, "why": "θm = θ0: nothing to remove"}}
    return {"lr": {"value": rms, "why": f"the RMS of the merge's task vector θm − θ0 ({rms:.3g})"}}


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (Unix), for CPU runs."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _paste(images: torch.Tensor, patch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Paste the patch at one random position (the same for the batch)."""
    size, side = images.shape[-1], patch.shape[-1]
    i, j = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
    out = images.clone()
    out[:, :, i:i + side, j:j + side] = patch
    return out


# (x, x⊕Π, grad through θ0?, prompt tokens or None) -> D
Excess = Callable[[torch.Tensor, torch.Tensor, bool, "torch.Tensor | None"], torch.Tensor]


def _log_ascent(e: torch.Tensor, opt: torch.optim.Optimizer, params: list[torch.Tensor],
                penalty: torch.Tensor | float = 0.0) -> float:
    """One optimizer step of the prompt `params` up `log E − penalty`, E = `e`'s mean over the whole
    (all processes') batch; returns E. Call with gradients enabled.

    d(−log E)/dΠ = −(dE/dΠ) / E: −e / E has that gradient here, and averaging it over processes
    gives the global one."""
    (e_all,) = all_reduce_mean([e.detach()])
    loss = -e / (e_all + 1e-12) + penalty
    opt.zero_grad()
    loss.backward()
    for p, g in zip(params, all_reduce_mean([p.grad for p in params])):
        p.grad = g
    opt.step()
    return float(e_all)


class MaskPrompt:
    """Π as a pattern p and a soft mask m over the whole image: x ⊕ Π = (1 − m) x + m p,
    m = σ(a), p = σ(b) — the scan's prompt (`mergeguard.scan.MaskPrompt`, one row). Ascent on
    `log E‖D‖² − c · mean(m)`: the log makes the ascent scale-free, so a weak backdoor (a TIES merge's)
    is found as readily as a strong one, and the mask penalty keeps Π trigger-sized. On a clean merge it
    finds only θ0-like reactions, whose excess is small, so τa barely moves."""

    def __init__(self, size: int, cfg: LFPMConfig, gen: torch.Generator, dev: torch.device):
        self.prompt = scan.MaskPrompt(1, size, cfg.patch_lr, gen, dev, start=-3.0)
        self.penalty = cfg.mask_penalty

    def start_from(self, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        """Start at a given mask (1, H, W) and pattern (3, H, W) in [0, 1]: a trigger the scan recovered."""
        eps = 1e-3
        with torch.no_grad():
            self.prompt.a[0].copy_(torch.logit(mask.float().clamp(eps, 1 - eps)).to(self.prompt.a.device))
            self.prompt.b[0].copy_(torch.logit(pattern.float().clamp(eps, 1 - eps)).to(self.prompt.b.device))

    def apply(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return self.prompt.apply(x, grad, row=0)

    def ascend(self, excess: Excess, x: torch.Tensor) -> float:
        with torch.enable_grad():
            e = excess(x, self.apply(x, grad=True), True, None).float().pow(2).sum(1).mean()
            return _log_ascent(e, self.prompt.opt, [self.prompt.a, self.prompt.b],
                               self.penalty * self.prompt.mask(grad=True).mean())

    def area(self) -> float:
        return float(self.prompt.area()[0])

    def tokens(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        state = self.prompt.state_dict()  # the saved shapes of an older run: (1, H, W) and (3, H, W)
        return {**state, "a": state["a"][0], "b": state["b"][0]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompt.load_state_dict({**state, "a": state["a"][None], "b": state["b"][None]})

    def save(self) -> dict[str, torch.Tensor]:
        return {"mask": self.prompt.mask()[0].cpu(), "pattern": self.prompt.pattern()[0].cpu()}


class PatchPrompt:
    """Π as a small square patch pasted at a random position each time (the seeds' universal
    patch); sign ascent on E‖D‖² with θ0's reaction taken without gradient."""

    def __init__(self, size: int, cfg: LFPMConfig, gen: torch.Generator, dev: torch.device):
        side = max(1, round(cfg.patch_fraction * size))
        self.size = size
        self.patch = torch.rand(3, side, side, generator=gen).to(dev)
        self.gen, self.lr = gen, cfg.patch_lr

    def _position(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,), generator=self.gen)))

    def apply(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return _paste(x, self.patch, self._position())

    def ascend(self, excess: Excess, x: torch.Tensor) -> float:
        with torch.enable_grad():
            p = self.patch.clone().requires_grad_(True)
            e = excess(x, _paste(x, p, self._position()), False, None).float().pow(2).sum(1).mean()
            (grad,) = torch.autograd.grad(e, p)
        grad, e = all_reduce_mean([grad, e.detach()])
        self.patch = (self.patch + self.lr * grad.sign()).clamp(0, 1)
        return float(e)

    def area(self) -> float:
        return self.patch.shape[-1] ** 2 / self.size ** 2  # the patch's share of the image

    def tokens(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"patch": self.patch.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.patch = state["patch"].to(self.patch.device)

    def save(self) -> dict[str, torch.Tensor]:
        return {"patch": self.patch.detach().cpu()}


class TokenPrompt:
    """Π as P learnable tokens (VPT) inserted after the class token, before `ln_pre` (which
    normalises each token, so only their directions matter): the image is untouched and the
    prompt acts inside the network. Ascent as the mask's, on `log E‖D‖²` (Adam)."""

    def __init__(self, cfg: LFPMConfig, gen: torch.Generator, dev: torch.device, width: int):
        self.t = torch.randn(max(1, cfg.prompt_tokens), width, generator=gen).to(dev).requires_grad_(True)
        self.opt = torch.optim.Adam([self.t], lr=cfg.patch_lr)

    def apply(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return x

    def tokens(self, grad: bool = False) -> torch.Tensor:
        return self.t if grad else self.t.detach()

    def ascend(self, excess: Excess, x: torch.Tensor) -> float:
        with torch.enable_grad():
            e = excess(x, x, True, self.t).float().pow(2).sum(1).mean()
            return _log_ascent(e, self.opt, [self.t])

    def area(self) -> None:
        return None  # no pixels

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t.detach().cpu(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.t.copy_(state["t"])
        self.opt.load_state_dict(state["opt"])

    def save(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.t.detach().cpu()}


class PromptPool:
    """Several mined prompts, checkpointed together."""

    def __init__(self, prompts: list):
        self.prompts = prompts
        self.mined: list[float] = []  # E‖D‖² of each prompt after stage I (the report's, kept for a resume)
        self.fresh = 0  # prompts mined anew during stage II (`fresh_prompt_every`)

    def state_dict(self) -> dict[str, Any]:
        return {"mined": torch.tensor(self.mined), "fresh": self.fresh,
                **{str(i): p.state_dict() for i, p in enumerate(self.prompts)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mined = state["mined"].tolist()
        self.fresh = int(state.get("fresh", 0))
        for i, p in enumerate(self.prompts):
            p.load_state_dict(state[str(i)])


def trigger_direction(merged: ImageEncoder, base: ImageEncoder, images: torch.Tensor,
                      apply: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The unit feature direction a trigger moves the merge's features in, beyond θ0's reaction to it: the mean
    of (f_θm(x⊕t) − f_θm(x)) − (f_θ0(x⊕t) − f_θ0(x)) over `images`, normalised (fp32)."""
    total, dev = None, next(merged.parameters()).device
    for chunk in images.split(256):
        chunk = chunk.to(dev)
        xp = apply(chunk)
        excess = ((merged(xp) - merged(chunk)) - (base(xp) - base(chunk))).float().sum(0)
        total = excess if total is None else total + excess
    return total / total.norm().clamp_min(1e-12)


def restore_decision(merged: ImageEncoder, base: ImageEncoder, images: torch.Tensor, trigger: Any,
                     head: Any) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Whether to give the merge's move along the trigger's direction back to θ0, decided on the shadow images
    under the suspected target's head: yes when θ0's component there sends fewer of them to the target class
    than the merge's does (the move was towards the target: a poisoned vector's confusion), no otherwise (the
    move carries the task's own learning, as when the poisoned vector is the target task's). Returns
    (direction or None, {value, why})."""
    with torch.no_grad():
        direction = trigger_direction(merged, base, images, trigger.apply)
        dev = direction.device
        hits_m = hits_r = 0  # shadow images sent to the target: by the merge's features, by the restored ones
        for chunk in images.split(256):
            chunk = chunk.to(dev)
            f_m, f_0 = merged(chunk).float(), base(chunk).float()
            hits_m += int((head.logits(f_m).argmax(1) == trigger.target_class).sum())
            hits_r += int((head.logits(keep_base_along(f_m, f_0, direction)).argmax(1) == trigger.target_class).sum())
    share_m, share_r = hits_m / len(images), hits_r / len(images)
    name = f"{trigger.target_task}:{trigger.target_class}"
    if share_r < share_m:
        return direction, {"value": name, "why": f"the scan's most suspicious target; along its trigger's direction "
                                                 f"the clean features are kept as θ0's: that sends {share_r:.1%} of "
                                                 f"the shadow images to it, the merge's {share_m:.1%}"}
    return None, {"value": None, "why": f"not restored: along the direction of {name}'s trigger θ0's features would "
                                        f"send {share_r:.1%} of the shadow images to it, not fewer than the merge's "
                                        f"{share_m:.1%}"}


def keep_base_along(features: torch.Tensor, base_features: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`features` with their component along the unit `direction` replaced by `base_features`' (fp32)."""
    f = features.float()
    return f - ((f - base_features.float()) @ direction)[:, None] * direction[None]


def _project(deviation: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    return deviation if basis is None else deviation @ basis @ basis.T


def defend_lfpm(
    merged: ImageEncoder,
    base: ImageEncoder,
    shadow: Dataset | torch.Tensor,
    cfg: LFPMConfig,
    progress: ProgressSink | None = None,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    starts: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    restore: torch.Tensor | None = None,
) -> tuple[ImageEncoder, dict[str, torch.Tensor], dict[str, Any]]:
    """Returns (defended model θm + τa, τa as {name: tensor}, report). `shadow`: unlabeled images, as a dataset
    of (image, label) pairs or already stacked (N, 3, H, W). `starts`: (mask, pattern) of fixed mask
    prompts (the scan's triggers); `restore`: a unit feature direction along which the clean features are
    preserved as θ0's instead of θm's (`restore_decision`).

    With `checkpoint`, the state (τa, optimizer, prompt, random generators) is saved every tenth
    of the run; `resume=True` continues from it to the same result.
    """
    progress = progress or NullProgress()
    if len(shadow) == 0:
        raise MergeguardError("the shadow image folder is empty.")
    check_config(cfg, merged, base)
    rank, world = init_distributed()  # under torchrun: each process trains on its share of every batch
    if len(shadow) < FEW_SHADOW and rank == 0:
        log.warning("only %d shadow images: with fewer than %s the clean-feature preservation fits them and the "
                    "defended model loses more accuracy (the paper uses 10,000).", len(shadow), f"{FEW_SHADOW:,}")
    if cfg.batch_size % world:
        raise SettingError("batch_size", f"{{name}} {cfg.batch_size} must divide evenly over {world} processes.")
    if rank != 0:
        progress = NullProgress()  # one progress display, the first process's
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    start = time.perf_counter()
    merged, base = merged.to(dev).eval(), base.to(dev).eval()
    base_flags = [p.requires_grad for p in base.parameters()]
    for p in list(merged.parameters()) + list(base.parameters()):
        p.requires_grad_(False)
    images = (shadow if isinstance(shadow, torch.Tensor) else stack_images(shadow, cfg.workers)).to(dev)
    held = held_out_count(len(images))  # never trained on: the clean-feature drift is measured on them
    images, check = (images[:-held], images[-held:]) if held else (images, images[:0])
    with torch.no_grad(), autocast(dev):  # θm's clean features, once, in the precision stage II compares them in
        clean_target = torch.cat([merged(chunk) for chunk in images.split(256)])
    tolerance = cfg.idle_tolerance if autocast_dtype(dev) is None else max(cfg.idle_tolerance, BF16_IDLE_TOLERANCE)
    idle = tolerance * float(clean_target.float().pow(2).sum(1).mean())
    theta_m = {n: p.detach() for n, p in merged.named_parameters()}
    chosen = choose(cfg, merged, base)
    with torch.no_grad():
        check_m = merged(check) if held else None
        shift = float((check_m - base(check)).pow(2).sum(1).mean()) if held else 0.0
    drift_log: list[float] = []

    def drift_now() -> float | None:
        """E‖f_θ(x) − f_θm(x)‖² on the held-out images at θ = θm + τa, as a fraction of the merge's own shift
        E‖f_θm(x) − f_θ0(x)‖² (1: the clean features moved as far as merging moved them from θ0)."""
        if not held or shift == 0:
            return None
        params = {n: theta_m[n] + tau[n].detach() for n in theta_m}
        # fp32 like check_m, also when called from inside the trainer core's bf16 autocast (each epoch, on a GPU)
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            f = functional_call(merged, params, (check,))
        return float((f - check_m).pow(2).sum(1).mean()) / shift
    tau = {n: torch.zeros_like(p, requires_grad=True) for n, p in theta_m.items()}
    gen = torch.Generator().manual_seed(cfg.seed)

    def make_prompt():
        if cfg.prompt == "tokens":
            return TokenPrompt(cfg, gen, dev, merged.width)
        return (MaskPrompt if cfg.prompt == "mask" else PatchPrompt)(merged.image_size, cfg, gen, dev)

    # the scan's recovered triggers (mask prompts only), first and fixed: they are the scan's answer, not re-mined;
    # then `cfg.prompts` mined ones, which follow what the fixed ones miss (docs/lfpm.md)
    seeded = [] if cfg.prompt != "mask" else [MaskPrompt(merged.image_size, cfg, gen, dev) for _ in starts or []]
    for prompt, (mask, pattern) in zip(seeded, starts or []):
        prompt.start_from(mask, pattern)
    pool = PromptPool(seeded + [make_prompt() for _ in range(max(1, cfg.prompts))])
    fixed = set(range(len(seeded)))
    free = [i for i in range(len(pool.prompts)) if i not in fixed]  # mined prompts
    steps_per_epoch = max(1, len(images) // cfg.batch_size)
    steps = cfg.epochs * steps_per_epoch
    alphas = [(k + 1) / cfg.path_points for k in range(cfg.path_points)]
    state: dict[str, Any] = {}

    def at(alpha: float, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        params = {n: theta_m[n] + alpha * tau[n] for n in theta_m}
        return functional_call(merged, params, (x,), {"prompts": tokens})

    def excess_now(x: torch.Tensor, xp: torch.Tensor, grad_base: bool,
                   tokens: torch.Tensor | None = None) -> torch.Tensor:
        """D(x) at the current θ(1) = θm + τa (no gradient into τa)."""
        params = {n: theta_m[n] + tau[n].detach() for n in theta_m}
        with torch.no_grad():
            clean_now = functional_call(merged, params, (x,))
            base_clean = base(x)
        with torch.set_grad_enabled(grad_base):
            base_reaction = base(xp, tokens) - base_clean
        return (functional_call(merged, params, (xp,), {"prompts": tokens}) - clean_now) - base_reaction

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        # every process draws the same global batch and keeps its contiguous share: the gradients
        # averaged by the trainer core (and by the prompt's ascent) are the global batch's
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen).tensor_split(world)[rank]
        return images[idx.to(dev)], idx

    if restore is not None:  # along this direction θ0's clean features, the merge's elsewhere
        direction = restore.to(dev).float()
        with torch.no_grad(), autocast(dev):
            for lo in range(0, len(images), 256):
                clean_target[lo:lo + 256] = keep_base_along(clean_target[lo:lo + 256], base(images[lo:lo + 256]),
                                                            direction).to(clean_target.dtype)

    ck = None
    if checkpoint is not None:
        ck = Checkpointing(checkpoint, every=cfg.checkpoint_every or max(1, steps // 10), resume=resume,
                           generators={"lfpm": gen}, extra=pool,
                           fingerprint=fingerprint(cfg, merged, base, len(images)), keep=True)

    def mine(prompt, advance: Callable[[], None] = lambda: None) -> float | None:
        e = None
        for _ in range(cfg.mine_warmup):
            with autocast(dev):  # bf16 on GPU, as stage II's re-mining inside the trainer core
                e = prompt.ascend(excess_now, batch()[0])
            advance()
        return e

    if not (ck and resume and checkpoint.exists()):  # stage I: mine the prompt before τa moves
        progress.stage("LFPM stage I: mining the visual prompts", cfg.mine_warmup * len(free))
        for i, prompt in enumerate(pool.prompts):
            if i in fixed:  # its excess as it starts
                x = batch()[0]
                with torch.no_grad(), autocast(dev):
                    e = float(excess_now(x, prompt.apply(x), False, None).float().pow(2).sum(1).mean())
            else:
                e = mine(prompt, progress.advance)
            if e is not None:
                pool.mined.append(e)
    fresh_every = cfg.fresh_prompt_every * steps_per_epoch

    def loss_at(step: int) -> torch.Tensor:
        if step and step % steps_per_epoch == 0:
            drift_log.append(drift_now())  # after each epoch but the last (that one is the report's "drift")
        if fresh_every and free and step and step % fresh_every == 0:
            # a prompt that has followed τa for a while can sit in a pattern τa has already suppressed while
            # the backdoor returns elsewhere (the preservation term pulls τa back towards θm): replace one,
            # in turn, by a prompt mined from scratch against the current model (docs/lfpm-log.md, ninth round)
            i = free[(step // fresh_every - 1) % len(free)]
            pool.prompts[i] = make_prompt()
            mine(pool.prompts[i])
            pool.fresh += 1
        x, idx = batch()
        prompt = pool.prompts[step % len(pool.prompts)]
        for _ in range(0 if step % len(pool.prompts) in fixed else cfg.mine_steps):  # (1) re-mine it against θ(1)
            prompt.ascend(excess_now, x)
        xp, tokens = prompt.apply(x), prompt.tokens()
        with torch.no_grad():
            base_reaction = cfg.reference * (base(xp, tokens) - base(x))
        basis = None
        total = 0.0
        for alpha in alphas:  # (2) loss path integral: one backward per point, accumulated in τa
            if tokens is None:  # one forward for the clean and the prompted images
                feats = at(alpha, torch.cat([x, xp]))
                clean_f, trig_f = feats[: len(x)], feats[len(x):]
            else:  # prompt tokens change the sequence length: two forwards
                clean_f, trig_f = at(alpha, x), at(alpha, x, tokens)
            excess = (trig_f - clean_f) - base_reaction
            if cfg.subspace_rank and basis is None:
                _, _, v = torch.linalg.svd(excess.detach().float(), full_matrices=False)
                basis = v[: cfg.subspace_rank].T.to(excess.dtype)
            loss_bd = _project(excess, basis).float().pow(2).sum(1).mean()
            loss_cl = (clean_f.float() - clean_target[idx.to(dev)].float()).pow(2).sum(1).mean()
            loss = (loss_bd + cfg.beta * loss_cl) / len(alphas)
            if alpha != alphas[-1]:
                loss.backward()
                total += float(loss.detach())
            else:
                state["last"] = total + float(loss.detach())
                # nothing to remove (θm = θ0, or τa has done its work): the gradients are rounding
                # noise, which Adam would turn into lr-sized steps; leave τa where it is
                (whole,) = all_reduce_mean([torch.tensor(state["last"])])  # every process decides alike
                if float(whole) < idle:
                    state["idle"] = state.get("idle", 0) + 1
                    for t in tau.values():
                        t.grad = None
                    return 0.0 * sum(t.sum() for t in tau.values())  # zero gradients, no backward through θ
                return loss  # (3) the trainer core runs the last backward and the optimizer step
        raise AssertionError("unreachable")

    train_cfg = TrainConfig(steps=steps, lr=chosen["lr"]["value"], weight_decay=0.0, warmup=max(1, steps // 20),
                            seed=cfg.seed, device=str(dev), grad_clip=1.0, eps=cfg.adam_eps)
    history = fit(list(tau.values()), loss_at, train_cfg, progress, "LFPM stage II: anti-backdoor task vector", ck)
    if not all(bool(torch.isfinite(t).all()) for t in tau.values()):
        raise SettingError("lr", "LFPM diverged: the anti-backdoor vector holds NaN or Inf values; try a smaller "
                                 f"{{name}} than {chosen['lr']['value']:g}.")
    with torch.no_grad():  # λ_eff in fp32 throughout: its target too (clean_target may be bf16 on a GPU)
        probe = (images[: cfg.batch_size], merged(images[: cfg.batch_size]))
    lam_start = curvature(merged, theta_m, tau, *probe, at_start=True)
    lam_end = curvature(merged, theta_m, tau, *probe)
    with torch.no_grad():
        x = images[: cfg.batch_size]
        final_excess = [float(excess_now(x, pr.apply(x), False, pr.tokens()).float().pow(2).sum(1).mean())
                        for pr in pool.prompts]
    defended = copy.deepcopy(merged)
    with torch.no_grad():
        for n, p in defended.named_parameters():
            p.copy_(theta_m[n] + tau[n].detach())
    for p, flag in zip(base.parameters(), base_flags):
        p.requires_grad_(flag)
    seconds = time.perf_counter() - start
    per_epoch = [sum(history[e * steps_per_epoch:(e + 1) * steps_per_epoch]) / steps_per_epoch
                 for e in range(cfg.epochs)]
    resumed_at = ck.resumed_at if ck else 0
    report = {
        "config": asdict(cfg),
        "chosen": chosen,  # the settings LFPM derived from the inputs, each with why
        "steps": steps,
        "epochs_run": cfg.epochs,
        "stopped": f"ran the {cfg.epochs} epochs it was given",
        "resumed_at_step": resumed_at,  # 0: one uninterrupted run; `seconds` counts this process only
        "loss_per_epoch": per_epoch,
        "mined_excess_start": pool.mined or None,  # E‖D‖² of each prompt after stage I
        "mined_excess_end": final_excess,  # the final prompts' excess on the defended model
        "fresh_prompts": pool.fresh,  # prompts mined anew during stage II
        "prompt_area": [pr.area() for pr in pool.prompts],
        "lambda_eff_start": lam_start,
        "lambda_eff_end": lam_end,
        "drift": drift_now(),  # clean-feature drift on the held-out shadow images, relative to the merge's shift
        "drift_per_epoch": drift_log,  # the same after each epoch but the last (this process's, after a resume)
        "held_out_images": held,
        "restored_directions": int(restore is not None),  # 1: clean features kept as θ0's along one direction
        "tau_norm": float(torch.sqrt(sum(t.detach().pow(2).sum() for t in tau.values()))),
        "idle_steps": state.get("idle", 0),  # steps with nothing to remove, which left τa as it was
        "seconds": seconds,
        "images_per_second": (steps - resumed_at) * cfg.batch_size / seconds,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    report["prompt"] = {f"{i}.{k}": v for i, pr in enumerate(pool.prompts) for k, v in pr.save().items()}
    return defended.requires_grad_(True), {n: t.detach().cpu() for n, t in tau.items()}, report


def unchanged(merged: ImageEncoder, cfg: LFPMConfig, chosen: dict[str, Any], why: str
              ) -> tuple[ImageEncoder, dict[str, torch.Tensor], dict[str, Any]]:
    """LFPM's result when it stops before training: the merge itself, τa = 0, and a report of the same form."""
    start = time.perf_counter()
    defended = copy.deepcopy(merged).cpu()
    tau = {n: torch.zeros_like(p, device="cpu") for n, p in defended.named_parameters()}
    report = {
        "config": asdict(cfg), "chosen": chosen, "steps": 0, "epochs_run": 0, "stopped": why, "resumed_at_step": 0,
        "loss_per_epoch": [], "mined_excess_start": None, "mined_excess_end": [], "fresh_prompts": 0,
        "prompt_area": [], "lambda_eff_start": None, "lambda_eff_end": None, "drift": 0.0, "drift_per_epoch": [],
        "held_out_images": 0, "restored_directions": 0, "tau_norm": 0.0, "idle_steps": 0,
        "seconds": time.perf_counter() - start, "images_per_second": 0.0, "peak_gpu_memory_bytes": None,
        "peak_rss_bytes": peak_rss_bytes(), "prompt": {},
    }
    return defended, tau, report


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


def defend_lfpm_scanned(merged: ImageEncoder, base: ImageEncoder, shadow: Dataset, cfg: LFPMConfig,
                        heads: dict, scan_cfg: scan.ScanConfig, progress: ProgressSink | None = None, *,
                        checkpoint: Path | None = None, resume: bool = False
                        ) -> tuple[ImageEncoder, dict[str, torch.Tensor], dict[str, Any]]:
    """LFPM guided and checked by the scan (the user's heads): the merged model is scanned first, the triggers it
    recovered for the `cfg.prompts` most suspicious targets join LFPM's mined prompts (as fixed prompts), and the
    defended model is scanned again; the report's "scan" holds both and "chosen" the added prompts."""
    images = stack_images(shadow, cfg.workers)  # decoded once, for the scan and for LFPM
    scanner = scan.Scanner(base, images, heads, scan_cfg, progress)
    before = scanner.scan(merged, "the merged model")
    # the targets the scan finds suspicious on their own (log area ratio over its `suspicious` threshold, which
    # was calibrated on clean vectors), the most suspicious first, as many as mined prompts
    ranked = before.pop("_suspects")
    suspects = [t for r, t in ranked if r >= scan_cfg.suspicious][: cfg.prompts] if cfg.prompt == "mask" else []
    starts = [(t.mask, t.pattern) for t in suspects]
    largest = ranked[0][0] if ranked else float("-inf")
    if largest < scan_cfg.suspicious and not cfg.force:  # the scan finds nothing to remove: stop before training
        why = (f"the scan finds no suspicious target in the merged model (largest log area ratio {largest:.2f} < "
               f"{scan_cfg.suspicious:g}): nothing to remove, the merge is returned unchanged (--force runs anyway)")
        defended, tau, report = unchanged(merged, cfg, choose(cfg, merged, base), why)
        after = before
    else:
        direction, restored = None, None
        if cfg.restore and suspects:
            direction, restored = restore_decision(merged.to(scanner.dev), base.to(scanner.dev), images, suspects[0],
                                                   heads[suspects[0].target_task])
        defended, tau, report = defend_lfpm(merged, base, images, cfg, progress, checkpoint=checkpoint,
                                            resume=resume, starts=starts, restore=direction)
        if restored:
            report["chosen"]["restore"] = restored
        after = scanner.scan(defended, "the defended model")
    if suspects:
        names = [f"{t.target_task}:{t.target_class}" for t in suspects]
        report["chosen"]["scan_prompts"] = {
            "value": names, "why": "the triggers the scan recovered from the merged model whose log area ratio "
                                   f"reached the scan's suspicious threshold {scan_cfg.suspicious:g}, most "
                                   "suspicious first"}
    elif cfg.prompt == "mask":
        report["chosen"]["scan_prompts"] = {
            "value": [], "why": f"no target of the merged model reached the scan's suspicious threshold "
                                f"{scan_cfg.suspicious:g} (largest log area ratio {largest:.2f})"}

    def keep(r: dict[str, Any]) -> dict[str, Any]:
        return {k: r[k] for k in ("score", "verdict", "target", "area", "area_base", "where")}

    report["scan"] = {"before": keep(before), "after": keep(after), "config": scanner.report_config()}
    return defended, tau, report
