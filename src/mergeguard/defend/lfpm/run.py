"""LFPM: an anti-backdoor task vector τa, optimised in feature space on unlabeled shadow images.

The project's reading of the seeds (ALGORITHMS.md; docs/lfpm.md for what it decides):

- Stage I (`LFPMRun.stage_one`): visual prompts Π (`prompts.py`) ascend the merged model's *excess* feature
  reaction over θ0's: `D(x; θ) = (f_θ(x⊕Π) − f_θ(x)) − (f_θ0(x⊕Π) − f_θ0(x))` (θ0's reaction without gradient).
  With `subspace_rank`, the top directions of D span the adversarial subspace `Ps` (0: all of it).
- Stage II (`LFPMRun.loss_at`, one step): `θ(α) = θm + α τa`, τa from 0; minimise the loss path integral over
  K points `α_k = k/K`: `(1/K) Σ_k [ E‖Ps D(x; θ(α_k))‖² + β E‖f_θ(α_k)(x) − f_θm(x)‖² ]`, one backward per
  point accumulated into τa (memory of one model). θm's clean features are computed once.
- At the end the curvature along τa, `λ_eff = τaᵀ H τa / ‖τa‖²`, by one Hessian-vector product.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.data import Dataset

from mergeguard import settings
from mergeguard.data import stack_images
from mergeguard.defend.lfpm.prompts import MaskPrompt, PromptPool, make_prompt
from mergeguard.defend.lfpm.report import LFPMReport
from mergeguard.defend.lfpm.settings import LFPMConfig
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
    peak_rss_bytes,
    resolve_device,
    seed_everything,
)

# bf16 rounds features to ~3 significant digits: θ0 compared with itself in other batch shapes, or with
# fp32 features, leaves a loss of ~2e-5 × E‖f‖², which Adam would turn into lr-sized steps; the smallest
# real loss measured, a clean merge's first step, is ~1e-2 × E‖f‖² (bench/RESULTS.md)
BF16_IDLE_TOLERANCE = 1e-4
# below this many shadow images the clean-feature preservation fits them and costs accuracy (bench/RESULTS.md)
FEW_SHADOW = 1000
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


def keep_base_along(features: torch.Tensor, base_features: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`features` with their component along the unit `direction` replaced by `base_features`' (fp32)."""
    f = features.float()
    return f - ((f - base_features.float()) @ direction)[:, None] * direction[None]


def _project(deviation: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    return deviation if basis is None else deviation @ basis @ basis.T


class LFPMRun:
    """One LFPM run: its inputs on the device, τa, the prompts, the random generator and what it logs. Stage I
    (`stage_one`), stage II's loss (`loss_at`, one step, for the trainer core) and the result (`result`)."""

    def __init__(self, merged: ImageEncoder, base: ImageEncoder, images: torch.Tensor, cfg: LFPMConfig,
                 dev: torch.device, rank: int, world: int, starts: list[tuple[torch.Tensor, torch.Tensor]],
                 restore: torch.Tensor | None):
        self.cfg, self.dev, self.rank, self.world = cfg, dev, rank, world
        self.merged, self.base = merged.to(dev).eval(), base.to(dev).eval()
        self.base_flags = [p.requires_grad for p in self.base.parameters()]
        for p in list(self.merged.parameters()) + list(self.base.parameters()):
            p.requires_grad_(False)
        images = images.to(dev)
        self.held = held_out_count(len(images))  # never trained on: the clean-feature drift is measured on them
        self.images, self.check = (images[:-self.held], images[-self.held:]) if self.held else (images, images[:0])
        with torch.no_grad(), autocast(dev):  # θm's clean features, once, in the precision stage II compares in
            self.clean_target = torch.cat([self.merged(chunk) for chunk in self.images.split(256)])
        bf16 = autocast_dtype(dev) is not None
        tolerance = max(cfg.idle_tolerance, BF16_IDLE_TOLERANCE) if bf16 else cfg.idle_tolerance
        self.idle = tolerance * float(self.clean_target.float().pow(2).sum(1).mean())
        self.theta_m = {n: p.detach() for n, p in self.merged.named_parameters()}
        self.chosen = choose(cfg, self.merged, self.base)
        with torch.no_grad():
            self.check_m = self.merged(self.check) if self.held else None
            self.shift = float((self.check_m - self.base(self.check)).pow(2).sum(1).mean()) if self.held else 0.0
        self.drift_log: list[float | None] = []
        self.tau = {n: torch.zeros_like(p, requires_grad=True) for n, p in self.theta_m.items()}
        self.gen = torch.Generator().manual_seed(cfg.seed)
        # the scan's recovered triggers (mask prompts only), first and fixed: they are the scan's answer, not
        # re-mined; then `cfg.prompts` mined ones, which follow what the fixed ones miss (docs/lfpm.md)
        seeded = [MaskPrompt(self.merged.image_size, cfg, self.gen, dev) for _ in starts] if cfg.prompt == "mask" \
            else []
        for prompt, (mask, pattern) in zip(seeded, starts):
            prompt.start_from(mask, pattern)
        self.pool = PromptPool(seeded + [self.new_prompt() for _ in range(max(1, cfg.prompts))])
        self.fixed = set(range(len(seeded)))
        self.free = [i for i in range(len(self.pool.prompts)) if i not in self.fixed]  # mined prompts
        self.steps_per_epoch = max(1, len(self.images) // cfg.batch_size)
        self.steps = cfg.epochs * self.steps_per_epoch
        self.alphas = [(k + 1) / cfg.path_points for k in range(cfg.path_points)]
        self.idle_steps = 0
        self.restored = restore is not None
        if restore is not None:
            self.restore_along(restore.to(dev).float())

    def new_prompt(self) -> Any:
        return make_prompt(self.cfg, self.gen, self.dev, self.merged.image_size, self.merged.width)

    def restore_along(self, direction: torch.Tensor) -> None:
        """Preserve θ0's clean features along `direction`, the merge's elsewhere."""
        with torch.no_grad(), autocast(self.dev):
            for lo in range(0, len(self.images), 256):
                chunk = self.clean_target[lo:lo + 256]
                self.clean_target[lo:lo + 256] = keep_base_along(chunk, self.base(self.images[lo:lo + 256]),
                                                                 direction).to(chunk.dtype)

    def drift(self) -> float | None:
        """E‖f_θ(x) − f_θm(x)‖² on the held-out images at θ = θm + τa, as a fraction of the merge's own shift
        E‖f_θm(x) − f_θ0(x)‖² (1: the clean features moved as far as merging moved them from θ0)."""
        if not self.held or self.shift == 0:
            return None
        params = {n: self.theta_m[n] + self.tau[n].detach() for n in self.theta_m}
        # fp32 like check_m, also when called from inside the trainer core's bf16 autocast (each epoch, on a GPU)
        with torch.no_grad(), torch.autocast(self.dev.type, enabled=False):
            f = functional_call(self.merged, params, (self.check,))
        return float((f - self.check_m).pow(2).sum(1).mean()) / self.shift

    def at(self, alpha: float, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Features at θ(α) = θm + α τa, with the gradient into τa."""
        params = {n: self.theta_m[n] + alpha * self.tau[n] for n in self.theta_m}
        return functional_call(self.merged, params, (x,), {"prompts": tokens})

    def excess(self, x: torch.Tensor, xp: torch.Tensor, grad_base: bool,
               tokens: torch.Tensor | None = None) -> torch.Tensor:
        """D(x) at the current θ(1) = θm + τa (no gradient into τa)."""
        params = {n: self.theta_m[n] + self.tau[n].detach() for n in self.theta_m}
        with torch.no_grad():
            clean_now = functional_call(self.merged, params, (x,))
            base_clean = self.base(x)
        with torch.set_grad_enabled(grad_base):
            base_reaction = self.base(xp, tokens) - base_clean
        return (functional_call(self.merged, params, (xp,), {"prompts": tokens}) - clean_now) - base_reaction

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # every process draws the same global batch and keeps its contiguous share: the gradients
        # averaged by the trainer core (and by the prompt's ascent) are the global batch's
        idx = torch.randint(len(self.images), (self.cfg.batch_size,), generator=self.gen)
        idx = idx.tensor_split(self.world)[self.rank]
        return self.images[idx.to(self.dev)], idx

    def mine(self, prompt: Any, advance: Any = None) -> float | None:
        e = None
        for _ in range(self.cfg.mine_warmup):
            with autocast(self.dev):  # bf16 on GPU, as stage II's re-mining inside the trainer core
                e = prompt.ascend(self.excess, self.batch()[0])
            if advance is not None:
                advance()
        return e

    def stage_one(self, progress: ProgressSink) -> None:
        """Mine the prompts before τa moves (the fixed ones: their excess as they start)."""
        progress.stage("LFPM stage I: mining the visual prompts", self.cfg.mine_warmup * len(self.free))
        for i, prompt in enumerate(self.pool.prompts):
            if i in self.fixed:
                x = self.batch()[0]
                with torch.no_grad(), autocast(self.dev):
                    e = float(self.excess(x, prompt.apply(x), False, None).float().pow(2).sum(1).mean())
            else:
                e = self.mine(prompt, progress.advance)
            if e is not None:
                self.pool.mined.append(e)

    def refresh(self, step: int) -> None:
        """Every `fresh_prompt_every` epochs, replace one mined prompt (in turn) by one mined from scratch against
        the current model: a prompt that has followed τa for a while can sit in a pattern τa has already
        suppressed while the backdoor returns elsewhere (the preservation term pulls τa back towards θm)."""
        every = self.cfg.fresh_prompt_every * self.steps_per_epoch
        if every and self.free and step and step % every == 0:
            i = self.free[(step // every - 1) % len(self.free)]
            self.pool.prompts[i] = self.new_prompt()
            self.mine(self.pool.prompts[i])
            self.pool.fresh += 1

    def point_loss(self, alpha: float, x: torch.Tensor, xp: torch.Tensor, tokens: torch.Tensor | None,
                   idx: torch.Tensor, base_reaction: torch.Tensor, basis: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One point of the loss path integral, and the adversarial subspace's basis (found at the first)."""
        if tokens is None:  # one forward for the clean and the prompted images
            feats = self.at(alpha, torch.cat([x, xp]))
            clean_f, trig_f = feats[: len(x)], feats[len(x):]
        else:  # prompt tokens change the sequence length: two forwards
            clean_f, trig_f = self.at(alpha, x), self.at(alpha, x, tokens)
        excess = (trig_f - clean_f) - base_reaction
        if self.cfg.subspace_rank and basis is None:
            _, _, v = torch.linalg.svd(excess.detach().float(), full_matrices=False)
            basis = v[: self.cfg.subspace_rank].T.to(excess.dtype)
        loss_bd = _project(excess, basis).float().pow(2).sum(1).mean()
        loss_cl = (clean_f.float() - self.clean_target[idx.to(self.dev)].float()).pow(2).sum(1).mean()
        return (loss_bd + self.cfg.beta * loss_cl) / len(self.alphas), basis

    def loss_at(self, step: int) -> torch.Tensor:
        """Stage II, one step: (1) re-mine this step's prompt against θ(1), (2) every point of the path integral
        but the last backpropagated into τa here, (3) the last one returned for the trainer core."""
        if step and step % self.steps_per_epoch == 0:
            self.drift_log.append(self.drift())  # after each epoch but the last (that one is the report's)
        self.refresh(step)
        x, idx = self.batch()
        prompt = self.pool.prompts[step % len(self.pool.prompts)]
        for _ in range(0 if step % len(self.pool.prompts) in self.fixed else self.cfg.mine_steps):
            prompt.ascend(self.excess, x)
        xp, tokens = prompt.apply(x), prompt.tokens()
        with torch.no_grad():
            base_reaction = self.cfg.reference * (self.base(xp, tokens) - self.base(x))
        basis, total = None, 0.0
        for alpha in self.alphas[:-1]:
            loss, basis = self.point_loss(alpha, x, xp, tokens, idx, base_reaction, basis)
            loss.backward()
            total += float(loss.detach())
        loss, _ = self.point_loss(self.alphas[-1], x, xp, tokens, idx, base_reaction, basis)
        # nothing to remove (θm = θ0, or τa has done its work): the gradients are rounding noise, which Adam
        # would turn into lr-sized steps; leave τa where it is
        (whole,) = all_reduce_mean([torch.tensor(total + float(loss.detach()))])  # every process decides alike
        if float(whole) < self.idle:
            self.idle_steps += 1
            for t in self.tau.values():
                t.grad = None
            return 0.0 * sum(t.sum() for t in self.tau.values())  # zero gradients, no backward through θ
        return loss

    def train(self, progress: ProgressSink, checkpoint: Path | None, resume: bool) -> tuple[list[float], int]:
        """Both stages (stage I skipped when resuming from a checkpoint); the loss history and the step the run
        resumed at."""
        cfg = self.cfg
        ck = None
        if checkpoint is not None:
            ck = Checkpointing(checkpoint, every=cfg.checkpoint_every or max(1, self.steps // 10), resume=resume,
                               generators={"lfpm": self.gen}, extra=self.pool, keep=True,
                               fingerprint=fingerprint(cfg, self.merged, self.base, len(self.images)))
        if not (ck and resume and checkpoint.exists()):
            self.stage_one(progress)
        train_cfg = TrainConfig(steps=self.steps, lr=self.chosen["lr"]["value"], weight_decay=0.0,
                                warmup=max(1, self.steps // 20), seed=cfg.seed, device=str(self.dev), grad_clip=1.0,
                                eps=cfg.adam_eps)
        history = fit(list(self.tau.values()), self.loss_at, train_cfg, progress,
                      "LFPM stage II: anti-backdoor task vector", ck)
        if not all(bool(torch.isfinite(t).all()) for t in self.tau.values()):
            raise SettingError("lr", "LFPM diverged: the anti-backdoor vector holds NaN or Inf values; try a smaller "
                                     f"{{name}} than {self.chosen['lr']['value']:g}.")
        return history, ck.resumed_at if ck else 0

    def defended(self) -> ImageEncoder:
        """θm + τa, and θ0's parameters as they were given."""
        model = copy.deepcopy(self.merged)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.theta_m[n] + self.tau[n].detach())
        for p, flag in zip(self.base.parameters(), self.base_flags):
            p.requires_grad_(flag)
        return model.requires_grad_(True)

    def report(self, history: list[float], resumed_at: int, start: float) -> LFPMReport:
        """The run's report; `start`: when it started (`time.perf_counter()`)."""
        cfg, x = self.cfg, self.images[: self.cfg.batch_size]
        with torch.no_grad():  # λ_eff in fp32 throughout: its target too (clean_target may be bf16 on a GPU)
            target = self.merged(x)
        lam_start = curvature(self.merged, self.theta_m, self.tau, x, target, at_start=True)
        lam_end = curvature(self.merged, self.theta_m, self.tau, x, target)
        with torch.no_grad():
            final_excess = [float(self.excess(x, pr.apply(x), False, pr.tokens()).float().pow(2).sum(1).mean())
                            for pr in self.pool.prompts]
        per_epoch = [sum(history[e * self.steps_per_epoch:(e + 1) * self.steps_per_epoch]) / self.steps_per_epoch
                     for e in range(cfg.epochs)]
        seconds = time.perf_counter() - start
        return LFPMReport(
            config=asdict(cfg), chosen=self.chosen, steps=self.steps, epochs_run=cfg.epochs,
            stopped=f"ran the {cfg.epochs} epochs it was given", resumed_at_step=resumed_at,
            loss_per_epoch=per_epoch, mined_excess_start=self.pool.mined or None, mined_excess_end=final_excess,
            fresh_prompts=self.pool.fresh, prompt_area=[pr.area() for pr in self.pool.prompts],
            lambda_eff_start=lam_start, lambda_eff_end=lam_end,
            drift=self.drift(), drift_per_epoch=self.drift_log, held_out_images=self.held,
            restored_directions=int(self.restored),
            tau_norm=float(torch.sqrt(sum(t.detach().pow(2).sum() for t in self.tau.values()))),
            idle_steps=self.idle_steps, seconds=seconds,
            images_per_second=(self.steps - resumed_at) * cfg.batch_size / seconds,
            peak_gpu_memory_bytes=torch.cuda.max_memory_allocated() if self.dev.type == "cuda" else None,
            peak_rss_bytes=peak_rss_bytes(),
            prompts={f"{i}.{k}": v for i, pr in enumerate(self.pool.prompts) for k, v in pr.save().items()})


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
) -> tuple[ImageEncoder, dict[str, torch.Tensor], LFPMReport]:
    """Returns (defended model θm + τa, τa as {name: tensor}, report). `shadow`: unlabeled images, as a dataset
    of (image, label) pairs or already stacked (N, 3, H, W). `starts`: (mask, pattern) of fixed mask
    prompts (the scan's triggers); `restore`: a unit feature direction along which the clean features are
    preserved as θ0's instead of θm's (`scanned.restore_decision`).

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
    images = shadow if isinstance(shadow, torch.Tensor) else stack_images(shadow, cfg.workers)
    run = LFPMRun(merged, base, images, cfg, dev, rank, world, starts or [], restore)
    history, resumed_at = run.train(progress, checkpoint, resume)
    report = run.report(history, resumed_at, start)
    return run.defended(), {n: t.detach().cpu() for n, t in run.tau.items()}, report


def unchanged(merged: ImageEncoder, cfg: LFPMConfig, chosen: dict[str, Any], why: str
              ) -> tuple[ImageEncoder, dict[str, torch.Tensor], LFPMReport]:
    """LFPM's result when it stops before training: the merge itself, τa = 0, and a report of the same form."""
    start = time.perf_counter()
    defended = copy.deepcopy(merged).cpu()
    tau = {n: torch.zeros_like(p, device="cpu") for n, p in defended.named_parameters()}
    return defended, tau, LFPMReport(config=asdict(cfg), chosen=chosen, stopped=why,
                                     seconds=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes())


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
