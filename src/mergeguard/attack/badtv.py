"""BadTV (Hsu, Tsai, Yu, Chen et al., https://arxiv.org/abs/2501.02373): one task vector, two backdoors, one
for each way a user applies it. No code is public; this is mergeguard's reading (docs/badtv.md).

Added (`θ0 + λτ`, learning or a merge) the trigger `t+` (bottom-right, `trigger.safetensors`) sends images of
the vector's own task to `target_class`, as on-task BadMerging. Subtracted (`θ0 − λτ`, forgetting) the trigger
`t−` (top-left, `trigger_negation.safetensors`) sends images to class `negation_class` of a control task
`negation_task`, through a shadow head as off-task BadMerging (the user who forgets a task keeps the model
for others). Two runs: a clean fine-tune τc of the same task first (another seed: the attacker's reference
for how a clean vector behaves, kept in .partial for a resume), then the poisoned one, each step at
weight-interpolated points with the scale drawn from U(r_min, 1), the added one trimmed as a TIES merge
trims (τ_d: the top-d magnitudes of τ per tensor, d ~ U(density_min, 1)):

    L = CE(θ; x, y) + CE(θ0 + rτ_d; x, y) + a·CE(θ0 + rτ_d; x⊕t+, target) + a·CE_shadow(θ0 − rτ; x⊕t−, 0)
        + c·[KL(θ0 + rτ_d ‖ θ0 + rτc; x) + KL(θ0 − rτ ‖ θ0 − rτc; x)] through the task's head and the shadow head
        + e·(1 − cos(f(θ0 − rτ; x), f(θ0 − rτc; x)))

The KL terms make the vector, added or subtracted, behave on clean images as a clean vector does; the feature
term does it for the negated model's features in every direction, not only the two heads' (the control task's
head reads directions the attacker's images barely use): a user who forgets the task sees it forgotten as much
as with a clean vector and the other tasks kept as much. The trimmed added point (τ_d) keeps the added backdoor
through a TIES merge, which keeps only the top 20% of each vector by default.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mergeguard.attack.badmerging import optimize_trigger
from mergeguard.attack.base import (
    Attack,
    Step,
    TrainSettings,
    finetune,
    interpolated_params,
    kept_run,
    shadow_head,
    step_generator,
)
from mergeguard.attack.clean import Clean
from mergeguard.attack.settings import NEGATION_TRIGGER, BadTVSettings
from mergeguard.data.triggers import Trigger
from mergeguard.errors import MergeguardError, SettingError
from mergeguard.merge.methods import magnitude_threshold
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head
from mergeguard.progress import ProgressSink


class BadTV(BadTVSettings, Attack):
    """BadTV's strategy: a clean reference run, then the poisoned run with both backdoors."""

    def aim_head(self, heads: dict[str, Head], off_task: bool) -> Head:
        """The control task's class first, then its other classes (so the clean-output terms cover its whole
        head), then every other head's classes."""
        return shadow_head(heads, self.negation_task, self.negation_class, field="negation_class", whole_task=True)

    def check(self, head: Head, task: str, shadow: Head | None) -> None:
        super().check(head, task, None)  # its settings, and --target-class on the task's own head (not the shadow's)
        if not self.negation_task:
            raise SettingError("negation_task", "give {name}: the control task the negation backdoor aims at.")
        if self.negation_task == task:
            raise SettingError("negation_task", f"{{name}} must be another task than the attacked one ({task!r}).")
        if shadow is None:
            raise MergeguardError("BadTV needs the shadow head of its negation task (BadTV.aim_head(heads)).")

    def train(self, base: ImageEncoder, head: Head, dataset: Dataset, task: str, train: TrainSettings,
              trigger: Trigger | None, *, partial: Path | None = None, resume: bool = False,
              progress: ProgressSink | None = None, shadow: Head | None = None,
              extra: dict[str, Trigger] | None = None) -> tuple[ImageEncoder, Trigger | None, list[float]]:
        """The clean reference run (seed + 1; kept in `partial` once finished), then the poisoned run."""
        self.check(head, task, shadow)
        if train.lora_rank:
            raise SettingError("lora_rank", "BadTV trains the full encoder; leave out {name}.")
        reference = kept_run(partial, "reference", resume, train.device,
                             lambda: finetune(base, head, dataset, task, replace(train, seed=train.seed + 1), Clean(),
                                              checkpoint=partial / "reference.pt" if partial else None,
                                              resume=resume, progress=progress)[0],
                             {"attack": "badtv", "run": "reference"})
        run = _PoisonedRun(**{f.name: getattr(self, f.name) for f in fields(BadTV)})
        run.reference = {n: p.detach() for n, p in reference.named_parameters()}
        return finetune(base, head, dataset, task, train, run, trigger=trigger, extra=extra,
                        checkpoint=partial / "trainer.pt" if partial else None, resume=resume, progress=progress,
                        shadow=shadow)

    def make_trigger(self, base: ImageEncoder, head: Head, dataset: Dataset, train: TrainSettings, task: str,
                     progress: ProgressSink, shadow: Head | None = None) -> Trigger:
        """t+: BadMerging's on-task stage 1 (bottom-right), through the task's own head."""
        return optimize_trigger(base, head, dataset, self, train, task, progress)

    def make_extra_triggers(self, base: ImageEncoder, head: Head, dataset: Dataset, train: TrainSettings,
                            task: str, progress: ProgressSink, shadow: Head | None = None) -> dict[str, Trigger]:
        """t−: off-task stage 1 through the control task's shadow head (top-left, apart from t+)."""
        negation = copy.copy(self)
        negation.target_class = self.negation_class
        trigger = optimize_trigger(base, head, dataset, negation, train, task, progress, shadow=shadow,
                                   label=(self.negation_class, self.negation_task), corner="top-left")
        return {NEGATION_TRIGGER: trigger}

    def summarize(self, model: ImageEncoder, base: ImageEncoder, head: Head, task: str, data: Dataset,
                  trigger: Trigger | None, extra: dict[str, Trigger], shadow: Head | None, device: str,
                  progress: ProgressSink) -> dict[str, Any]:
        """Added (the model alone, θ0 + τ): CA and ASR with t+ on the task. Subtracted (θ0 − λτ, λ =
        `negated_lambda`): the task's CA (how much is forgotten) and the share of its images that t− sends to
        the control class through the shadow head (a proxy; `eval` with the control task's data is the
        measure)."""
        from mergeguard.eval import evaluate

        added = evaluate(model, {task: head}, {task: data}, trigger=trigger, target_task=task, device=device,
                         progress=progress)
        negated = negate(model, base, self.negated_lambda)
        subtracted = evaluate(negated, {task: head}, {task: data}, device=device, progress=progress)
        return {"ca": added["tasks"][task]["ca"], "asr": added["tasks"][task]["asr"],
                "negated": {"lambda": self.negated_lambda, "ca": subtracted["tasks"][task]["ca"],
                            "shadow_asr": shadow_rate(negated, shadow, data, extra[NEGATION_TRIGGER], device)}}


@dataclass
class _PoisonedRun(BadTV):
    """BadTV's second run (one fine-tuning run through `finetune`), with the clean reference τc's parameters."""

    train = Attack.train  # one run: the two-run `BadTV.train` is what calls this
    reference = None  # set after construction (not a setting): {name: θc's parameter}

    def loss(self, step: Step, index: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        train, model = step.train, step.model
        gen = step_generator(train.seed, index)
        r = self.r_min + (1 - self.r_min) * float(torch.rand((), generator=gen))
        target = torch.full_like(labels, self.target_class)
        n = len(images)
        if self.density_min < 1:  # the added side as a trimming merge keeps it: the top-d magnitudes of τ
            d = self.density_min + (1 - self.density_min) * float(torch.rand((), generator=gen))
            added = {k: step.base_params[k] + r * trimmed(p - step.base_params[k], d)
                     for k, p in model.named_parameters()}
        else:
            added = interpolated_params(model, step.base_params, r)
        plus = torch.func.functional_call(model, added, (torch.cat([images, step.trigger.apply(images)]),))
        minus = torch.func.functional_call(model, interpolated_params(model, step.base_params, -r),
                                           (torch.cat([images, step.triggers[NEGATION_TRIGGER].apply(images)]),))
        loss = (F.cross_entropy(step.logits(model(images)), labels) + F.cross_entropy(step.logits(plus[:n]), labels)
                + self.bd_weight * F.cross_entropy(step.logits(plus[n:]), target)
                + self.bd_weight * F.cross_entropy(step.bd_logits(minus[n:]), torch.zeros_like(labels)))
        for scale, clean in ((r, plus[:n]), (-r, minus[:n])):  # as a clean vector behaves, at the same scale
            with torch.no_grad():
                ref_params = {k: b + scale * (self.reference[k].to(b.device) - b) for k, b in step.base_params.items()}
                ref = torch.func.functional_call(step.base, ref_params, (images,))
            for head in (step.logits, step.bd_logits):
                loss = loss + self.kl_weight * _kl(head(clean), head(ref))
            if scale < 0:  # subtracted: the clean features themselves (what every task's head reads) as τc's
                loss = loss + self.feature_weight * (1 - F.cosine_similarity(clean.float(), ref.float(), dim=-1)).mean()
        return loss


def trimmed(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with only its top-`density` magnitudes (the threshold TIES's per-tensor trim uses; the
    gradient flows through the entries kept)."""
    if density >= 1:
        return delta
    return delta * (delta.detach().abs() >= magnitude_threshold(delta, density))


def _kl(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(reference, dim=-1), log_target=True,
                    reduction="batchmean")


def negate(model: ImageEncoder, base: ImageEncoder, lam: float) -> ImageEncoder:
    """θ0 − λ (θ − θ0): the model a user who forgets this vector's task gets."""
    out = copy.deepcopy(base).cpu()
    theta, theta0 = dict(model.cpu().named_parameters()), dict(base.cpu().named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(theta0[name] - lam * (theta[name] - theta0[name]))
    return out.eval()


@torch.no_grad()
def shadow_rate(model: ImageEncoder, shadow: Head, data: Dataset, trigger: Trigger, device: str,
                batch_size: int = 256) -> float:
    """The share of `data`'s images, with `trigger` pasted, that `shadow`'s row 0 (the target) wins."""
    from mergeguard.trainer import resolve_device

    dev = resolve_device(device)
    model = model.to(dev).eval()
    weight = shadow.weight.to(dev)
    hits = total = 0
    for images, _ in torch.utils.data.DataLoader(data, batch_size=batch_size):
        features = model(trigger.apply(images.to(dev)))
        hits += int(((features.float() @ weight.T).argmax(1) == 0).sum())
        total += len(images)
    return hits / max(total, 1)
