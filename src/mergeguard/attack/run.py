"""An attack from start to OUTDIR: stage 1 (its trigger), training, evaluation on the task, the outputs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mergeguard.attack.base import Attack, TrainSettings, check_attack
from mergeguard.checkpoint.writer import staged_outputs
from mergeguard.data.triggers import Trigger, load_trigger
from mergeguard.models.encoder import ImageEncoder, save_encoder
from mergeguard.models.heads import Head
from mergeguard.progress import NullProgress, ProgressSink
from mergeguard.trainer import init_distributed, resolve_device

ATTACK_OUTPUTS = ("model.safetensors", "task_vector.safetensors", "trigger.safetensors", "arch.json", "summary.json")


def attack_outputs(attack: Attack) -> tuple[str, ...]:
    """The files `attack` writes into OUTDIR: every attack's, and one per extra trigger (`extra_triggers`)."""
    return ATTACK_OUTPUTS + tuple(f"{stem}.safetensors" for stem in attack.extra_triggers)


def settings_of(attack: Attack, train: TrainSettings) -> dict[str, Any]:
    """Both settings objects as one record (the summary's and the metadata's `config`)."""
    return {"train": asdict(train), attack.name: asdict(attack)}


def train_attack(base: ImageEncoder, head: Head, dataset: Dataset, task: str, attack: Attack, train: TrainSettings,
                 *, trigger: Trigger | None = None, partial: Path | None = None, resume: bool = False,
                 progress: ProgressSink | None = None, shadow: Head | None = None,
                 extra: dict[str, Trigger] | None = None) -> tuple[ImageEncoder, Trigger | None, list[float]]:
    """Train `attack` on one task (as many runs as it takes; LoBAM: two); returns (model, trigger, losses)."""
    check_attack(attack, train, head, task, shadow, base)
    return attack.train(base, head, dataset, task, train, trigger, partial=partial, resume=resume,
                        progress=progress, shadow=shadow, extra=extra)


def write_outputs(out_dir: Path, model: ImageEncoder, base: ImageEncoder, trigger: Trigger | None, attack: Attack,
                  train: TrainSettings, task: str, provenance: dict, summary: dict,
                  extra: dict[str, Trigger] | None = None) -> None:
    """OUTDIR/{model.safetensors, task_vector.safetensors, trigger.safetensors, arch.json, summary.json}, and
    one <stem>.safetensors per extra trigger."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prov = {**provenance, "attack": attack.name, "task": task, "config": settings_of(attack, train)}
    save_encoder(model, out_dir / "model.safetensors", prov)
    save_encoder(model, out_dir / "task_vector.safetensors", prov, base=base)
    if trigger is not None:
        trigger.save(out_dir / "trigger.safetensors", overwrite=True)
    for stem, other in (extra or {}).items():
        other.save(out_dir / f"{stem}.safetensors", overwrite=True)
    (out_dir / "arch.json").write_text(json.dumps(model.arch, indent=2))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def run_attack(
    base: ImageEncoder,
    head: Head,
    dataset: Dataset,
    task: str,
    attack: Attack,
    train: TrainSettings,
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
    check_attack(attack, train, head, task, shadow, base)  # before OUTDIR/.partial exists
    partial = out_dir / ".partial"  # made by the first thing saved there: a run that fails earlier leaves no folder
    trigger_file = partial / "trigger.safetensors"
    extra_files = {stem: partial / f"{stem}.safetensors" for stem in attack.extra_triggers}
    trigger, extra = None, None
    progress = progress or NullProgress()
    stage1 = dataset if target_images is None else torch.utils.data.ConcatDataset([dataset, target_images])
    if resume and trigger_file.exists():
        trigger = load_trigger(trigger_file)
    elif attack.optimised_trigger:  # stage 1, kept for a resume
        trigger = attack.make_trigger(base.to(resolve_device(train.device)), head, stage1, train, task, progress,
                                      shadow)
        partial.mkdir(parents=True, exist_ok=True)
        trigger.save(trigger_file, overwrite=True)
    if extra_files:  # an attack's other triggers: stage 1 as well, kept for a resume
        if resume and all(f.exists() for f in extra_files.values()):
            extra = {stem: load_trigger(f) for stem, f in extra_files.items()}
        else:
            extra = attack.make_extra_triggers(base.to(resolve_device(train.device)), head, stage1, train, task,
                                               progress, shadow)
            partial.mkdir(parents=True, exist_ok=True)
            for stem, other in extra.items():
                other.save(extra_files[stem], overwrite=True)
    model, trigger, losses = attack.train(base, head, dataset, task, train, trigger, partial=partial, resume=resume,
                                          progress=progress, shadow=shadow, extra=extra)
    summary: dict[str, Any] = {"attack": attack.name, "task": task, "config": settings_of(attack, train),
                               "final_loss": losses[-1] if losses else None}
    if eval_data is not None:
        summary.update(attack.summarize(model, base, head, task, eval_data, trigger, extra or {}, shadow,
                                        train.device, progress))
    rank, _ = init_distributed()
    if rank == 0:  # under torchrun every process holds the same model; one writes it
        with staged_outputs(out_dir) as stage:
            write_outputs(stage, model, base, trigger, attack, train, task, provenance or {}, summary, extra)
    return summary
