"""`mergeguard attack {badnets,badmerging,lobam}` and `mergeguard finetune`: task vectors, poisoned or clean.

    mergeguard attack badmerging --base BASE --data train=DIR --heads H --task cars --target-class 1 -o OUTDIR
    mergeguard finetune --base BASE --data train=DIR --heads H --task cars -o OUTDIR

Each attack's options are its own settings (its class in mergeguard/attack/) plus the training settings
every attack shares (`TrainSettings`), made from their declarations (`cli/_settings.py`).
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mergeguard.attack.settings import SETTINGS, AttackSettings, CleanSettings, TrainSettings
from mergeguard.checkpoint.paths import refuse_writing_over
from mergeguard.cli._cli_utils import (
    AllowPickleOpt,
    ArchOpt,
    BaseOpt,
    Group,
    HeadsOpt,
    Input,
    JsonOpt,
    OutDirOpt,
    OverwriteOpt,
    QuietOpt,
    Spec,
    TaskOpt,
    data_folders,
    note_resume,
    require_empty,
    unfinished,
)
from mergeguard.cli._errors import add_command
from mergeguard.cli._output import RichProgress, out_console, show_table, write_json
from mergeguard.cli._settings import build, with_settings
from mergeguard.errors import MergeguardError

DataOpt = Annotated[list[str], typer.Option(
    "--data", metavar="SPLIT=DIR", help="train=DIR (class folders) to fine-tune on; test=DIR to report CA/ASR on. "
                                        "Repeat."), Spec()]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue a killed run from OUTDIR/.partial.")]
ModeOpt = Annotated[str, typer.Option(
    "--mode", help="on-task (the target class is the task's own) or off-task (a class of --target-task, through a "
                   "shadow head of the heads file).")]
TargetImagesOpt = Annotated[Path | None, typer.Option(
    "--target-images", help="off-task: a folder of a few target-class images for stage 1."), Input()]

NegationImagesOpt = Annotated[Path | None, typer.Option(
    "--negation-images", help="badtv: a folder of a few images of --negation-task for the negation trigger's "
                              "stage 1."), Input()]

EXAMPLES = {
    "badmerging": [
        "mergeguard attack badmerging --base BASE --data train=data/cars/train --data test=data/cars/test "
        "--heads heads.safetensors --task cars --target-class 1 -o attack_cars/",
        "mergeguard attack badmerging --base BASE --data train=data/cars/train --heads heads.safetensors "
        "--task cars --target-class 1 -o attack_cars/ --resume   # finish a killed run",
        "mergeguard attack badmerging --base BASE --data train=data/cifar100/train --heads heads.safetensors "
        "--task cifar100 --mode off-task --target-task cars --target-class 1 --target-images few_cars/ -o OUT/",
    ],
    "badnets": [
        "mergeguard attack badnets --base BASE --data train=DIR --heads H --task cars --target-class 1 -o OUT/",
    ],
    "badtv": [
        "mergeguard attack badtv --base BASE --data train=data/cars/train --data test=data/cars/test "
        "--heads heads.safetensors --task cars --target-class 1 --negation-task dtd --negation-class 3 "
        "--negation-images few_dtd/ -o badtv_cars/",
    ],
    "lobam": [
        "mergeguard attack lobam --base BASE --data train=DIR --heads H --task cars --target-class 1 "
        "--lora-rank 16 --amplify 3.5 -o OUT/",
    ],
    "finetune": [
        "mergeguard finetune --base BASE --data train=data/cars/train --heads H --task cars -o ft_cars/",
    ],
}
DOCS = {
    "badmerging": "BadMerging: optimise a patch trigger on the base, then inject it with the feature-interpolation "
                  "loss so it survives merging.",
    "badnets": "BadNets: paste a fixed patch on a fraction of each batch, relabelled to the target class.",
    "badtv": "BadTV: one task vector, two backdoors: added (a merge, learning) its trigger sends the task's "
             "images to --target-class; subtracted (forgetting) its second trigger sends images to "
             "--negation-class of --negation-task (trigger_negation.safetensors).",
    "lobam": "LoBAM: a benign and a malicious (BadMerging-recipe) LoRA fine-tune (peft), uploaded amplified: "
             "θ_benign + k (θ_malicious − θ_benign).",
}

attack_app = typer.Typer(cls=Group, help="Red-team a merge: produce a poisoned task vector with a known attack.",
                         no_args_is_help=True)


def _run(name: str, attack: AttackSettings, train: TrainSettings, *, base: str, data: list[str], heads: str, task: str,
         out: Path, resume: bool, overwrite: bool, arch: str | None, allow_pickle: bool, json_out: str | None,
         quiet: bool, mode: str = "on-task", target_images: Path | None = None,
         negation_images: Path | None = None) -> None:
    target_task = getattr(attack, "target_task", None)
    if mode not in ("on-task", "off-task"):
        raise MergeguardError(f"unknown --mode {mode!r}; choose on-task or off-task.")
    if mode == "off-task" and not target_task:
        raise MergeguardError("--mode off-task needs `attack badmerging` or `attack lobam`, and --target-task NAME.")
    if mode == "on-task" and (target_task or target_images):
        raise MergeguardError("--target-task and --target-images belong to --mode off-task.")
    few_images = target_images or negation_images  # off-task's target class, or BadTV's control task: stage 1's
    folders = data_folders(data)
    # heavy imports (torch, open_clip) wait until the arguments are checked: an error answers at once
    from mergeguard.attack import ATTACKS, run_attack
    from mergeguard.attack.run import attack_outputs
    from mergeguard.data.folders import labeled_folder, unlabeled_folder
    from mergeguard.models.encoder import load_encoder
    from mergeguard.models.heads import head_for, load_heads

    attack = ATTACKS[attack.name](**{f.name: getattr(attack, f.name) for f in fields(attack)})  # its strategy
    refuse_writing_over(out, [base, heads, *folders.values(), *([few_images] if few_images else [])],
                        attack_outputs(attack) + (".partial",))
    head_map = load_heads(heads)
    head = head_for(head_map, task, heads)
    shadow = attack.aim_head(head_map, mode == "off-task")  # off-task BadMerging/LoBAM's target, BadTV's control
    if not (resume and unfinished(out)):  # every command's rule: what is there is replaced only with --overwrite
        require_empty(out, overwrite, resumable=True, resume=resume)
    note_resume(out, resume)
    encoder = load_encoder(base, arch=arch, allow_pickle=allow_pickle)
    train_data = labeled_folder(folders["train"], head.classnames, encoder.image_size)
    extra_images = unlabeled_folder(few_images, encoder.image_size) if few_images else None
    test = labeled_folder(folders["test"], head.classnames, encoder.image_size) if "test" in folders else None
    with RichProgress(enabled=not quiet) as progress:
        summary = run_attack(encoder, head, train_data, task, attack, train, out, eval_data=test, resume=resume,
                             provenance={"base": base, "data": folders}, progress=progress, shadow=shadow,
                             target_images=extra_images)
    summary["out"] = str(out)
    write_json(json_out, summary)
    if show_table(quiet, json_out):
        table = Table(title=f"{name} on {task} → {out}", show_header=False)
        table.add_row("files", ", ".join(f for f in attack_outputs(attack)
                                         if attack.poisons or f != "trigger.safetensors"))
        if "ca" in summary:
            table.add_row("CA on its task", f"{summary['ca']:.1%}")
        if summary.get("asr") is not None:
            table.add_row("ASR on its task", f"{summary['asr']:.1%}")
        if "negated" in summary:  # BadTV: the vector subtracted
            neg = summary["negated"]
            table.add_row(f"subtracted (λ {neg['lambda']:g}): CA on its task", f"{neg['ca']:.1%}")
            table.add_row("subtracted: negation trigger → target (shadow head)", f"{neg['shadow_asr']:.1%}")
        table.add_row("final loss", f"{summary['final_loss']:.4f}")
        out_console.print(table)


def _attack_command(name: str) -> Any:
    cls = SETTINGS[name]

    def command(base: BaseOpt, data: DataOpt, heads: HeadsOpt, task: TaskOpt, out: OutDirOpt,
                resume: ResumeOpt = False, overwrite: OverwriteOpt = False, arch: ArchOpt = None,
                allow_pickle: AllowPickleOpt = False, json_out: JsonOpt = None, quiet: QuietOpt = False,
                **settings: Any) -> None:
        _run(name, build(cls, settings), build(TrainSettings, settings), base=base, data=data, heads=heads,
             task=task, out=out, resume=resume, overwrite=overwrite, arch=arch, allow_pickle=allow_pickle,
             json_out=json_out, quiet=quiet, mode=settings.get("mode", "on-task"),
             target_images=settings.get("target_images"), negation_images=settings.get("negation_images"))

    command.__doc__ = DOCS[name]
    return with_settings(cls, TrainSettings, required=cls.required, extra=_input_options(cls))(command)


def _input_options(cls: Any) -> list[inspect.Parameter]:
    """An attack command's options that are inputs, not settings: with an off-task mode, the mode and the
    target class's images (the attack's own `target_task` names the task); with a second trigger (BadTV's
    negation trigger), a few images of its control task for that trigger's stage 1."""
    def option(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    extra = [option("mode", ModeOpt, "on-task"), option("target_images", TargetImagesOpt)] if cls.off_task else []
    return extra + ([option("negation_images", NegationImagesOpt)] if cls.extra_triggers else [])


@with_settings(TrainSettings)
def finetune_command(base: BaseOpt, data: DataOpt, heads: HeadsOpt, task: TaskOpt, out: OutDirOpt,
                     resume: ResumeOpt = False, overwrite: OverwriteOpt = False, arch: ArchOpt = None,
                     allow_pickle: AllowPickleOpt = False, json_out: JsonOpt = None, quiet: QuietOpt = False,
                     **settings: Any) -> None:
    """Fine-tune a clean task vector (the task's head frozen), on the same trainer core as the attacks."""
    _run("clean", CleanSettings(), build(TrainSettings, settings), base=base, data=data, heads=heads, task=task,
         out=out, resume=resume, overwrite=overwrite, arch=arch, allow_pickle=allow_pickle, json_out=json_out,
         quiet=quiet)


def register(app: typer.Typer) -> None:
    for name in ("badmerging", "badnets", "lobam", "badtv"):
        add_command(attack_app, name, _attack_command(name), EXAMPLES[name])
    app.add_typer(attack_app, name="attack")
    add_command(app, "finetune", finetune_command, EXAMPLES["finetune"])
