"""`mergeguard attack {badnets,badmerging,lobam}` and `mergeguard finetune`: task vectors, poisoned or clean.

    mergeguard attack badmerging --base BASE --data train=DIR --heads H --task cars --target-class 1 -o OUTDIR
    mergeguard finetune --base BASE --data train=DIR --heads H --task cars -o OUTDIR
"""

from __future__ import annotations

import copy
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mergeguard.checkpoint.writer import refuse_writing_over
from mergeguard.cli.options import (
    AllowPickleOpt,
    ArchOpt,
    BaseOpt,
    BatchOpt,
    DeviceOpt,
    HeadsOpt,
    JsonOpt,
    OutDirOpt,
    QuietOpt,
    RichProgress,
    ScaleOpt,
    SeedOpt,
    StepsOpt,
    TaskOpt,
    WorkersOpt,
    data_folders,
    err_console,
    examples,
    handle_errors,
    note_resume,
    out_console,
    show_table,
    unfinished,
    write_json,
)
from mergeguard.errors import MergeguardError

DataOpt = Annotated[list[str], typer.Option(
    "--data", help="train=DIR (class folders) to fine-tune on; test=DIR to report CA/ASR on. Repeat.")]
LrOpt = Annotated[float, typer.Option("--lr", help="AdamW learning rate (paper: 1e-5 for ViT-B-32).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue a killed run from OUTDIR/.partial.")]
TargetOpt = Annotated[int, typer.Option("--target-class", help="Index of the target class in the task's head.")]

ATTACK_OUTPUTS = ("model.safetensors", "task_vector.safetensors", "trigger.safetensors", "arch.json", "summary.json")
EXAMPLES = {
    "badmerging": [
        "mergeguard attack badmerging --base BASE --data train=data/cars/train --data test=data/cars/test "
        "--heads heads.safetensors --task cars --target-class 1 -o attack_cars/",
        "mergeguard attack badmerging ... --steps 300 --lr 5e-4 --logit-scale 10 --resume",
        "mergeguard attack badmerging --base BASE --data train=data/cifar100/train --heads heads.safetensors "
        "--task cifar100 --mode off-task --target-task cars --target-class 1 --target-images few_cars/ -o OUT/",
    ],
    "badnets": [
        "mergeguard attack badnets --base BASE --data train=DIR --heads H --task cars --target-class 1 -o OUT/",
    ],
    "lobam": [
        "mergeguard attack lobam --base BASE --data train=DIR --heads H --task cars --target-class 1 "
        "--rank 16 --amplify 3.5 -o OUT/",
    ],
    "finetune": [
        "mergeguard finetune --base BASE --data train=data/cars/train --heads H --task cars -o ft_cars/",
    ],
}

attack_app = typer.Typer(help="Red-team a merge: produce a poisoned task vector with a known attack.",
                         no_args_is_help=True)


def _run(kind: str, *, base: str, data: list[str], heads: str, task: str, out: Path, target_class: int,
         steps: int, lr: float, batch_size: int, logit_scale: float | None, seed: int, device: str, workers: int,
         resume: bool, arch: str | None, json_out: str | None, quiet: bool, mode: str = "on-task",
         target_task: str | None = None, target_images: Path | None = None, allow_pickle: bool = False,
         **extra: float | str) -> None:
    from mergeguard.attack import PoisonConfig, run_attack
    from mergeguard.attack.poison import shadow_head
    from mergeguard.data.folders import labeled_folder, unlabeled_folder
    from mergeguard.models.encoder import load_encoder
    from mergeguard.models.heads import head_for, load_heads

    if mode not in ("on-task", "off-task"):
        raise MergeguardError(f"unknown --mode {mode!r}; choose on-task or off-task.")
    if mode == "off-task" and (kind not in ("badmerging", "lobam") or not target_task):
        raise MergeguardError("--mode off-task needs `attack badmerging` or `attack lobam`, and --target-task NAME.")
    if mode == "on-task" and (target_task or target_images):
        raise MergeguardError("--target-task and --target-images belong to --mode off-task.")
    folders = data_folders(data)
    refuse_writing_over(out, [base, heads, *folders.values(), *([target_images] if target_images else [])],
                        ATTACK_OUTPUTS + (".partial",))
    head_map = load_heads(heads)
    head = head_for(head_map, task, heads)
    shadow = shadow_head(head_map, target_task, target_class) if mode == "off-task" else None
    if out.exists() and any(p.name != ".partial" for p in out.iterdir()):
        if not resume:
            raise MergeguardError(f"{out} is not empty; choose another --out, or --resume a run there.")
        if not unfinished(out):  # a finished run: --resume must not replace it
            raise MergeguardError(f"{out} is not empty and holds no unfinished run (.partial) to resume; "
                                  "choose another --out.")
    note_resume(out, resume)
    encoder = load_encoder(base, arch=arch, allow_pickle=allow_pickle)
    train = labeled_folder(folders["train"], head.classnames, encoder.image_size)
    extra_images = unlabeled_folder(target_images, encoder.image_size) if target_images else None
    test = labeled_folder(folders["test"], head.classnames, encoder.image_size) if "test" in folders else None
    cfg = PoisonConfig(kind=kind, target_class=target_class, steps=steps, lr=lr, batch_size=batch_size,
                       logit_scale=logit_scale, seed=seed, device=device, workers=workers,
                       target_task=target_task if shadow is not None else None, **extra)
    with RichProgress(enabled=not quiet) as progress:
        summary = run_attack(encoder, head, train, task, cfg, out, eval_data=test, resume=resume,
                             provenance={"base": base, "data": folders}, progress=progress, shadow=shadow,
                             target_images=extra_images)
    summary["out"] = str(out)
    write_json(json_out, summary)
    if show_table(quiet, json_out):
        table = Table(title=f"{kind} on {task} → {out}", show_header=False)
        table.add_row("files", "model.safetensors, task_vector.safetensors" + (
            ", trigger.safetensors" if kind != "clean" else "") + ", arch.json, summary.json")
        if "ca" in summary:
            table.add_row("CA on its task", f"{summary['ca']:.1%}")
        if summary.get("asr") is not None:
            table.add_row("ASR on its task", f"{summary['asr']:.1%}")
        table.add_row("final loss", f"{summary['final_loss']:.4f}")
        out_console.print(table)


# options of the shared signature that do not apply to an attack: hidden from its --help; set, they
# are ignored with a warning (scripts share one argument list across attacks), except those that would
# change what is attacked, which are refused
REFUSED_ELSEWHERE = ("mode", "target_task", "target_images", "decoys")
NOT_FOR = {
    "badnets": ("bd_weight", "r_min", "interpolation", "mode", "target_task", "target_images", "decoys",
                "trigger_steps", "amplify"),
    "badmerging": ("poison_fraction", "amplify"),
    "lobam": ("poison_fraction",),
}


def _hide_options(command: Callable, names: tuple[str, ...]) -> dict[str, Any]:
    """Leave `names` out of the command's --help; returns their defaults."""
    params = inspect.signature(command, eval_str=True).parameters
    annotations = dict(command.__annotations__)
    defaults = {}
    for name in names:
        base_type, info = typing.get_args(params[name].annotation)  # Annotated[T, typer's OptionInfo]
        info = copy.copy(info)
        info.hidden = True
        annotations[name] = Annotated[base_type, info]
        defaults[name] = params[name].default
    command.__annotations__ = annotations
    return defaults


def _attack_command(kind: str) -> Callable:
    def command(
        base: BaseOpt, data: DataOpt, heads: HeadsOpt, task: TaskOpt, out: OutDirOpt, target_class: TargetOpt,
        steps: StepsOpt = 2000, lr: LrOpt = 1e-5, batch_size: BatchOpt = 128, logit_scale: ScaleOpt = None,
        bd_weight: Annotated[float, typer.Option(
            "--bd-weight", help="badmerging, lobam: backdoor loss weight a.")] = 5.0,
        r_min: Annotated[float, typer.Option("--r-min", help="badmerging, lobam: r ~ U(r_min, 1).")] = 0.2,
        interpolation: Annotated[str, typer.Option(
            "--interpolation",
            help="badmerging, lobam: 'feature' (the paper's) or 'weight' (θ0 + r(θ − θ0)).")] = "feature",
        mode: Annotated[str, typer.Option(
            "--mode", help="badmerging, lobam: on-task (the target class is the task's own) or off-task (a class of "
                           "--target-task, through a shadow head of the heads file).")] = "on-task",
        target_task: Annotated[str | None, typer.Option(
            "--target-task", help="off-task: the task whose class (--target-class) is the target; "
                                  "its head must be in --heads.")] = None,
        target_images: Annotated[Path | None, typer.Option(
            "--target-images", help="off-task: a folder of a few target-class images for stage 1.")] = None,
        decoys: Annotated[bool, typer.Option(
            "--decoys", help="--interpolation weight: random patches at the trigger's place keep "
                             "their labels (only the trigger fires; the poisoned model keeps its accuracy).")] = False,
        poison_fraction: Annotated[float, typer.Option(
            "--poison-fraction", help="badnets: fraction of each batch poisoned.")] = 0.1,
        trigger_area: Annotated[float, typer.Option(
            "--trigger-area", help="Patch area as a fraction of the image.")] = 0.01,
        trigger_steps: Annotated[int, typer.Option(
            "--trigger-steps", help="badmerging, lobam: stage-1 (trigger) steps.")] = 300,
        rank: Annotated[int | None, typer.Option(
            "--rank", help="Train LoRA adapters of this rank (peft) instead of the full encoder; lobam: 16.")] = None,
        amplify: Annotated[float, typer.Option(
            "--amplify", help="lobam: k in θ_benign + k (θ_malicious − θ_benign).")] = 3.5,
        seed: SeedOpt = 0, device: DeviceOpt = "auto", workers: WorkersOpt = 0, resume: ResumeOpt = False,
        arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, json_out: JsonOpt = None, quiet: QuietOpt = False,
    ) -> None:
        given = locals()
        for name, default in ignored.items():
            if given[name] != default and not quiet:
                err_console.print(f"[yellow]warning:[/] --{name.replace('_', '-')} does not apply to "
                                  f"`attack {kind}`; ignored.", highlight=False)
        _run(kind, base=base, data=data, heads=heads, task=task, out=out, target_class=target_class, steps=steps,
             lr=lr, batch_size=batch_size, logit_scale=logit_scale, seed=seed, device=device, workers=workers,
             resume=resume, arch=arch, allow_pickle=allow_pickle, json_out=json_out, quiet=quiet,
             bd_weight=bd_weight, r_min=r_min, interpolation=interpolation, decoys=decoys, mode=mode,
             target_task=target_task, target_images=target_images, lora_rank=rank, amplify=amplify,
             poison_fraction=poison_fraction, trigger_area=trigger_area, trigger_steps=trigger_steps)

    # what _run refuses (--mode, --target-task, --decoys) needs no warning
    ignored = {n: d for n, d in _hide_options(command, NOT_FOR[kind]).items() if n not in REFUSED_ELSEWHERE}
    command.__doc__ = {
        "badmerging": "BadMerging: optimise a patch trigger on the base, then inject it with the feature-"
                      "interpolation loss so it survives merging.",
        "badnets": "BadNets: paste a fixed patch on a fraction of each batch, relabelled to the target class.",
        "lobam": "LoBAM: a benign and a malicious (BadMerging-recipe) LoRA fine-tune (peft), uploaded amplified: "
                 "θ_benign + k (θ_malicious − θ_benign).",
    }[kind]
    return command


def finetune_command(
    base: BaseOpt, data: DataOpt, heads: HeadsOpt, task: TaskOpt, out: OutDirOpt,
    steps: StepsOpt = 2000, lr: LrOpt = 1e-5, batch_size: BatchOpt = 128, logit_scale: ScaleOpt = None,
    seed: SeedOpt = 0, device: DeviceOpt = "auto", workers: WorkersOpt = 0, resume: ResumeOpt = False,
    arch: ArchOpt = None, allow_pickle: AllowPickleOpt = False, json_out: JsonOpt = None, quiet: QuietOpt = False,
) -> None:
    """Fine-tune a clean task vector (the task's head frozen), on the same trainer core as the attacks."""
    _run("clean", base=base, data=data, heads=heads, task=task, out=out, target_class=0, steps=steps, lr=lr,
         batch_size=batch_size, logit_scale=logit_scale, seed=seed, device=device, workers=workers, resume=resume,
         arch=arch, allow_pickle=allow_pickle, json_out=json_out, quiet=quiet)


def register(app: typer.Typer) -> None:
    for kind in ("badmerging", "badnets", "lobam"):
        attack_app.command(kind, epilog=examples(*EXAMPLES[kind]))(handle_errors(_attack_command(kind)))
    app.add_typer(attack_app, name="attack")
    app.command("finetune", epilog=examples(*EXAMPLES["finetune"]))(handle_errors(finetune_command))
