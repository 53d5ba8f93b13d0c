"""`mergeguard eval`: clean accuracy and attack success rate, as a table, JSON and an exit code.

    mergeguard eval merged/ --heads heads.safetensors --task cars=data/cars/test --task dtd=data/dtd/test
    mergeguard eval merged/ --heads H --task ... --trigger trigger.safetensors --max-asr 0.05 --json report.json
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from mergeguard.cli._cli_utils import (
    AllowPickleOpt,
    DeviceOpt,
    Input,
    JsonOpt,
    QuietOpt,
    ReportOverwriteOpt,
    Source,
    Spec,
)
from mergeguard.cli._errors import EXIT_THRESHOLD, add_command
from mergeguard.cli._output import (
    RichProgress,
    err_console,
    out_console,
    show_table,
    write_json,
)
from mergeguard.errors import MergeguardError

EXAMPLES = [
    "mergeguard eval merged/ --heads heads.safetensors --task cars=data/cars/test --task dtd=data/dtd/test",
    "mergeguard eval merged/ --heads H --task cars=D1 --task dtd=D2 --trigger trigger.safetensors --target-task cars",
    "mergeguard eval merged/ --heads H --task cars=D1 --trigger T --max-asr 0.05 --min-ca 0.6 --json report.json",
    "mergeguard eval user/clip-cars --arch ViT-B-32 --heads H --task cars=data/cars/test   # an HF CLIP checkpoint",
]


def parse_task(spec: str) -> tuple[str, str]:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise MergeguardError(f"--task takes NAME=FOLDER, got {spec!r}.")
    return name, folder


def eval_command(
    model: Annotated[str, typer.Argument(help="Model checkpoint (file, folder, Hub id) or open_clip:NAME@TAG."),
                     Source()],
    task: Annotated[list[str], typer.Option("--task", "-t", metavar="NAME=DIR",
                                                 help="NAME=FOLDER of class folders; repeat per task."),
                    Spec()],
    heads: Annotated[str, typer.Option("--heads", help="Heads file (see `mergeguard heads`)."), Input()],
    arch: Annotated[str | None, typer.Option(
        "--arch", help="open_clip name or architecture JSON, when the checkpoint does not say."), Input()] = None,
    trigger: Annotated[str | None, typer.Option("--trigger", help="Trigger file: measure ASR(T) and ASR(N)."),
                                Input()] = None,
    target_task: Annotated[str | None, typer.Option(
        "--target-task", help="The task the trigger targets (default: the trigger file's).")] = None,
    forgotten: Annotated[str | None, typer.Option(
        "--forgotten", help="A task the model was made to forget (merge --subtract): report its CA next to the "
                            "other tasks' (the controls), and, with --base, against θ0's.")] = None,
    base: Annotated[str | None, typer.Option(
        "--base", help="With --forgotten: θ0, evaluated on the same tasks for comparison."), Source()] = None,
    max_asr: Annotated[float | None, typer.Option(
        "--max-asr", help="Exit 1 if ASR(T) or ASR(N) is above this fraction.")] = None,
    min_ca: Annotated[float | None, typer.Option(
        "--min-ca", help="Exit 1 if the average clean accuracy is below this fraction.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 128,
    workers: Annotated[int, typer.Option("--workers", help="Data-loading worker processes.")] = 0,
    device: DeviceOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = None,
    overwrite: ReportOverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure clean accuracy (CA) per task and, with a trigger, attack success rate (ASR)."""
    folders = _checked(task, trigger, target_task, forgotten, base, max_asr, min_ca, batch_size, workers)

    from mergeguard.data.folders import labeled_folder
    from mergeguard.data.triggers import load_trigger
    from mergeguard.eval import crossed_thresholds, evaluate, forgetting
    from mergeguard.models.encoder import load_encoder
    from mergeguard.models.heads import head_for, load_heads

    head_map = load_heads(heads)
    trig = load_trigger(trigger) if trigger else None
    encoder = load_encoder(model, arch=arch, allow_pickle=allow_pickle)
    data = {name: labeled_folder(folder, head_for(head_map, name, heads).classnames, encoder.image_size)
            for name, folder in folders.items()}
    with RichProgress(enabled=not quiet) as progress:
        result = evaluate(encoder, head_map, data, trigger=trig, target_task=target_task, batch_size=batch_size,
                          device=device, workers=workers, progress=progress)
        if forgotten is not None:
            reference = None
            if base is not None:
                reference = evaluate(load_encoder(base, arch=arch, allow_pickle=allow_pickle), head_map, data,
                                     batch_size=batch_size, device=device, workers=workers, progress=progress)
            result["forgetting"] = forgetting(result, forgotten, reference)
    result["model"] = model
    crossed = crossed_thresholds(result, max_asr, min_ca)
    result["thresholds"] = {"max_asr": max_asr, "min_ca": min_ca, "crossed": crossed}
    write_json(json_out, result)
    if show_table(quiet, json_out):
        _print_table(result, model, trig is not None)
    if crossed:
        err_console.print("[bold red]threshold crossed:[/] " + "; ".join(crossed))
        raise typer.Exit(EXIT_THRESHOLD)


def _checked(task: list[str], trigger: str | None, target_task: str | None, forgotten: str | None, base: str | None,
             max_asr: float | None, min_ca: float | None, batch_size: int, workers: int) -> dict[str, str]:
    """The flags checked together, before anything is loaded (the model may be a download); {task: folder}."""
    for flag, value in (("--max-asr", max_asr), ("--target-task", target_task)):
        if value is not None and trigger is None:
            raise MergeguardError(f"{flag} needs --trigger.")
    for flag, value in (("--max-asr", max_asr), ("--min-ca", min_ca)):
        if value is not None and not 0 <= value <= 1:  # NaN fails this too
            raise MergeguardError(f"{flag} is a fraction between 0 and 1 (got {value}); e.g. 0.05 for 5%.")
    if batch_size < 1 or workers < 0:
        raise MergeguardError("--batch-size must be at least 1 and --workers 0 or more.")
    folders: dict[str, str] = {}
    for spec in task:  # before anything is loaded (the model may be a download)
        name, folder = parse_task(spec)
        if name in folders:
            raise MergeguardError(f"--task {name} is given twice; name each task once.")
        folders[name] = folder
    if base is not None and forgotten is None:
        raise MergeguardError("--base goes with --forgotten TASK.")
    if forgotten is not None and forgotten not in folders:
        raise MergeguardError(f"--forgotten {forgotten} is not among the --task names ({', '.join(folders)}).")
    if forgotten is not None and len(folders) < 2:
        raise MergeguardError("--forgotten is judged against control tasks: give at least one other --task.")

    return folders


def _print_table(result: dict[str, Any], model: str, triggered: bool) -> None:
    table = Table(title=f"eval: {model}")
    table.add_column("task")
    table.add_column("CA", justify="right")
    if triggered:
        table.add_column("ASR", justify="right")
        table.add_column("no trigger", justify="right")  # the same count on clean images: ASR's floor
    for name, entry in result["tasks"].items():
        row = [name + (" (target)" if name == result.get("target_task") else ""), f"{entry['ca']:.1%}"]
        if triggered:
            row += ["-" if entry[k] is None else f"{entry[k]:.1%}" for k in ("asr", "asr_no_trigger")]
        table.add_row(*row)
    table.add_section()
    summary = ["average", f"{result['ca_avg']:.1%}"]
    if triggered:
        def pct(key: str) -> str:
            return "-" if result[key] is None else f"{result[key]:.1%}"

        summary += [f"T {pct('asr_t')} / N {pct('asr_n')}",
                    f"T {pct('asr_t_no_trigger')} / N {pct('asr_n_no_trigger')}"]
    table.add_row(*summary)
    out_console.print(table)
    if "forgetting" in result:
        f = result["forgetting"]
        line = (f"forgotten {f['task']}: CA {f['ca']:.1%}; controls ({', '.join(f['controls'])}): "
                f"{f['control_ca']:.1%}")
        if "base_ca" in f:
            kept = "-" if f["control_kept"] is None else f"{f['control_kept']:.0%}"
            line += (f"; θ0: {f['base_ca']:.1%} and {f['base_control_ca']:.1%} ({f['task']} lost "
                     f"{100 * f['forgotten']:.1f} points, the controls keep {kept} of θ0's)")
        out_console.print(line, highlight=False)


def register(app: typer.Typer) -> None:
    add_command(app, "eval", eval_command, EXAMPLES)
