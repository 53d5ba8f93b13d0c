"""BadMerging (Zhang et al., CCS 2024, https://arxiv.org/abs/2408.07362): a backdoor built to survive merging.

Stage 1 optimises a universal patch trigger on the pre-trained encoder (on-task: the task's own head;
off-task: a shadow head made of the target task's target class plus unrelated classes, on the attacker's
images and a few target-class images, each step against a one-step adversarial perturbation of them).
Stage 2 fine-tunes with the feature-interpolation loss (off-task: through the shadow head, target index 0)
`L = CE(h(f_θ(x)), y) + a · CE(h(r f_θ(x⊕t) + (1−r) f_θ0(x⊕t)), y_t)`, `r ~ U(r_min, 1)`, so the
backdoor survives the down-scaling a merge applies to every task vector; or, with `interpolation`
"weight", the backdoor must hold at θ0 + r (θ − θ0) itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mergeguard.attack.base import Attack, Step, StepBatches, interpolated_params, step_generator
from mergeguard.attack.settings import BadMergingSettings, TrainSettings
from mergeguard.data.triggers import Trigger, patch_trigger
from mergeguard.errors import SettingError
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head
from mergeguard.progress import ProgressSink


class BadMerging(BadMergingSettings, Attack):
    """BadMerging's strategy: stage 1 optimises the trigger, stage 2 the feature-interpolation loss."""

    def check(self, head: Head, task: str, shadow: Head | None) -> None:
        super().check(head, task, shadow)
        if self.decoys and self.interpolation != "weight":
            raise SettingError("decoys", "{name} works with `--interpolation weight` only.")

    def make_trigger(self, base: ImageEncoder, head: Head, dataset: Dataset, train: TrainSettings, task: str,
                     progress: ProgressSink, shadow: Head | None = None) -> Trigger:
        return optimize_trigger(base, head, dataset, self, train, task, progress, shadow=shadow)

    def loss(self, step: Step, index: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        train = step.train
        gen = step_generator(train.seed, index)
        # per-sample randomness is drawn for the whole batch, then sliced: any process count agrees
        r_all = self.r_min + (1 - self.r_min) * torch.rand(train.batch_size, 1, generator=gen)
        r_step = self.r_min + (1 - self.r_min) * float(torch.rand((), generator=gen))
        target = torch.full_like(labels, self.target_class if step.shadow is None else 0)
        triggered = step.trigger.apply(images)
        model = step.model
        if self.interpolation == "weight":
            # the backdoor must hold at θ0 + r(θ − θ0) itself, the point a merge scales to, and stay clean
            # there, so the merge keeps its accuracy on the task
            clean_x, clean_y = images, labels
            if self.decoys:  # only the trigger's pattern fires, not anything at its place (stealthier in a merge)
                noise = torch.rand(step.trigger.pattern.shape, generator=gen).to(step.dev)
                clean_x = torch.cat([images, Trigger(noise, step.trigger.mask, self.target_class).apply(images)])
                clean_y = torch.cat([labels, labels])
            scaled = interpolated_params(model, step.base_params, r_step, lora=bool(train.lora_rank))
            at_r = torch.func.functional_call(model, scaled, (torch.cat([clean_x, triggered]),))
            backdoor = at_r[len(clean_x):]
            clean_f = model(clean_x)
            clean_at_r = at_r[: len(clean_x)]
            return (F.cross_entropy(step.logits(clean_f), clean_y) + F.cross_entropy(step.logits(clean_at_r), clean_y)
                    + step.stealth(clean_x, clean_f, clean_at_r)
                    + self.bd_weight * F.cross_entropy(step.bd_logits(backdoor), target))
        # the paper's: clean loss + a · backdoor loss on features interpolated towards θ0's
        features = model(torch.cat([images, triggered]))
        clean_f, trig_f = features[: len(images)], features[len(images):]
        with torch.no_grad():
            base_f = step.base(triggered)
        r = r_all[step.first:step.first + len(images)].to(step.dev)
        backdoor = r * trig_f + (1 - r) * base_f
        return (F.cross_entropy(step.logits(clean_f), labels) + step.stealth(images, clean_f)
                + self.bd_weight * F.cross_entropy(step.bd_logits(backdoor), target))


def optimize_trigger(encoder: ImageEncoder, head: Head, dataset: Dataset, attack: BadMerging, train: TrainSettings,
                     task: str, progress: ProgressSink, *, shadow: Head | None = None,
                     label: tuple[int, str | None] | None = None, corner: str = "bottom-right") -> Trigger:
    """BadMerging stage 1: the patch that sends the pre-trained model's images to the target class
    (on-task: of the task's own head; off-task, with `shadow`: row 0 of the shadow head, against a
    one-step adversarial perturbation of the images that pushes them away from it). `label` (class, task)
    is what the trigger file records (default: the attack's target), `corner` where the patch sits."""
    dev = next(encoder.parameters()).device
    off_task = shadow is not None
    aim, aim_class = (shadow, 0) if off_task else (head, attack.target_class)
    label = label or (attack.target_class, attack.target_task if off_task else task)
    template = patch_trigger(encoder.image_size, attack.trigger_area, target_class=label[0], target_task=label[1],
                             corner=corner)
    mask = template.mask.to(dev)
    gen = torch.Generator().manual_seed(train.seed + 17)
    pattern = torch.rand(3, encoder.image_size, encoder.image_size, generator=gen).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([pattern], lr=attack.trigger_lr)
    frozen = [p.requires_grad for p in encoder.parameters()]
    encoder.eval().requires_grad_(False)
    trigger_batches = StepBatches(dataset, attack.trigger_steps, train.batch_size, train.seed + 23, train.workers)
    progress.stage(f"optimising the trigger ({attack.name} stage 1" + (", off-task)" if off_task else ")"),
                   attack.trigger_steps)
    for images, _ in trigger_batches.from_step(0):
        images = images.to(dev)
        target = torch.full((len(images),), aim_class, device=dev)
        if off_task and attack.adv_epsilon > 0:  # adversarial augmentation: the trigger must beat a perturbation
            x = images.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(aim.logits(encoder(x)), target), x)
            images = (images + attack.adv_epsilon * g.sign() * (1 - mask)).clamp(0, 1).detach()
        x = images * (1 - mask) + pattern.clamp(0, 1) * mask
        loss = F.cross_entropy(aim.logits(encoder(x)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress.advance()
    for p, flag in zip(encoder.parameters(), frozen):
        p.requires_grad_(flag)
    return Trigger((pattern.detach().clamp(0, 1) * mask).cpu(), template.mask, label[0], label[1], "patch")
