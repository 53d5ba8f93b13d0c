"""`mergeguard scan`: find a backdoor without its trigger or labels; a verdict per input and an exit code.

    mergeguard scan --base base/ tv_a.safetensors tv_b/ --shadow shadow/ --heads heads.safetensors -o report/
    mergeguard scan --base base/ --merged merged/ tv_a tv_b --shadow shadow/ --heads H

Every scan setting is a field of `ScanConfig` (mergeguard/scan.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mergeguard.cli._cli_utils import (
    AllowPickleOpt,
    ArchOpt,
    BaseOpt,
    Input,
    JsonOpt,
    Output,
    OverwriteOpt,
    QuietOpt,
    Source,
    require_empty,
)
from mergeguard.cli._errors import EXIT_THRESHOLD, add_command
from mergeguard.cli._output import RichProgress, out_console, show_table, write_json
from mergeguard.cli._settings import build, with_settings
from mergeguard.errors import MergeguardError
from mergeguard.scan import ScanConfig, check_fail_on, reaches

EXAMPLES = [
    "mergeguard scan --base base/ tv_cars.safetensors tv_dtd/ user/tv-eurosat --shadow shadow/ --heads H",
    "mergeguard scan --base base/ tv_a tv_b --shadow shadow/ --heads H -o scan/ --json scan.json --fail-on suspicious",
    "mergeguard scan --base base/ --merged merged/ tv_a tv_b --shadow shadow/ --heads H    # which input?",
    "mergeguard scan --base base/ --merged defended/ --shadow shadow/ --heads H || exit 1    # a CI gate",
]


@with_settings(ScanConfig)
def scan_command(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Fine-tuned checkpoints, task vectors, PEFT LoRA adapters or Hub ids (anything `merge` takes).",
        show_default=False), Source()] = None,
    base: BaseOpt = ...,  # type: ignore[assignment]
    shadow: Annotated[Path, typer.Option(
        "--shadow", help="A folder of unlabeled images (any task, any depth)."), Input()] = ...,  # type: ignore[assignment]
    heads: Annotated[str | None, typer.Option(
        "--heads", help="Heads for the tasks you merge: every class of every head is a target the scan tries "
                        "(without: a target-free scan of the features)."), Input()] = None,
    merged: Annotated[str | None, typer.Option(
        "--merged", help="Scan this merged (or defended) model; INPUTs, if given, are its inputs to attribute "
                         "its backdoor to."), Source()] = None,
    scale: Annotated[float, typer.Option(
        "--scale", help="Scan each input as θ0 + SCALE · τ (1: the whole vector; a merge's λ: as merged).")] = 1.0,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Report folder: per scanned model its recovered trigger (trigger.safetensors, which "
                            "`eval --trigger` reads) and trigger.png; report.json."), Output()] = None,
    fail_on: Annotated[str, typer.Option(
        "--fail-on", help="Exit 1 when a verdict reaches this: suspicious or backdoored.")] = "backdoored",
    overwrite: OverwriteOpt = False,
    arch: ArchOpt = None,
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    **settings: Any,
) -> None:
    """Scan task vectors or a merged model for a backdoor, with no trigger and no labels: a score, a verdict and
    the recovered trigger per model; exit 1 when a verdict reaches --fail-on."""
    cfg = build(ScanConfig, settings)
    check_fail_on(fail_on)
    inputs = list(inputs or [])
    if not inputs and merged is None:
        raise MergeguardError("give the inputs to scan (task vectors, fine-tuned checkpoints) or --merged MODEL.")
    if out is not None:
        require_empty(out, overwrite)

    result, images = _scan(inputs, base, shadow, heads, merged, scale, arch, allow_pickle, cfg, quiet)
    report = result.to_json()
    report["scale"] = scale
    scanned = [report["merged"]] if report["merged"] else report["inputs"]
    for r in scanned:
        r["trigger"] = r["picture"] = None
    if out is not None:
        _write_triggers(out, result, scanned, report, images)
    write_json(json_out, report)
    if show_table(quiet, json_out):
        _print_table(report, scanned, cfg, out)
    if reaches(result.verdict, fail_on):
        raise typer.Exit(EXIT_THRESHOLD)


def _scan(inputs: list[str], base: str, shadow: Path, heads: str | None, merged: str | None, scale: float,
          arch: str | None, allow_pickle: bool, cfg: ScanConfig, quiet: bool) -> tuple[Any, Any]:
    """The scan of the inputs (or of the merged model), and the shadow images it ran on."""
    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.data import stack_images
    from mergeguard.data.folders import unlabeled_folder
    from mergeguard.models.encoder import load_encoder
    from mergeguard.models.heads import load_heads
    from mergeguard.scan import Scanner, model_of, scan_models

    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle)
    base_enc = load_encoder(base_ckpt, arch=arch)
    heads_d = load_heads(heads) if heads else None
    images = stack_images(unlabeled_folder(shadow, base_enc.image_size))
    with RichProgress(enabled=not quiet) as progress, tempfile.TemporaryDirectory(prefix="mergeguard-scan-") as tmp:
        scanner = Scanner(base_enc, images, heads_d, cfg, progress)
        srcs = [open_checkpoint(i, allow_pickle=allow_pickle) for i in inputs]  # every input readable, first
        models = [(name, (lambda s=s: model_of(base_ckpt, s, scale, arch, Path(tmp)))) for name, s in zip(inputs, srcs)]
        merged_model = None if merged is None else (merged, load_encoder(merged, arch=arch, allow_pickle=allow_pickle))
        return scan_models(scanner, models, merged_model), images


def _write_triggers(out: Path, result: Any, scanned: list[dict[str, Any]], report: dict[str, Any],
                    images: Any) -> None:
    """The report folder: per scanned model (`scanned`: their entries in `report`, as `result.scanned`) its
    recovered trigger and a picture of it, and report.json; the entries gain the paths."""
    from mergeguard.checkpoint.writer import staged_outputs
    from mergeguard.data.pictures import trigger_picture

    with staged_outputs(out) as stage:
        for k, (r, found) in enumerate(zip(scanned, result.scanned)):
            folder = stage / f"{k}-{Path(r['input'].rstrip('/')).name.replace('.safetensors', '')}"
            folder.mkdir()
            trig = found.trigger
            trig.save(folder / "trigger.safetensors")
            trigger_picture(folder / "trigger.png", trig.mask, trig.pattern, images[:4])
            r["trigger"] = str(out / folder.name / "trigger.safetensors")
            r["picture"] = str(out / folder.name / "trigger.png")
        write_json(str(stage / "report.json"), report)


def _print_table(report: dict[str, Any], scanned: list[dict[str, Any]], cfg: ScanConfig, out: Path | None) -> None:
    table = Table(title="scan" + (f" → {out}" if out else ""))
    against = any(r.get("outlier") for r in scanned)  # each input against the others (reported, no verdict yet)
    for col in ("model", "score", "verdict", "suspected target", "share (θ0)", "mask area (θ0)", "where",
                *(["z vs other inputs"] if against else [])):
        table.add_column(col)
    for r in scanned:
        t, w, z = r["target"], r["where"], r.get("outlier")
        colour = {"clean": "green", "suspicious": "yellow", "backdoored": "red"}[r["verdict"]]
        table.add_row(r["input"], f"{r['score']:.2f}", f"[{colour}]{r['verdict']}[/]",
                      f"{t['task']}:{t['class']} {t['name']}" if t else "—",
                      f"{t['share']:.0%} ({t['share_base']:.0%})" if t else "—",
                      f"{r['area']:.2%} ({r['area_base']:.2%})",
                      f"rows {w['top']:.2f}–{w['bottom']:.2f}, cols {w['left']:.2f}–{w['right']:.2f}",
                      *([f"{z['z']:.1f} ({z['target']})" if z else "—"] if against else []))
    out_console.print(table)
    if report["attribution"] and len(report["attribution"]) > 1 or report["merged"] and report["attribution"]:
        key = "share" if report["merged"] else "score"
        ranked = ", ".join(f"{a['input']} ({a[key]:.2f})" for a in report["attribution"])
        how = "reaction to the merged model's trigger" if report["merged"] else "score"
        out_console.print(f"attribution ({how}, highest first): {ranked}")
    out_console.print(f"verdict: {report['verdict']} (suspicious from {cfg.suspicious:g}, backdoored from "
                      f"{cfg.backdoored:g})")


def register(app: typer.Typer) -> None:
    add_command(app, "scan", scan_command, EXAMPLES)
