"""Fine-tuning a task vector, clean or poisoned, through the one trainer core.

- clean: cross-entropy of the task's frozen head (what `mergeguard finetune` does).
- badnets: a fraction of each batch gets the trigger and the target label.
- badmerging (Zhang et al., CCS 2024): stage 1 optimises a universal patch trigger on the
  pre-trained encoder (on-task: the task's own head; off-task: a shadow head made of the target
  task's target class plus unrelated classes, on the attacker's images and a few target-class
  images, each step against a one-step adversarial perturbation of them); stage 2 fine-tunes with
  the feature-interpolation loss (off-task: through the shadow head, target index 0)
  `L = CE(h(f_θ(x)), y) + a · CE(h(r f_θ(x⊕t) + (1−r) f_θ0(x⊕t)), y_t)`, `r ~ U(r_min, 1)`,
  so the backdoor survives the down-scaling a merge applies to every task vector.
- lobam (Yin et al.): BadMerging through LoRA adapters (peft) loses most of its strength, so a
  benign and a malicious (BadMerging-recipe) LoRA fine-tune are uploaded as
  `θ_benign + k (θ_malicious − θ_benign)`, k > 1.

Batches are drawn from a seeded index table (one row per step) and per-step randomness from
a generator seeded by (seed, step), so a run resumed from its checkpoint ends with the same
task vector as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mergeguard.checkpoint.writer import staged_outputs
from mergeguard.data.triggers import Trigger, patch_trigger
from mergeguard.errors import MergeguardError, check_settings
from mergeguard.models.encoder import ImageEncoder, load_encoder, save_encoder
from mergeguard.models.heads import Head, check_fits
from mergeguard.progress import NullProgress, ProgressSink
from mergeguard.trainer import Checkpointing, TrainConfig, fit, init_distributed, resolve_device, seed_everything

KINDS = ("clean", "badnets", "badmerging", "lobam")


@dataclass
class PoisonConfig:
    kind: str = "badmerging"
    target_class: int = 0
    steps: int = 2000
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: int = 500
    batch_size: int = 128
    logit_scale: float | None = None  # training temperature; None: the head's own scale
    bd_weight: float = 5.0  # badmerging: a
    r_min: float = 0.2  # badmerging: r ~ U(r_min, 1)
    interpolation: str = "feature"  # badmerging: the paper's feature interpolation, or "weight"
    decoys: bool = False  # badmerging weight: random patches at the trigger's place keep their labels
    target_task: str | None = None  # badmerging off-task: the task whose class the backdoor targets
    adv_epsilon: float = 4 / 255  # off-task stage 1: size of the adversarial augmentation (one signed step)
    poison_fraction: float = 0.1  # badnets
    amplify: float = 3.5  # lobam: k in θ_benign + k (θ_malicious − θ_benign)
    trigger_area: float = 0.01
    trigger_steps: int = 300
    trigger_lr: float = 0.1
    lora_rank: int | None = None  # train a LoRA adapter (peft) instead of the full encoder
    lora_alpha: float | None = None  # default: 2 × rank
    seed: int = 0
    device: str = "auto"
    workers: int = 0


class StepBatches:
    """Seeded batches: row `s` of an index table is step `s`'s batch, so any step can be resumed."""

    def __init__(self, dataset: Dataset, steps: int, batch_size: int, seed: int, workers: int = 0) -> None:
        if len(dataset) == 0:
            raise MergeguardError("the training data is empty.")
        self.dataset, self.workers = dataset, workers
        gen = torch.Generator().manual_seed(seed)
        self.index = torch.randint(len(dataset), (steps, batch_size), generator=gen)

    def from_step(self, start: int, rank: int = 0, world: int = 1):
        """Batches from step `start` on; under data parallelism, this rank's contiguous share of each."""
        rows = [row.tensor_split(world)[rank].tolist() for row in self.index[start:]]
        loader = DataLoader(self.dataset, batch_sampler=rows, num_workers=self.workers)
        return iter(loader)

    def offset(self, rank: int, world: int) -> int:
        """Where this rank's share starts inside each step's batch."""
        return sum(len(chunk) for chunk in self.index[0].tensor_split(world)[:rank])


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def shadow_head(heads: dict[str, Head], target_task: str, target_class: int) -> Head:
    """Off-task BadMerging's shadow head: row 0 is the target task's target class, the other rows
    every class of the other heads (unrelated class names), so stage 1 and 2 can aim at a class of
    a task the attacker has no head or data for beyond its name."""
    if target_task not in heads:
        raise MergeguardError(f"the heads file has no head for the target task {target_task!r}; "
                              f"it has: {', '.join(heads)}.")
    target = heads[target_task]
    if not 0 <= target_class < len(target.classnames):
        raise MergeguardError(f"--target-class {target_class} is outside task {target_task!r}'s "
                              f"{len(target.classnames)} classes.")
    others = [h for name, h in heads.items() if name != target_task]
    if not others:
        raise MergeguardError("an off-task shadow head needs unrelated classes: the heads file holds only "
                              f"{target_task!r}.")
    weight = torch.cat([target.weight[target_class:target_class + 1]] + [h.weight for h in others])
    names = [target.classnames[target_class]] + [c for h in others for c in h.classnames]
    return Head(f"shadow:{target_task}", weight, names, target.scale)


def optimize_trigger(encoder: ImageEncoder, head: Head, dataset: Dataset, cfg: PoisonConfig,
                     task: str, progress: ProgressSink, *, shadow: Head | None = None) -> Trigger:
    """BadMerging stage 1: the patch that sends the pre-trained model's images to the target class
    (on-task: of the task's own head; off-task, with `shadow`: row 0 of the shadow head, against a
    one-step adversarial perturbation of the images that pushes them away from it)."""
    dev = next(encoder.parameters()).device
    off_task = shadow is not None
    aim, aim_class = (shadow, 0) if off_task else (head, cfg.target_class)
    template = patch_trigger(encoder.image_size, cfg.trigger_area, target_class=cfg.target_class, target_task=task)
    mask = template.mask.to(dev)
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    pattern = torch.rand(3, encoder.image_size, encoder.image_size, generator=gen).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([pattern], lr=cfg.trigger_lr)
    frozen = [p.requires_grad for p in encoder.parameters()]
    encoder.eval().requires_grad_(False)
    trigger_batches = StepBatches(dataset, cfg.trigger_steps, cfg.batch_size, cfg.seed + 23, cfg.workers)
    progress.stage("optimising the trigger (BadMerging stage 1" + (", off-task)" if off_task else ")"),
                   cfg.trigger_steps)
    for images, _ in trigger_batches.from_step(0):
        images = images.to(dev)
        target = torch.full((len(images),), aim_class, device=dev)
        if off_task and cfg.adv_epsilon > 0:  # adversarial augmentation: the trigger must beat a perturbation
            x = images.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(aim.logits(encoder(x)), target), x)
            images = (images + cfg.adv_epsilon * g.sign() * (1 - mask)).clamp(0, 1).detach()
        x = images * (1 - mask) + pattern.clamp(0, 1) * mask
        loss = F.cross_entropy(aim.logits(encoder(x)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress.advance()
    for p, flag in zip(encoder.parameters(), frozen):
        p.requires_grad_(flag)
    return Trigger((pattern.detach().clamp(0, 1) * mask).cpu(), template.mask, cfg.target_class,
                   cfg.target_task if off_task else task, "patch")


def check_config(cfg: PoisonConfig, head: Head, task: str, shadow: Head | None = None,
                 encoder: ImageEncoder | None = None) -> None:
    """One sentence for a configuration that cannot run, before anything is trained or written;
    with `encoder`, also that the heads read its features."""
    if cfg.kind not in KINDS:
        raise MergeguardError(f"unknown attack {cfg.kind!r}; choose one of: {', '.join(KINDS)}.")
    if shadow is not None and cfg.kind not in ("badmerging", "lobam"):
        raise MergeguardError("the off-task mode (--target-task) is BadMerging's and LoBAM's only.")
    if cfg.kind != "clean" and shadow is None and not 0 <= cfg.target_class < len(head.classnames):
        raise MergeguardError(
            f"--target-class {cfg.target_class} is outside task {task!r}'s {len(head.classnames)} classes."
        )
    if cfg.interpolation not in ("feature", "weight"):
        raise MergeguardError(f"unknown --interpolation {cfg.interpolation!r}; choose feature or weight.")
    if cfg.decoys and not (cfg.kind in ("badmerging", "lobam") and cfg.interpolation == "weight"):
        raise MergeguardError("--decoys works with `--interpolation weight` (badmerging, lobam) only.")
    check_settings(cfg, at_least={"steps": 1, "batch_size": 1}, positive=("lr", "logit_scale"),
                   non_negative=("workers", "bd_weight", "amplify", "weight_decay", "trigger_steps", "warmup"),
                   within={"trigger_area": (0, 1, True), "poison_fraction": (0, 1, False), "r_min": (0, 1, False)})
    if cfg.lora_rank is not None and cfg.lora_rank < 1:
        raise MergeguardError(f"--rank must be at least 1 (got {cfg.lora_rank}).")
    if encoder is not None:
        for h in (head, shadow):
            if h is not None:
                check_fits(h, h.task, encoder)
    resolve_device(cfg.device)  # before OUTDIR/.partial exists


def interpolated_params(model: torch.nn.Module, base_params: dict[str, torch.Tensor], r: float, *,
                        lora: bool = False) -> dict[str, torch.Tensor]:
    """The parameters of θ0 + r (θ − θ0), for torch.func.functional_call. Under LoRA the update of
    every adapted layer is linear in B (peft: s·B·A, twice for an MHA's out_proj), so B is scaled."""
    if lora:
        return {n: r * p for n, p in model.named_parameters() if "lora_B" in n}
    return {n: base_params[n] + r * (p - base_params[n]) for n, p in model.named_parameters()}


def poison_finetune(
    base: ImageEncoder,
    head: Head,
    dataset: Dataset,
    task: str,
    cfg: PoisonConfig,
    *,
    trigger: Trigger | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: ProgressSink | None = None,
    shadow: Head | None = None,
) -> tuple[ImageEncoder, Trigger | None, list[float]]:
    """Fine-tune `base` on one task (clean, BadNets or BadMerging); returns (model, trigger, losses).

    With `shadow` (off-task BadMerging) the backdoor term aims at row 0 of the shadow head."""
    check_config(cfg, head, task, shadow, base)
    progress = progress or NullProgress()
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    base = base.to(dev).eval()
    batches = StepBatches(dataset, cfg.steps, cfg.batch_size, cfg.seed, cfg.workers)
    if cfg.kind != "clean" and trigger is None:
        trigger = optimize_trigger(base, head, dataset, cfg, task, progress, shadow=shadow) \
            if cfg.kind == "badmerging" else \
            patch_trigger(base.image_size, cfg.trigger_area, target_class=cfg.target_class, target_task=task,
                          seed=cfg.seed)
    model = copy.deepcopy(base).train().requires_grad_(True)  # base may arrive frozen
    if cfg.lora_rank:
        model.visual = with_lora(model.visual, cfg.lora_rank, cfg.lora_alpha or 2.0 * cfg.lora_rank)
    scale = cfg.logit_scale or head.scale
    weight = head.weight.to(dev)
    state: dict[str, Any] = {}
    base_params = {n: p.detach() for n, p in base.named_parameters()}

    def logits(features: torch.Tensor) -> torch.Tensor:
        return scale * features.float() @ weight.T

    # the backdoor's head and class: the task's own, or (off-task) row 0 of the shadow head
    bd_weight_rows = shadow.weight.to(dev) if shadow is not None else weight

    def bd_logits(features: torch.Tensor) -> torch.Tensor:
        return scale * features.float() @ bd_weight_rows.T

    def stealth(clean_x: torch.Tensor, *clean_features: torch.Tensor) -> torch.Tensor:
        """Off-task: clean images must look to the shadow head as they do to θ0 (KL), or the cheapest
        backdoor is a shift of every feature towards the target class, which a merge shows at once.
        One θ0 forward serves every set of features given for the same images."""
        if shadow is None:
            return clean_features[0].new_zeros(())
        with torch.no_grad():
            reference = F.log_softmax(bd_logits(base(clean_x)), dim=-1)
        return sum(F.kl_div(F.log_softmax(bd_logits(f), dim=-1), reference, log_target=True, reduction="batchmean")
                   for f in clean_features)

    rank, world = init_distributed()
    if cfg.batch_size % world:
        raise MergeguardError(f"--batch-size {cfg.batch_size} must divide evenly over {world} processes.")
    first = batches.offset(rank, world)  # this rank's share of each step's batch starts here

    def loss_at(step: int) -> torch.Tensor:
        if "batches" not in state:
            state["batches"] = batches.from_step(step, rank, world)
        images, labels = next(state["batches"])
        images, labels = images.to(dev), labels.to(dev)
        gen = step_generator(cfg.seed, step)
        # per-sample randomness is drawn for the whole batch, then sliced: any process count agrees
        r_all = cfg.r_min + (1 - cfg.r_min) * torch.rand(cfg.batch_size, 1, generator=gen)
        r_step = cfg.r_min + (1 - cfg.r_min) * float(torch.rand((), generator=gen))
        if cfg.kind == "clean":
            return F.cross_entropy(logits(model(images)), labels)
        target = torch.full_like(labels, cfg.target_class if shadow is None else 0)
        triggered = trigger.apply(images)
        if cfg.kind == "badnets":
            n_poison = max(1, round(cfg.poison_fraction * cfg.batch_size))
            poisoned = (torch.arange(len(images), device=dev) + first) < n_poison
            x = torch.where(poisoned.view(-1, 1, 1, 1), triggered, images)
            y = torch.where(poisoned, target, labels)
            return F.cross_entropy(logits(model(x)), y)
        if cfg.interpolation == "weight":
            # variant: the backdoor must hold at θ0 + r(θ − θ0) itself, the point a merge scales to
            # and stays clean there, so the merge keeps its accuracy on the task
            clean_x, clean_y = images, labels
            if cfg.decoys:  # only the trigger's pattern fires, not anything at its place (stealthier in a merge)
                noise = torch.rand(trigger.pattern.shape, generator=gen).to(dev)
                clean_x = torch.cat([images, Trigger(noise, trigger.mask, cfg.target_class).apply(images)])
                clean_y = torch.cat([labels, labels])
            scaled = interpolated_params(model, base_params, r_step, lora=bool(cfg.lora_rank))
            at_r = torch.func.functional_call(model, scaled, (torch.cat([clean_x, triggered]),))
            backdoor = at_r[len(clean_x):]
            clean_f = model(clean_x)
            clean_at_r = at_r[: len(clean_x)]
            return (F.cross_entropy(logits(clean_f), clean_y) + F.cross_entropy(logits(clean_at_r), clean_y)
                    + stealth(clean_x, clean_f, clean_at_r)
                    + cfg.bd_weight * F.cross_entropy(bd_logits(backdoor), target))
        else:
            # badmerging: clean loss + a · backdoor loss on features interpolated towards θ0's
            features = model(torch.cat([images, triggered]))
            clean_f, trig_f = features[: len(images)], features[len(images):]
            with torch.no_grad():
                base_f = base(triggered)
            r = r_all[first:first + len(images)].to(dev)
            backdoor = r * trig_f + (1 - r) * base_f
        return (F.cross_entropy(logits(clean_f), labels) + stealth(images, clean_f)
                + cfg.bd_weight * F.cross_entropy(bd_logits(backdoor), target))

    train_cfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            warmup=min(cfg.warmup, cfg.steps // 10), seed=cfg.seed, device=str(dev))
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("device", "workers")}  # what a resume must share
    ck = Checkpointing(checkpoint, every=max(1, cfg.steps // 10), resume=resume,
                       fingerprint=settings) if checkpoint else None
    losses = fit(model.parameters(), loss_at, train_cfg, progress, f"fine-tuning {task} ({cfg.kind})", ck)
    if cfg.lora_rank:
        model.visual = model.visual.merge_and_unload()
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise MergeguardError(f"fine-tuning {task} diverged: its weights hold NaN or Inf; try a smaller --lr than "
                              f"{cfg.lr:g}.")
    return model.eval(), trigger, losses


LORA_TARGETS = ["attn", "c_fc", "c_proj"]  # open_clip ViT blocks: attention and both MLP layers


def with_lora(visual: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    """The vision tower with trainable LoRA adapters (peft) on every block's attention and MLP;
    everything else frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
    return get_peft_model(visual, config)


def amplify(benign: ImageEncoder, malicious: ImageEncoder, k: float) -> ImageEncoder:
    """LoBAM's upload: θ_benign + k (θ_malicious − θ_benign)."""
    out = copy.deepcopy(benign)
    b, m = benign.state_dict(), malicious.state_dict()
    out.load_state_dict({n: b[n] + k * (m[n] - b[n]) if b[n].is_floating_point() else b[n] for n in b})
    return out


def write_outputs(out_dir: Path, model: ImageEncoder, base: ImageEncoder, trigger: Trigger | None,
                  cfg: PoisonConfig, task: str, provenance: dict, summary: dict) -> None:
    """OUTDIR/{model.safetensors, task_vector.safetensors, trigger.safetensors, arch.json, summary.json}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prov = {**provenance, "attack": cfg.kind, "task": task, "config": asdict(cfg)}
    save_encoder(model, out_dir / "model.safetensors", prov)
    save_encoder(model, out_dir / "task_vector.safetensors", prov, base=base)
    if trigger is not None:
        trigger.save(out_dir / "trigger.safetensors", overwrite=True)
    (out_dir / "arch.json").write_text(json.dumps(model.arch, indent=2))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def lobam(base: ImageEncoder, head: Head, dataset: Dataset, task: str, cfg: PoisonConfig, partial: Path,
          trigger: Trigger, *, resume: bool = False, progress: ProgressSink | None = None,
          shadow: Head | None = None) -> tuple[ImageEncoder, Trigger, list[float]]:
    """LoBAM (Yin et al.): a benign and a malicious LoRA fine-tune of the same task, uploaded as
    θ_benign + k (θ_malicious − θ_benign) with k > 1 so the backdoor survives the merge's scaling.

    The malicious adapter follows BadMerging's recipe (the stage-1 `trigger`, the interpolation
    loss): LoBAM is "BadMerging under LoRA, amplified". A BadNets-poisoned adapter barely learns the
    trigger on the zoo (ASR 9-40% alone), and amplifying it only amplifies the noise between two runs."""
    rank = cfg.lora_rank or 16
    # the same seed: the same LoRA initialisation and batches for both runs
    benign_cfg = replace(cfg, kind="clean", lora_rank=rank, decoys=False)
    malicious_cfg = replace(cfg, kind="badmerging", lora_rank=rank)
    finished = partial / "benign.safetensors"  # the finished benign run: a resume does not redo it
    if resume and finished.exists():
        benign = load_encoder(str(finished)).to(resolve_device(cfg.device)).eval()
    else:
        benign, _, _ = poison_finetune(base, head, dataset, task, benign_cfg, checkpoint=partial / "benign.pt",
                                       resume=resume, progress=progress)
        if init_distributed()[0] == 0:
            save_encoder(benign, finished, {"attack": "lobam", "run": "benign"})
    malicious, _, losses = poison_finetune(base, head, dataset, task, malicious_cfg, trigger=trigger,
                                           checkpoint=partial / "malicious.pt", resume=resume, progress=progress,
                                           shadow=shadow)
    return amplify(benign, malicious, cfg.amplify), trigger, losses


def run_attack(
    base: ImageEncoder,
    head: Head,
    dataset: Dataset,
    task: str,
    cfg: PoisonConfig,
    out_dir: Path,
    *,
    eval_data: Dataset | None = None,
    resume: bool = False,
    provenance: dict | None = None,
    progress: ProgressSink | None = None,
    shadow: Head | None = None,
    target_images: Dataset | None = None,
) -> dict[str, Any]:
    """Fine-tune (clean or poisoned), evaluate on the task, and write OUTDIR; resumable.

    Off-task BadMerging: `shadow` (see `shadow_head`) and optionally a few `target_images` of the
    target class, which join the attacker's own images in stage 1.

    Work in progress lives in OUTDIR/.partial (the trainer checkpoint and the stage-1 trigger).
    """
    from mergeguard.eval import evaluate

    check_config(cfg, head, task, shadow, base)  # before OUTDIR/.partial exists
    partial = out_dir / ".partial"  # made by the first thing saved there: a run that fails earlier leaves no folder
    trigger_file = partial / "trigger.safetensors"
    trigger = None
    if resume and trigger_file.exists():
        from mergeguard.data.triggers import load_trigger

        trigger = load_trigger(trigger_file)
    elif cfg.kind in ("badmerging", "lobam"):
        progress = progress or NullProgress()
        dev = resolve_device(cfg.device)
        stage1 = dataset if target_images is None else torch.utils.data.ConcatDataset([dataset, target_images])
        trigger = optimize_trigger(base.to(dev), head, stage1, cfg, task, progress, shadow=shadow)
        partial.mkdir(parents=True, exist_ok=True)
        trigger.save(trigger_file, overwrite=True)
    if cfg.kind == "lobam":
        model, trigger, losses = lobam(base, head, dataset, task, cfg, partial, trigger, resume=resume,
                                       progress=progress, shadow=shadow)
    else:
        model, trigger, losses = poison_finetune(base, head, dataset, task, cfg, trigger=trigger,
                                                 checkpoint=partial / "trainer.pt", resume=resume, progress=progress,
                                                 shadow=shadow)
    summary: dict[str, Any] = {"attack": cfg.kind, "task": task, "config": asdict(cfg),
                               "final_loss": losses[-1] if losses else None}
    if eval_data is not None:  # off-task: the backdoor aims at another task's class; CA only here
        result = evaluate(model, {task: head}, {task: eval_data}, trigger=trigger if shadow is None else None,
                          target_task=task, device=cfg.device, progress=progress)
        summary["ca"] = result["tasks"][task]["ca"]
        summary["asr"] = result["tasks"][task].get("asr")
    rank, _ = init_distributed()
    if rank == 0:  # under torchrun every process holds the same model; one writes it
        with staged_outputs(out_dir) as stage:
            write_outputs(stage, model, base, trigger, cfg, task, provenance or {}, summary)
    return summary
