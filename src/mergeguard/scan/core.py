"""Scan: find a backdoor without its trigger or labels, by trigger inversion on unlabeled shadow images.

A backdoor is a small input pattern with an outsized effect. For every target the scan can aim at (each
class of each head it is given), a soft mask `m` and a pattern `p` (`x ⊕ Π = (1 − m) x + m p`, the
trigger files' form) are optimised, all targets at once, so that patched shadow images go to the target,
while a penalty on the mask's area rises whenever the target is reached and falls when it is not (Neural
Cleanse's schedule, so the mask cannot collapse before it works). Each target's result is the smallest
area at which at least `success` of a batch went there.

The same inversion runs on θ0, once: a target the pre-trained model already reaches with a small mask
(a class that a red blob "is") does not count against an input. Per target, `log(A_θ0 / A_model)` says
how many times smaller the model's mask is than θ0's. The score of a model is each head's largest ratio,
averaged over the heads: a backdoor's trigger sends features to one point, which every head reads as one
of its classes, so the model's mask shrinks to the trigger's size under every head; a clean fine-tune
sharpens a class or two of some heads (measured in bench/scan_bench.py). It is comparable across models
and sizes.

Without heads, the target is the model's own reaction: a mask that sends every patched image to one
point of feature space (the cosine of each patched image's features with their normalised mean,
averaged, must reach `success`), with θ0 as the reference in the same way.

`data.triggers.TrainableTriggers` (the masks and patterns, optimised) is the piece LFPM mines with too.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mergeguard import settings
from mergeguard.cache import cache_dir
from mergeguard.data.triggers import TrainableTriggers, Trigger
from mergeguard.errors import MergeguardError
from mergeguard.models.encoder import ImageEncoder, check_same_architecture, weights_digest
from mergeguard.models.heads import Head
from mergeguard.progress import NullProgress, ProgressSink
from mergeguard.scan.config import VERDICTS, ScanConfig, check_config, verdict_of
from mergeguard.trainer import resolve_device, seed_everything

FEATURES = "(features)"  # the target of a scan without heads


@dataclass(frozen=True)
class Target:
    task: str  # a head's task, or FEATURES
    index: int  # the class index (-1 without heads)
    name: str  # the class's name

    def label(self) -> str:
        return self.task if self.task == FEATURES else f"{self.task}:{self.index} ({self.name})"


@dataclass
class Inverted:
    """One target's inversion on one model."""

    target: Target
    area: float  # the smallest mean mask area that reached `success` on a batch (1.0: never)
    success: float  # the share of held-out patched images sent to the target by that mask
    mask: torch.Tensor = field(repr=False)  # (1, H, W)
    pattern: torch.Tensor = field(repr=False)  # (3, H, W)

    def trigger(self) -> Trigger:
        return Trigger(self.pattern.clone(), self.mask.clone(), max(self.target.index, 0),
                       None if self.target.task == FEATURES else self.target.task, "blend")


@dataclass
class ScanResult:
    """One model's scan. `to_json()` is its report; `inverted` (the suspected target's mask and pattern) and
    `suspects` are what the scan recovered, as tensors."""

    input: str  # the scanned model's name ("" when none was given)
    score: float  # each head's largest log area ratio, averaged over the heads
    verdict: str
    threshold: dict[str, float]
    target: dict[str, Any] | None  # the suspected target (None without heads)
    area: float  # its smallest mask's mean area on the model, and on θ0
    area_base: float
    where: dict[str, Any]  # the mask's bounding box, as fractions of the image side
    targets: list[dict[str, Any]]  # every target's areas and log ratio
    inverted: Inverted = field(repr=False)
    # (log ratio, recovered trigger) of every target, the largest ratio first (LFPM starts its prompts there)
    suspects: list[tuple[float, Trigger]] = field(repr=False, default_factory=list)

    @property
    def trigger(self) -> Trigger:
        return self.inverted.trigger()

    def summary(self) -> dict[str, Any]:
        """What another report quotes of a scan (LFPM's "scan" before and after)."""
        return {k: getattr(self, k) for k in ("score", "verdict", "target", "area", "area_base", "where")}

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("input", "score", "verdict", "threshold", "target", "area",
                                              "area_base", "where", "targets")}


@dataclass
class ModelsScan:
    """`scan_models`' result: each input's scan (or the merged model's) and the attribution."""

    inputs: list[ScanResult]
    merged: ScanResult | None
    attribution: list[dict[str, Any]]  # inputs ranked: by score, or by their reaction to the merge's trigger
    verdict: str  # the worst verdict
    config: dict[str, Any]
    seconds: float

    @property
    def scanned(self) -> list[ScanResult]:
        """The scans the verdict comes from: the merged model's, or every input's."""
        return [self.merged] if self.merged is not None else self.inputs

    def to_json(self) -> dict[str, Any]:
        inputs = [r.to_json() for r in self.inputs]
        for entry, outlier in zip(inputs, outliers(self.inputs)):
            entry["outlier"] = outlier
        return {"inputs": inputs, "merged": self.merged and self.merged.to_json(),
                "attribution": self.attribution, "verdict": self.verdict, "config": self.config,
                "seconds": self.seconds}


MAD_FLOOR = 0.05  # nats: the spread below which the other inputs' log ratios are taken as equal (a 5% area ratio)
OUTLIER_MIN_OTHERS = 2  # the other inputs a robust z needs (median and MAD of fewer say nothing)


def outliers(results: list[ScanResult]) -> list[dict[str, Any] | None]:
    """Each input judged against the others (issue #37's input-calibrated statistic; reported, it decides no
    verdict yet): per target, how far the input's log area ratio stands above the same target's on the other
    inputs, as a robust z (median and 1.4826 × MAD over the others, the MAD floored at `MAD_FLOOR`), and the input's
    largest such z with its target. None for an input with fewer than `OUTLIER_MIN_OTHERS` others, or no heads."""
    ratios = [{t["target"]: t["log_ratio"] for t in r.targets} for r in results]
    out: list[dict[str, Any] | None] = []
    for i, mine in enumerate(ratios):
        others = [r for k, r in enumerate(ratios) if k != i]
        if len(others) < OUTLIER_MIN_OTHERS or not mine or any(set(o) != set(mine) for o in others):
            out.append(None)
            continue
        best: tuple[float, str] | None = None
        for target, value in mine.items():
            column = [o[target] for o in others]
            med = statistics.median(column)
            mad = statistics.median(abs(v - med) for v in column)
            z = (value - med) / max(1.4826 * mad, MAD_FLOOR)
            if best is None or z > best[0]:
                best = (z, target)
        assert best is not None
        out.append({"z": best[0], "target": best[1], "others": len(others),
                    "rule": "robust z of the input's log area ratio against the same target on the other inputs "
                            f"(median, 1.4826 x MAD floored at {MAD_FLOOR:g}); reported, not yet a verdict"})
    return out


def targets_of(heads: dict[str, Head] | None) -> list[Target]:
    if not heads:
        return [Target(FEATURES, -1, "")]
    return [Target(t, i, n) for t, h in heads.items() for i, n in enumerate(h.classnames)]


class _Objective:
    """Per-target loss and success of patched features (K, B, d)."""

    def __init__(self, targets: list[Target], heads: dict[str, Head] | None, dev: torch.device):
        self.headless = targets[0].task == FEATURES
        if self.headless:
            return
        tasks = list(heads)
        width = max(len(heads[t].classnames) for t in tasks)
        dim = heads[tasks[0]].weight.shape[1]
        weight = torch.zeros(len(tasks), width, dim)
        pad = torch.ones(len(tasks), width, dtype=torch.bool)
        for i, t in enumerate(tasks):
            c = len(heads[t].classnames)
            weight[i, :c] = heads[t].weight.float()
            pad[i, :c] = False
        which = torch.tensor([tasks.index(t.task) for t in targets])
        self.weight = weight[which].to(dev)  # (K, C, d)
        self.pad = pad[which].to(dev)  # (K, C)
        self.scale = torch.tensor([heads[t.task].scale for t in targets], device=dev)
        self.cls = torch.tensor([t.index for t in targets], device=dev)

    def __call__(self, f: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per target, success per target) for the targets `rows` of this objective."""
        if self.headless:  # pull every patched image's features to their (normalised) mean
            centre = F.normalize(f.mean(1, keepdim=True), dim=-1)
            cos = (f * centre.detach()).sum(-1)  # (K, B)
            return (1 - cos).mean(1) * 10, cos.mean(1).detach()
        logits = torch.einsum("kbd,kcd->kbc", f, self.weight[rows]) * self.scale[rows, None, None]
        logits = logits.masked_fill(self.pad[rows, None, :], float("-inf"))
        cls = self.cls[rows]
        loss = F.cross_entropy(logits.flatten(0, 1), cls.repeat_interleave(f.shape[1]), reduction="none")
        hit = (logits.argmax(-1) == cls[:, None]).float().mean(1)
        return loss.view(f.shape[:2]).mean(1), hit


def invert(model: ImageEncoder, images: torch.Tensor, held_out: torch.Tensor, targets: list[Target],
           heads: dict[str, Head] | None, cfg: ScanConfig, progress: ProgressSink | None = None,
           what: str = "") -> list[Inverted]:
    """The smallest mask (over `cfg.restarts` starts) that sends `cfg.success` of patched images to each
    target, with its held-out success."""
    progress = progress or NullProgress()
    dev = images.device
    objective = _Objective(targets, heads, dev)
    rows_all = [r for r in range(len(targets)) for _ in range(cfg.restarts)]
    chunks = [rows_all[i:i + cfg.chunk] for i in range(0, len(rows_all), cfg.chunk)]
    progress.stage(f"inverting triggers{what}", cfg.steps * len(chunks))
    gen = torch.Generator().manual_seed(cfg.seed)
    size = images.shape[-1]
    best: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}
    init_cost, up, down, patience = 1.0, 1.5, 1.5 ** 1.5, 5
    for chunk in chunks:
        rows = torch.tensor(chunk, device=dev)
        k = len(chunk)
        prompt = TrainableTriggers(k, size, cfg.lr, gen, dev, start=-2.0, jitter=0.5)
        cost = torch.zeros(k, device=dev)
        ups = torch.zeros(k, dtype=torch.long, device=dev)
        downs = torch.zeros(k, dtype=torch.long, device=dev)
        best_area = torch.full((k,), math.inf, device=dev)
        best_m = prompt.mask().clone()
        best_p = prompt.pattern().clone()
        for _ in range(cfg.steps):
            idx = torch.randint(len(images), (cfg.batch_size,), generator=gen).to(dev)
            x = images[idx]
            with torch.enable_grad():
                m = prompt.mask(grad=True)
                xp = prompt.apply(x, grad=True)
                f = model(xp.flatten(0, 1)).float().view(k, len(x), -1)
                loss, hit = objective(f, rows)
                area = m.mean((1, 2, 3))
                prompt.step((loss + cost * area).sum())
            with torch.no_grad():
                area = area.detach()
                ok = hit >= cfg.success
                better = ok & (area < best_area)
                best_area = torch.where(better, area, best_area)
                best_m[better] = m.detach()[better]
                best_p[better] = torch.sigmoid(prompt.b.detach())[better]
                # Neural Cleanse's schedule: no penalty until the target is first reached, then raise it
                # after `patience` successful steps in a row and lower it after as many failures
                cost = torch.where(ok & (cost == 0), torch.full_like(cost, init_cost), cost)
                ups = torch.where(ok, ups + 1, torch.zeros_like(ups))
                downs = torch.where(ok, torch.zeros_like(downs), downs + 1)
                cost = torch.where(ups >= patience, cost * up, cost)
                cost = torch.where(downs >= patience, cost / down, cost)
                ups = torch.where(ups >= patience, torch.zeros_like(ups), ups)
                downs = torch.where(downs >= patience, torch.zeros_like(downs), downs)
            progress.advance()
        never = torch.isinf(best_area)
        best_m[never] = prompt.mask()[never]  # no mask reached the target: the last one, at area 1 (the cap)
        best_p[never] = prompt.pattern()[never]
        for j, r in enumerate(chunk):
            area_j = 1.0 if bool(never[j]) else float(best_area[j])
            if r not in best or area_j < best[r][0]:
                best[r] = (area_j, best_m[j].cpu(), best_p[j].cpu())
    out = []
    with torch.no_grad():
        for r, target in enumerate(targets):
            area, m, p = best[r]
            xp = (1 - m.to(dev)) * held_out + m.to(dev) * p.to(dev)
            f = model(xp).float()[None]
            _, hit = objective(f, torch.tensor([r], device=dev))
            out.append(Inverted(target, area, float(hit[0]), m, p))
    return out


def score_of(model_inv: list[Inverted], base_inv: list[Inverted], pixels: int) -> tuple[float, int, list[float]]:
    """(score, index of the most suspicious target, log area ratio per target). The ratio is
    log(A_θ0 / A_model) with areas floored at one pixel. The score is, per head, its largest ratio, averaged
    over the heads: a backdoor is a patch that sends features to one point, and every head maps that point
    to one of its classes, so a backdoored model's smallest mask shrinks under every head; a clean
    fine-tune sharpens a class or two of some heads. With one head (or none), the largest ratio."""
    floor = 1.0 / pixels
    ratios = [math.log(max(b.area, floor)) - math.log(max(m.area, floor)) for m, b in zip(model_inv, base_inv)]
    top = max(range(len(ratios)), key=ratios.__getitem__)
    per_head: dict[str, float] = {}
    for inv, r in zip(model_inv, ratios):
        per_head[inv.target.task] = max(per_head.get(inv.target.task, -math.inf), r)
    return statistics.fmean(per_head.values()), top, ratios


def mask_box(mask: torch.Tensor) -> dict[str, Any]:
    """Where the mask sits: the bounding box of its pixels above half its peak, as fractions of the side."""
    m = mask[0] if mask.dim() == 3 else mask
    on = m >= 0.5 * float(m.max())
    ys, xs = torch.nonzero(on, as_tuple=True)
    side = m.shape[-1]
    return {"top": float(ys.min()) / side, "left": float(xs.min()) / side, "bottom": float(ys.max() + 1) / side,
            "right": float(xs.max() + 1) / side, "pixels": int(on.sum())}


class Scanner:
    """Scans models against one θ0 with one shadow set: θ0's inversion is done once and reused."""

    def __init__(self, base: ImageEncoder, shadow_images: torch.Tensor, heads: dict[str, Head] | None,
                 cfg: ScanConfig, progress: ProgressSink | None = None):
        check_config(cfg)
        if len(shadow_images) == 0:
            raise MergeguardError("the shadow image folder is empty.")
        if heads:
            dims = {h.weight.shape[1] for h in heads.values()}
            if dims != {base.arch["embed_dim"]}:
                raise MergeguardError(f"the heads' feature size {sorted(dims)} is not the model's "
                                      f"{base.arch['embed_dim']}; are they for this model?")
        self.cfg, self.heads = cfg, heads
        self.progress = progress or NullProgress()
        seed_everything(cfg.seed)
        self.dev = resolve_device(cfg.device)
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(shadow_images), generator=gen)[: cfg.images]
        picked = shadow_images[order]
        hold = max(min(64, len(picked) // 2), len(picked) // 4)
        self.held_out = picked[:hold].to(self.dev)
        self.images = picked[hold:].to(self.dev)
        if len(self.images) < 2:
            raise MergeguardError(f"{len(shadow_images)} shadow image(s) are too few to scan with; give at least 8.")
        self.targets = targets_of(heads)
        self.base = base.to(self.dev).eval()
        self._base_inv: list[Inverted] | None = None

    @property
    def base_inversion(self) -> list[Inverted]:
        if self._base_inv is None:
            path = cache_dir() / "scan" / f"{self.reference_key()}.safetensors" if self.cfg.cache else None
            self._base_inv = _load_inversion(path, self.targets) if path is not None else None
            if self._base_inv is None:
                self._base_inv = self._invert(self.base, " on θ0 (the reference)")
                if path is not None:
                    try:
                        _save_inversion(path, self._base_inv)
                    except (OSError, MergeguardError):  # an unwritable cache folder costs the reuse, not the scan
                        pass
        return self._base_inv

    def reference_key(self) -> str:
        """A digest of everything θ0's inversion depends on: θ0's weights, the shadow images picked, the heads,
        the settings that shape the result and the device type (a GPU's sums differ from a CPU's)."""
        h = hashlib.sha256(f"scan-reference-v{REFERENCE_VERSION}".encode())

        def add(t: torch.Tensor) -> None:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

        h.update(weights_digest(self.base).encode())
        add(self.images)
        add(self.held_out)
        for task, head in (self.heads or {}).items():
            h.update(json.dumps([task, list(head.classnames), float(head.scale)]).encode())
            add(head.weight)
        shaping = {k: v for k, v in settings.fingerprint(self.cfg).items() if k not in ("suspicious", "backdoored")}
        h.update(json.dumps([shaping, self.dev.type], sort_keys=True).encode())
        return h.hexdigest()[:32]

    def _invert(self, model: ImageEncoder, what: str) -> list[Inverted]:
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            return invert(model.to(self.dev).eval(), self.images, self.held_out, self.targets, self.heads, self.cfg,
                          self.progress, what)
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)

    def scan(self, model: ImageEncoder, name: str = "") -> ScanResult:
        """The result of one model: score, verdict, the suspected target and its recovered trigger."""
        check_same_architecture(model, self.base, "the scan")
        base_inv = self.base_inversion
        inv = self._invert(model, f" on {name}" if name else "")
        pixels = self.images.shape[-1] * self.images.shape[-2]
        score, top, ratios = score_of(inv, base_inv, pixels)
        best = inv[top]
        with torch.no_grad():  # the same mask on θ0: how much of its success is the model's own
            base_hit = invert_success(self.base, self.held_out, best, self.heads, self.dev)
        return ScanResult(
            input=name, score=score, verdict=verdict_of(score, self.cfg),
            threshold={"suspicious": self.cfg.suspicious, "backdoored": self.cfg.backdoored},
            target=None if best.target.task == FEATURES else {
                "task": best.target.task, "class": best.target.index, "name": best.target.name,
                "share": best.success, "share_base": base_hit},
            area=best.area, area_base=base_inv[top].area, where=mask_box(best.mask),
            targets=[{"target": i.target.label(), "area": i.area, "area_base": b.area, "log_ratio": r,
                      "success": i.success} for i, b, r in zip(inv, base_inv, ratios)],
            inverted=best,
            suspects=[(ratios[i], inv[i].trigger()) for i in sorted(range(len(inv)), key=lambda i: -ratios[i])],
        )

    def report_config(self) -> dict[str, Any]:
        return asdict(self.cfg)


REFERENCE_VERSION = 1  # raise it when `invert` changes what it computes: cached references are then unused


def _save_inversion(path: Path, inv: list[Inverted]) -> None:
    """θ0's inversion in the cache (atomically, as every tensor file mergeguard writes)."""
    from mergeguard.checkpoint import write_tensors

    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, {"mask": torch.stack([i.mask for i in inv]), "pattern": torch.stack([i.pattern for i in inv]),
                         "area": torch.tensor([i.area for i in inv], dtype=torch.float64),
                         "success": torch.tensor([i.success for i in inv], dtype=torch.float64)},
                  {"targets": json.dumps([i.target.label() for i in inv])}, overwrite=True)


def _load_inversion(path: Path, targets: list[Target]) -> list[Inverted] | None:
    """A cached inversion of these targets, or None (absent, unreadable or for other targets)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if json.loads((f.metadata() or {}).get("targets", "[]")) != [t.label() for t in targets]:
                return None
            mask, pattern, area, success = (f.get_tensor(k) for k in ("mask", "pattern", "area", "success"))
    except Exception:  # a damaged cache entry is recomputed, not an error
        return None
    return [Inverted(t, float(area[i]), float(success[i]), mask[i], pattern[i]) for i, t in enumerate(targets)]


def invert_success(model: ImageEncoder, images: torch.Tensor, inv: Inverted, heads: dict[str, Head] | None,
                   dev: torch.device) -> float:
    """The share of `images` that `inv`'s mask sends to its target under `model`."""
    m, p = inv.mask.to(dev), inv.pattern.to(dev)
    f = model((1 - m) * images + m * p).float()[None]
    _, hit = _Objective([inv.target], heads if inv.target.task != FEATURES else None, dev)(
        f, torch.tensor([0], device=dev))
    return float(hit[0])


def worst(verdicts: list[str]) -> str:
    return max(verdicts, key=VERDICTS.index) if verdicts else "clean"


def model_of(base: Any, source: Any, scale: float, arch: str | None, tmp: Path) -> ImageEncoder:
    """θ0 + scale · τ for anything `merge` takes (a fine-tuned checkpoint, a task vector, a PEFT LoRA adapter),
    through the merge engine (so every check of `merge` applies), written in `tmp` and loaded."""
    from mergeguard.merge.engine import merge_checkpoints
    from mergeguard.models.encoder import load_encoder

    out = tmp / f"model-{len(list(tmp.iterdir()))}.safetensors"
    merge_checkpoints(base, [source], "task_arithmetic", {"lam": scale}, out=out)
    try:
        return load_encoder(str(out), arch=arch)
    finally:
        out.unlink(missing_ok=True)


def scan_models(scanner: Scanner, inputs: list[tuple[str, ImageEncoder | Callable[[], ImageEncoder]]],
                merged: tuple[str, ImageEncoder] | None = None) -> ModelsScan:
    """Scan each input (name, model or a function that loads it), or with `merged` the merged model, and
    attribute: without `merged`, inputs ranked by score; with it, each input's reaction to the trigger
    recovered from the merged model (the share of held-out images it sends to that target)."""
    start = time.perf_counter()
    results: list[ScanResult] = []
    attribution: list[dict[str, Any]] = []
    report = None
    if merged is None:
        results = [scanner.scan(_loaded(model), name) for name, model in inputs]
        attribution = [{"input": r.input, "score": r.score} for r in sorted(results, key=lambda r: -r.score)]
        verdicts = [r.verdict for r in results]
    else:
        name, model = merged
        report = scanner.scan(model, name)
        for in_name, in_model in inputs:
            in_model = _loaded(in_model)
            check_same_architecture(in_model, scanner.base, "the scan")
            with torch.no_grad():
                share = invert_success(in_model.to(scanner.dev).eval(), scanner.held_out, report.inverted,
                                       scanner.heads, scanner.dev)
            attribution.append({"input": in_name, "share": share})
        attribution.sort(key=lambda r: -r["share"])
        verdicts = [report.verdict]
    return ModelsScan(results, report, attribution, worst(verdicts), scanner.report_config(),
                      time.perf_counter() - start)


def _loaded(model: ImageEncoder | Callable[[], ImageEncoder]) -> ImageEncoder:
    """A model, or the function that loads it (a module is callable too: it is not called)."""
    return model if isinstance(model, ImageEncoder) else model()
