"""`mergeguard defend lfpm|ibvs`: remove backdoors from a merged model.

    mergeguard defend lfpm --merged merged/ --base base/ --shadow shadow_images/ -o defended/
    mergeguard defend ibvs --merged merged/ --base base/ --data train=DIR --heads H --task T -o defended/

Every LFPM setting is a field of `LFPMConfig` (mergeguard/defend/lfpm.py), IBVS's fine-tunes take the
attacks' `TrainSettings`: their options are made from those declarations (`cli/_settings.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mergeguard.attack import TrainSettings
from mergeguard.checkpoint.paths import refuse_writing_over
from mergeguard.cli._cli_utils import (
    AllowPickleOpt,
    ArchOpt,
    BaseOpt,
    Group,
    HeadsOpt,
    Input,
    JsonOpt,
    MergedOpt,
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
from mergeguard.cli._errors import EXIT_THRESHOLD, add_command
from mergeguard.cli._output import RichProgress, out_console, show_table, write_json
from mergeguard.cli._settings import build, with_settings
from mergeguard.defend.lfpm.settings import LFPMConfig

EXAMPLES = [
    "mergeguard defend lfpm --merged merged/ --base base/ --shadow imagenet_10k/ -o defended/",
    "mergeguard defend lfpm --merged M --base B --shadow DIR -o OUT --heads heads.safetensors   # and verify it",
    "mergeguard defend lfpm --merged M --base B --shadow DIR -o OUT --resume    # after a killed run",
    "mergeguard defend lfpm --merged M --base B --shadow DIR -o OUT --heads H --fail-on suspicious || exit 1",
]
IBVS_EXAMPLES = [
    "mergeguard defend ibvs --merged M --base B --data train=data/cars/train --heads H --task cars -o OUT/",
]
IBVS_SETTINGS = ("steps", "lr", "weight_decay", "warmup", "batch_size", "logit_scale", "poison_fraction",
                 "trigger_area", "target_class", "seed")  # what its two fine-tunes use (the model card's list)

ShadowOpt = Annotated[Path, typer.Option(
    "--shadow", help="A folder of unlabeled images (any task, any depth); thousands of them."), Input()]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue a killed run from OUT/.partial (same settings, same result).")]

defend_app = typer.Typer(cls=Group, help="Remove backdoors from a merged model.", no_args_is_help=True)


@with_settings(LFPMConfig)
def lfpm_command(
    merged: MergedOpt,
    base: BaseOpt,
    shadow: ShadowOpt,
    out: OutDirOpt,
    resume: ResumeOpt = False,
    heads: Annotated[str | None, typer.Option(
        "--heads", help="Heads for the merged tasks: scan the merged model first (`mergeguard scan`), start "
                        "LFPM's prompts at the triggers the scan recovers, and scan the defended model after "
                        "(score before → after)."), Input()] = None,
    fail_on: Annotated[str | None, typer.Option(
        "--fail-on", help="With --heads: exit 1 when the defended model still scans this or worse (suspicious or "
                          "backdoored); its outputs are written all the same, to look at.")] = None,
    overwrite: OverwriteOpt = False,
    arch: ArchOpt = None,
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    **settings: Any,
) -> None:
    """LFPM: optimise an anti-backdoor task vector in feature space on unlabeled images (no labels, no trigger).
    A user sets the models, the shadow folder and OUT, and --heads: the merged model is scanned first (nothing
    suspicious: LFPM stops and returns the merge unchanged, unless --force), the prompts start at the recovered
    triggers, and the defended model is scanned after (--restore also gives the most suspicious trigger's feature
    direction back to θ0; docs/lfpm.md says when). --device and --batch-size fit the hardware. The step size
    comes from the merge's own task vector; every other setting is for experiments (docs/lfpm.md says when to
    change one)."""
    cfg = build(LFPMConfig, settings)
    if fail_on is not None:
        from mergeguard.errors import MergeguardError
        from mergeguard.scan import check_fail_on

        check_fail_on(fail_on)
        if heads is None:
            raise MergeguardError("--fail-on judges the scan of the defended model: give --heads.")

    from mergeguard import defend
    from mergeguard.checkpoint.provenance import command_line
    from mergeguard.checkpoint.writer import staged_outputs
    from mergeguard.data.folders import unlabeled_folder
    from mergeguard.data.pictures import first_images
    from mergeguard.defend.outputs import LFPM_OUTPUTS, lfpm_results
    from mergeguard.models.heads import load_heads
    from mergeguard.trainer import distributed_rank

    refuse_writing_over(out, [merged, base, shadow, *([heads] if heads else [])], LFPM_OUTPUTS + (".partial",))
    if not (resume and unfinished(out)):
        require_empty(out, overwrite, resumable=True, resume=resume)
    note_resume(out, resume)
    (merged_enc, base_enc), inputs, dtype = defend.load_models(allow_pickle, arch, merged=merged, base=base)
    heads_d = load_heads(heads) if heads else None  # read before the run: a bad heads file costs nothing
    images = unlabeled_folder(shadow, merged_enc.image_size)
    with RichProgress(enabled=not quiet) as progress:
        ck = out / ".partial" / "lfpm.pt"
        if heads_d is not None:  # the scan guides LFPM's prompts and checks its output
            defended, _, report = defend.defend_lfpm_scanned(merged_enc, base_enc, images, cfg, heads_d, progress,
                                                             checkpoint=ck, resume=resume)
        else:
            defended, _, report = defend.defend_lfpm(merged_enc, base_enc, images, cfg, progress, checkpoint=ck,
                                                     resume=resume)
    if distributed_rank()[0] != 0:
        return  # under torchrun every process holds the same result; the first one writes it
    provenance = {"defense": "lfpm", "command": command_line(), "shadow": str(shadow), "shadow_images": len(images),
                  "inputs": inputs, "params": report.config}
    with staged_outputs(out) as stage:
        defend.write_lfpm_outputs(stage, defended, merged_enc, report, provenance, dtype,
                                  examples=first_images(images))
    report = {**report.to_json(), "out": str(out)}
    write_json(json_out, report)
    if show_table(quiet, json_out):
        results = lfpm_results(report)
        table = Table(title=f"LFPM → {out}", show_header=False)
        table.add_row("steps", str(report["steps"]))
        table.add_row("loss per epoch", ", ".join(f"{v:.4f}" for v in report["loss_per_epoch"]))
        table.add_row("λ_eff start → end", results["λ_eff start → end"])
        table.add_row("‖τa‖", results["‖τa‖"])
        for key in [k for k in results if k.endswith("(chosen)")] + ["clean-feature drift", "stopped"]:
            if key in results:
                table.add_row(key, results[key])
        if "scan" in report:
            b, a = report["scan"]["before"], report["scan"]["after"]
            table.add_row("scan before → after", f"{b['score']:.2f} {b['verdict']} → {a['score']:.2f} {a['verdict']}")
        table.add_row("time", f"{report['seconds']:.1f} s ({report['images_per_second']:.0f} images/s)")
        out_console.print(table)
    _judge(report, fail_on)


def _judge(report: dict[str, Any], fail_on: str | None) -> None:
    """`--fail-on`: exit 1 when the defended model's scan reaches it (its verdict and score in one line)."""
    from mergeguard.scan import reaches

    if fail_on is None:
        return
    after = report["scan"]["after"]
    if reaches(after["verdict"], fail_on):
        from mergeguard.cli._output import err_console

        err_console.print(f"[bold red]the defended model still scans {after['verdict']}[/] (score "
                          f"{after['score']:.2f}, --fail-on {fail_on}); its outputs are in {report['out']}.",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_THRESHOLD)


@with_settings(TrainSettings)
def ibvs_command(
    merged: MergedOpt,
    base: BaseOpt,
    data: Annotated[str, typer.Option("--data", help="train=DIR: labeled images of a task the defender has."),
                    Spec()],
    heads: HeadsOpt,
    task: TaskOpt,
    out: OutDirOpt,
    lam: Annotated[float, typer.Option("--lam", help="λ in Δθm − λ (Vb − Vc).")] = 2.0,
    overwrite: OverwriteOpt = False,
    arch: ArchOpt = None,
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    **settings: Any,
) -> None:
    """IBVS: subtract λ × (the defender's own backdoored minus clean task vector) from the merge."""
    train = build(TrainSettings, settings)
    folder = data_folders([data], allowed=("train",))["train"]

    from mergeguard import defend
    from mergeguard.checkpoint.provenance import command_line
    from mergeguard.checkpoint.writer import staged_outputs
    from mergeguard.data.folders import labeled_folder
    from mergeguard.defend.outputs import IBVS_OUTPUTS
    from mergeguard.models.heads import head_for, load_heads

    refuse_writing_over(out, [merged, base, heads, folder], IBVS_OUTPUTS + (".partial",))
    require_empty(out, overwrite)
    head = head_for(load_heads(heads), task, heads)
    (merged_enc, base_enc), inputs, dtype = defend.load_models(allow_pickle, arch, merged=merged, base=base)
    dataset = labeled_folder(folder, head.classnames, base_enc.image_size)
    with RichProgress(enabled=not quiet) as progress:
        defended, report = defend.defend_ibvs(merged_enc, base_enc, head, dataset, task, train, lam=lam,
                                              progress=progress)
    provenance = {"defense": "ibvs", "command": command_line(), "data": folder, "task": task, "inputs": inputs,
                  "params": {"lam": lam, **{k: v for k, v in report["config"].items() if k in IBVS_SETTINGS}}}
    with staged_outputs(out) as stage:
        defend.write_ibvs_outputs(stage, defended, merged_enc, report, provenance, dtype)
    report["out"] = str(out)
    write_json(json_out, report)
    if show_table(quiet, json_out):
        table = Table(title=f"IBVS → {out}", show_header=False)
        table.add_row("λ", f"{lam:g}")
        table.add_row("‖Vb − Vc‖", f"{report['vb_minus_vc_norm']:.4g}")
        out_console.print(table)


def register(app: typer.Typer) -> None:
    add_command(defend_app, "lfpm", lfpm_command, EXAMPLES)
    add_command(defend_app, "ibvs", ibvs_command, IBVS_EXAMPLES)
    app.add_typer(defend_app, name="defend")
