"""Clean accuracy and attack success rate, and nothing else.

- CA: top-1 accuracy of each task's head on that task's clean test images.
- ASR(T): on the target task, among images whose label is not the target class, the
  fraction predicted as the target class once the trigger is pasted.
- ASR(N): the same on every other task, with its own head and the same target index
  (backdoor spill-over), averaged over the tasks whose head has that index.
- ASR(T) without the trigger (`asr_t_no_trigger`): the same count on the clean images. ASR(T)
  includes it, so it is the floor no trigger-removing defense can go below; a poisoned merge
  can confuse many images into the target class with no trigger at all.
- ASR(N) without the trigger (`asr_n_no_trigger`): the same for ASR(N). On the other tasks the
  target index is just one of their classes, so most of ASR(N) can be their own confusion; the
  trigger's spill-over is what ASR(N) adds over it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mergeguard.data.triggers import Trigger
from mergeguard.errors import MergeguardError
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head, check_fits
from mergeguard.progress import NullProgress, ProgressSink
from mergeguard.trainer import autocast, resolve_device


@torch.no_grad()
def evaluate(
    encoder: ImageEncoder,
    heads: Mapping[str, Head],
    data: Mapping[str, Dataset],
    *,
    trigger: Trigger | None = None,
    target_task: str | None = None,
    batch_size: int = 128,
    device: str | None = "auto",
    workers: int = 0,
    progress: ProgressSink | None = None,
) -> dict[str, Any]:
    """CA per task and, with a trigger, ASR per task, ASR(T) and ASR(N), as fractions in [0, 1]."""
    progress = progress or NullProgress()
    for task in data:
        if task not in heads:
            raise MergeguardError(f"no head for task {task!r}; the heads file has: {', '.join(heads)}.")
    if trigger is not None:
        target_task = target_task or trigger.target_task
        if target_task not in data:
            raise MergeguardError(
                f"the trigger's target task {target_task!r} is not among the evaluated tasks "
                f"({', '.join(data)}); pass --target-task."
            )
        classes = len(heads[target_task].classnames)
        if not 0 <= trigger.target_class < classes:
            raise MergeguardError(f"the trigger's target class {trigger.target_class} is outside task "
                                  f"{target_task!r}'s {classes} classes.")
    for task in data:
        check_fits(heads[task], task, encoder)
    dev = resolve_device(device)
    encoder = encoder.to(dev).eval()
    target = trigger.target_class if trigger is not None else None
    tasks: dict[str, dict[str, Any]] = {}
    for task, dataset in data.items():
        head = heads[task]
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
        correct = total = hits = eligible = floor = 0
        progress.stage(f"eval {task}", len(loader))
        for images, labels in loader:
            images, labels = images.to(dev), labels.to(dev)
            batch = torch.cat([images, trigger.apply(images)]) if trigger is not None else images
            with autocast(dev):
                preds = head.logits(encoder(batch).float()).argmax(dim=1)
            clean = preds[: len(images)]
            correct += int((clean == labels).sum())
            total += len(labels)
            if trigger is not None and target < len(head.classnames):
                keep = labels != target
                hits += int((preds[len(images):][keep] == target).sum())
                floor += int((clean[keep] == target).sum())
                eligible += int(keep.sum())
            progress.advance()
        entry: dict[str, Any] = {"ca": correct / total, "n": total}
        if trigger is not None:
            entry["asr"] = hits / eligible if eligible else None
            entry["asr_no_trigger"] = floor / eligible if eligible else None
        tasks[task] = entry
    result: dict[str, Any] = {
        "tasks": tasks,
        "ca_avg": sum(t["ca"] for t in tasks.values()) / len(tasks),
        "asr_t": None,
        "asr_n": None,
    }
    if trigger is not None:
        result["asr_t"] = tasks[target_task]["asr"]
        result["asr_t_no_trigger"] = tasks[target_task]["asr_no_trigger"]
        others = [t for name, t in tasks.items() if name != target_task and t["asr"] is not None]
        for key, count in (("asr_n", "asr"), ("asr_n_no_trigger", "asr_no_trigger")):
            result[key] = sum(t[count] for t in others) / len(others) if others else None
        result["target_task"] = target_task
        result["target_class"] = target
    return result


def forgetting(result: Mapping[str, Any], task: str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What forgetting `task` (θ0 − λτ) did, from `evaluate`'s results on the edited model and, when given, on
    θ0: the forgotten task's CA, the control tasks' (all the others') average CA, and with θ0 how far each
    moved (the forgotten task should fall; the controls should stay, the task-arithmetic paper keeping ≥ 95%
    of θ0's)."""
    if task not in result["tasks"]:
        raise MergeguardError(f"the forgotten task {task!r} is not among the evaluated tasks "
                              f"({', '.join(result['tasks'])}); add --task {task}=DIR.")
    controls = [t for t in result["tasks"] if t != task]
    if not controls:
        raise MergeguardError("forgetting is judged against control tasks: evaluate at least one other --task.")

    def split(r: Mapping[str, Any]) -> tuple[float, float]:
        return r["tasks"][task]["ca"], sum(r["tasks"][t]["ca"] for t in controls) / len(controls)

    ca, control = split(result)
    out: dict[str, Any] = {"task": task, "ca": ca, "controls": controls, "control_ca": control}
    if base is not None:
        base_ca, base_control = split(base)
        out.update({"base_ca": base_ca, "base_control_ca": base_control, "forgotten": base_ca - ca,
                    "control_kept": control / base_control if base_control else None})
    return out


def crossed_thresholds(result: dict[str, Any], max_asr: float | None, min_ca: float | None) -> list[str]:
    """The release gate on an `evaluate` result: one line per threshold crossed (ASR(T) or ASR(N) above
    `max_asr`, the average CA below `min_ca`); empty when it passes."""
    crossed = []
    if max_asr is not None:
        for key in ("asr_t", "asr_n"):
            if result[key] is not None and result[key] > max_asr:
                crossed.append(f"{key.replace('_', '(').upper()}) {result[key]:.1%} > --max-asr {max_asr:.1%}")
    if min_ca is not None and result["ca_avg"] < min_ca:
        crossed.append(f"average CA {result['ca_avg']:.1%} < --min-ca {min_ca:.1%}")
    return crossed
