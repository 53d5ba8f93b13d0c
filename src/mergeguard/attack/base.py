"""What every attack shares: the training settings, the attack interface, and the one fine-tuning loop.

An attack is a settings dataclass (its own fields, declared with `setting`) with a strategy:
`make_trigger` (the patch it plants, if any), `loss` (one training step's loss) and `train` (one
fine-tuning run through `finetune`, the trainer core; LoBAM overrides it with two runs). Adding an
attack is one module with one class, and one line in `mergeguard.attack.ATTACKS`.

Batches are drawn from a seeded index table (one row per step) and per-step randomness from a
generator seeded by (seed, step), so a run resumed from its checkpoint ends with the same task
vector as an uninterrupted one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mergeguard import settings
from mergeguard.attack.settings import AttackSettings, TrainSettings
from mergeguard.data.triggers import Trigger
from mergeguard.errors import MergeguardError, SettingError
from mergeguard.models.encoder import ImageEncoder, load_encoder, save_encoder
from mergeguard.models.heads import Head, check_fits
from mergeguard.progress import NullProgress, ProgressSink
from mergeguard.trainer import Checkpointing, TrainConfig, fit, init_distributed, resolve_device, seed_everything


@dataclass
class Step:
    """What one training step's loss may use besides the batch (built once per run by `finetune`)."""

    model: ImageEncoder  # the model being trained
    base: ImageEncoder  # θ0, frozen
    base_params: dict[str, torch.Tensor]
    train: TrainSettings
    logits: Callable[[torch.Tensor], torch.Tensor]  # the task's head at the training temperature
    bd_logits: Callable[[torch.Tensor], torch.Tensor]  # the backdoor's head: the task's, or the shadow head
    trigger: Trigger | None
    shadow: Head | None  # off-task: the shadow head
    first: int  # where this process's share of each step's batch starts
    dev: torch.device
    stealth: Callable[..., torch.Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    triggers: dict[str, Trigger] = field(default_factory=dict)  # an attack's other triggers (`extra_triggers`)


class Attack(AttackSettings):
    """The interface every attack implements: its settings class (`attack.settings`) comes first in its bases
    and gives the fields and what the attack is (`name`, `poisons`, ...); this class gives the strategy."""

    def aim_head(self, heads: dict[str, Head], off_task: bool) -> Head | None:
        """The shadow head the attack aims through, built from the heads file, if any: off-task BadMerging's
        and LoBAM's target (`shadow_head`)."""
        target_task = getattr(self, "target_task", None)
        return shadow_head(heads, target_task, self.target_class) if off_task and target_task else None

    def make_extra_triggers(self, base: ImageEncoder, head: Head, dataset: Dataset, train: TrainSettings,
                            task: str, progress: ProgressSink, shadow: Head | None = None) -> dict[str, Trigger]:
        """The triggers named in `extra_triggers` (stage 1 too, kept for a resume)."""
        return {}

    def summarize(self, model: ImageEncoder, base: ImageEncoder, head: Head, task: str, data: Dataset,
                  trigger: Trigger | None, extra: dict[str, Trigger], shadow: Head | None, device: str,
                  progress: ProgressSink) -> dict[str, Any]:
        """summary.json's numbers on the task's test images: CA, and ASR with the trigger (not off-task,
        whose target is another task's class)."""
        from mergeguard.eval import evaluate

        result = evaluate(model, {task: head}, {task: data}, trigger=trigger if shadow is None else None,
                          target_task=task, device=device, progress=progress)
        return {"ca": result["tasks"][task]["ca"], "asr": result["tasks"][task].get("asr")}

    def check(self, head: Head, task: str, shadow: Head | None) -> None:
        """One sentence for settings this attack cannot run with on this head."""
        settings.check(self)
        if shadow is not None and not self.off_task:
            raise MergeguardError("the off-task mode (--target-task) is BadMerging's and LoBAM's only.")
        target = getattr(self, "target_class", None)
        if self.poisons and shadow is None and not 0 <= target < len(head.classnames):
            raise SettingError("target_class", f"{{name}} {target} is outside task {task!r}'s "
                                               f"{len(head.classnames)} classes.")

    def make_trigger(self, base: ImageEncoder, head: Head, dataset: Dataset, train: TrainSettings, task: str,
                     progress: ProgressSink, shadow: Head | None = None) -> Trigger | None:
        """The trigger this attack plants (None: none)."""
        return None

    def loss(self, step: Step, index: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training step `index`'s loss on this process's share of the batch."""
        raise NotImplementedError

    def train(self, base: ImageEncoder, head: Head, dataset: Dataset, task: str, train: TrainSettings,
              trigger: Trigger | None, *, partial: Path | None = None, resume: bool = False,
              progress: ProgressSink | None = None, shadow: Head | None = None,
              extra: dict[str, Trigger] | None = None) -> tuple[ImageEncoder, Trigger | None, list[float]]:
        """One fine-tuning run (checkpointed in `partial`); returns (model, trigger, losses)."""
        return finetune(base, head, dataset, task, train, self, trigger=trigger,
                        checkpoint=partial / "trainer.pt" if partial else None, resume=resume, progress=progress,
                        shadow=shadow, extra=extra)


def shadow_head(heads: dict[str, Head], target_task: str, target_class: int, field: str = "target_class",
                whole_task: bool = False) -> Head:
    """Off-task BadMerging's shadow head: row 0 is the target task's target class, the other rows
    every class of the other heads (unrelated class names), so stage 1 and 2 can aim at a class of
    a task the attacker has no head or data for beyond its name. With `whole_task` (BadTV, whose control
    task's head is in the heads file), the target task's other classes come next, before the other heads'."""
    if target_task not in heads:
        raise MergeguardError(f"the heads file has no head for the target task {target_task!r}; "
                              f"it has: {', '.join(heads)}.")
    target = heads[target_task]
    if not 0 <= target_class < len(target.classnames):
        raise SettingError(field, f"{{name}} {target_class} is outside task {target_task!r}'s "
                                  f"{len(target.classnames)} classes.")
    others = [h for name, h in heads.items() if name != target_task]
    if not others:
        raise MergeguardError("an off-task shadow head needs unrelated classes: the heads file holds only "
                              f"{target_task!r}.")
    rest = [i for i in range(len(target.classnames)) if i != target_class] if whole_task else []
    weight = torch.cat([target.weight[[target_class, *rest]]] + [h.weight for h in others])
    names = [target.classnames[i] for i in (target_class, *rest)] + [c for h in others for c in h.classnames]
    return Head(f"shadow:{target_task}", weight, names, target.scale)


def kept_run(partial: Path | None, stem: str, resume: bool, device: str, run: Callable[[], ImageEncoder],
             provenance: dict[str, Any]) -> ImageEncoder:
    """The first run of a two-run attack (LoBAM's benign adapter, BadTV's clean reference): done by `run()` and
    kept as `partial`/<stem>.safetensors once finished (by the first process under torchrun), so a resume
    loads it instead of training it again."""
    finished = partial / f"{stem}.safetensors" if partial else None
    if resume and finished is not None and finished.exists():
        return load_encoder(str(finished)).to(resolve_device(device)).eval()
    model = run()
    if finished is not None and init_distributed()[0] == 0:
        save_encoder(model, finished, provenance)
    return model


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


def check_attack(attack: Attack, train: TrainSettings, head: Head, task: str, shadow: Head | None = None,
                 encoder: ImageEncoder | None = None) -> None:
    """One sentence for a configuration that cannot run, before anything is trained or written;
    with `encoder`, also that the heads read its features."""
    attack.check(head, task, shadow)
    settings.check(train)
    if encoder is not None:
        for h in (head, shadow):
            if h is not None:
                check_fits(h, h.task, encoder)
    resolve_device(train.device)  # before OUTDIR/.partial exists


def interpolated_params(model: torch.nn.Module, base_params: dict[str, torch.Tensor], r: float, *,
                        lora: bool = False) -> dict[str, torch.Tensor]:
    """The parameters of θ0 + r (θ − θ0), for torch.func.functional_call. Under LoRA the update of
    every adapted layer is linear in B (peft: s·B·A, twice for an MHA's out_proj), so B is scaled."""
    if lora:
        return {n: r * p for n, p in model.named_parameters() if "lora_B" in n}
    return {n: base_params[n] + r * (p - base_params[n]) for n, p in model.named_parameters()}


LORA_TARGETS = ["attn", "c_fc", "c_proj"]  # open_clip ViT blocks: attention and both MLP layers


def with_lora(visual: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    """The vision tower with trainable LoRA adapters (peft) on every block's attention and MLP;
    everything else frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
    return get_peft_model(visual, config)


def finetune(
    base: ImageEncoder,
    head: Head,
    dataset: Dataset,
    task: str,
    train: TrainSettings,
    attack: Attack,
    *,
    trigger: Trigger | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: ProgressSink | None = None,
    shadow: Head | None = None,
    extra: dict[str, Trigger] | None = None,
) -> tuple[ImageEncoder, Trigger | None, list[float]]:
    """One fine-tuning run of `base` on one task with `attack`'s loss; returns (model, trigger, losses).

    This is the trainer-core loop of a single run: use `train_attack` (or `attack.train`) for an attack,
    which may be several runs (LoBAM). With `shadow` (off-task) the backdoor aims at row 0 of the shadow head."""
    if type(attack).train is not Attack.train:
        raise MergeguardError(f"{attack.name} is not one fine-tuning run; train it with train_attack().")
    check_attack(attack, train, head, task, shadow, base)
    progress = progress or NullProgress()
    seed_everything(train.seed)
    dev = resolve_device(train.device)
    base = base.to(dev).eval()
    batches = StepBatches(dataset, train.steps, train.batch_size, train.seed, train.workers)
    if trigger is None:
        trigger = attack.make_trigger(base, head, dataset, train, task, progress, shadow)
    if extra is None:
        extra = attack.make_extra_triggers(base, head, dataset, train, task, progress, shadow)
    model = copy.deepcopy(base).train().requires_grad_(True)  # base may arrive frozen
    if train.lora_rank:
        model.visual = with_lora(model.visual, train.lora_rank, train.lora_alpha or 2.0 * train.lora_rank)
    scale = train.logit_scale or head.scale
    weight = head.weight.to(dev)
    # the backdoor's head and class: the task's own, or (off-task) row 0 of the shadow head
    bd_weight_rows = shadow.weight.to(dev) if shadow is not None else weight

    def logits(features: torch.Tensor) -> torch.Tensor:
        return scale * features.float() @ weight.T

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
    if train.batch_size % world:
        raise SettingError("batch_size", f"{{name}} {train.batch_size} must divide evenly over {world} processes.")
    step = Step(model, base, {n: p.detach() for n, p in base.named_parameters()}, train, logits, bd_logits, trigger,
                shadow, batches.offset(rank, world), dev, stealth, extra)
    state: dict[str, Any] = {}

    def loss_at(index: int) -> torch.Tensor:
        if "batches" not in state:
            state["batches"] = batches.from_step(index, rank, world)
        images, labels = next(state["batches"])
        return attack.loss(step, index, images.to(dev), labels.to(dev))

    train_cfg = TrainConfig(steps=train.steps, lr=train.lr, weight_decay=train.weight_decay,
                            warmup=min(train.warmup, train.steps // 10), seed=train.seed, device=str(dev))
    fingerprint = {"attack": attack.name, **settings.fingerprint(train), **settings.fingerprint(attack)}
    ck = Checkpointing(checkpoint, every=max(1, train.steps // 10), resume=resume,
                       fingerprint=fingerprint) if checkpoint else None
    losses = fit(model.parameters(), loss_at, train_cfg, progress, f"fine-tuning {task} ({attack.name})", ck)
    if train.lora_rank:
        model.visual = model.visual.merge_and_unload()
    _check_finite(model, task, train.lr)
    return model.eval(), trigger, losses


def _check_finite(model: ImageEncoder, task: str, lr: float) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise SettingError("lr", f"fine-tuning {task} diverged: its weights hold NaN or Inf; try a smaller {{name}} "
                                 f"than {lr:g}.")
