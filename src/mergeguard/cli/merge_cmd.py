"""`mergeguard merge`: merge fine-tuned checkpoints or task vectors onto a base, streaming.

    mergeguard merge BASE FT1 FT2 FT3 -o merged/ --method ties --lam 0.3 --density 0.2
    mergeguard merge --config merge.yaml -o merged/

The method flags (--lam, --density, ...) are built from the merge-method registry (`cli._settings.
declared_options`), so each flag's help, default and validation come from the method's one declaration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mergeguard.cli._cli_utils import (
    AllowMissingOpt,
    AllowPickleOpt,
    DtypeOpt,
    Input,
    JsonOpt,
    Output,
    OverwriteOpt,
    QuietOpt,
    Source,
    Spec,
    refuse_report_into_output,
    refuse_report_over,
)
from mergeguard.cli._errors import add_command
from mergeguard.cli._output import (
    RichProgress,
    err_console,
    out_console,
    show_table,
    write_json,
)
from mergeguard.cli._settings import declared_options, with_settings
from mergeguard.errors import MergeguardError
from mergeguard.merge import METHODS
from mergeguard.merge.config import load_config, signed_inputs
from mergeguard.merge.registry import all_params, get_method

EXAMPLES = [
    "mergeguard merge base/ ft_cars/ ft_dtd/ ft_eurosat/ -o merged/ --method task_arithmetic --lam 0.3",
    "mergeguard merge base.safetensors tv1.safetensors tv2.safetensors -o merged/ --method ties --density 0.2",
    "mergeguard merge openai/clip-vit-base-patch32 user/clip-cars@v1 user/clip-dtd -o merged/ --method dare_ties",
    "mergeguard merge base/ ft1/ ft2/ -o merged/ --method ties --weight 1 --weight 0.5 --normalize sum",
    "mergeguard merge base/ ft1/ ft2/ -o merged/ --method lata --reference instruct/ --mode mask",
    "mergeguard merge base/ --subtract toxic/ -o forgot/ --lam 0.5              # forgetting: θ0 − 0.5 τ",
    "mergeguard merge base/ --add C/ --add B/ --subtract A/ -o analogy/        # θ0 + λ (τC + τB − τA)",
    "mergeguard merge --config merge.yaml -o merged/",
    "mergeguard merge base/ ft_cars/ ft_dtd/ -o merged/ --method regmean --inputs-per-task cars=imgs/cars "
    "--inputs-per-task dtd=imgs/dtd",
    "mergeguard merge base/ ft_cars/ ft_dtd/ -o merged/ --method adamerging --heads heads.safetensors "
    "--shadow-per-task cars=imgs/cars --shadow-per-task dtd=imgs/dtd --steps 500",
]


def _method_help() -> str:
    return "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())


@with_settings(extra=lambda: declared_options({m.name: m.params for m in METHODS.values()}))
def merge_command(
    base: Annotated[str | None, typer.Argument(help="Base (pre-trained) checkpoint: file, folder or Hub id.",
                                               show_default=False), Source()] = None,
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Fine-tuned checkpoints or task-vector files to merge.", show_default=False), Source()] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (or .safetensors file)."),
                   Output()] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Merge method (default task_arithmetic).",
                                               show_default=False)] = None,
    weight: Annotated[list[float] | None, typer.Option(
        "--weight", "-w", metavar="W",
        help="Per-input weight, repeated once per input in order (default 1 each).")] = None,
    add: Annotated[list[str] | None, typer.Option(
        "--add", metavar="TV",
        help="A task vector added with weight +1 (learning; an analogy's plus side). Repeatable."),
        Source()] = None,
    subtract: Annotated[list[str] | None, typer.Option(
        "--subtract", metavar="TV",
        help="A task vector subtracted, weight -1 (forgetting: θ0 − λτ; an analogy's minus side). Repeatable."),
        Source()] = None,
    reference: Annotated[str | None, typer.Option(
        "--reference", help="lata: reference vector (e.g. instruct model or its task vector)."), Source()] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML file with the same names as these flags, plus base and inputs."), Input()] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for random methods (DARE, AdaMerging's "
                                                            "batches); default 0.")] = None,
    heads: Annotated[str | None, typer.Option(
        "--heads", help="adamerging: the tasks' heads (each task's predictions are made through its own)."),
        Input()] = None,
    shadow_per_task: Annotated[list[str] | None, typer.Option(
        "--shadow-per-task", metavar="NAME=DIR",
        help="adamerging: NAME=DIR, unlabeled images of task NAME (a head in --heads); repeat per task."),
        Spec()] = None,
    inputs_per_task: Annotated[list[str] | None, typer.Option(
        "--inputs-per-task", metavar="NAME=DIR",
        help="regmean: NAME=DIR, unlabeled images of an input's task; one per input, in the inputs' order."),
        Spec()] = None,
    shard_size: Annotated[str | None, typer.Option(
        "--shard-size", help="Shard the output past this many bytes, e.g. 5GB (default: 5GB).")] = None,
    dtype: DtypeOpt = "auto",
    allow_missing: AllowMissingOpt = False,
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
    **method_params: Any,
) -> None:
    """Merge task vectors onto a base model with a registered method, tensor by tensor."""
    cli = {"base": base, "inputs": inputs or None, "out": out, "method": method, "weight": weight or None,
           "add": add or None, "subtract": subtract or None,
           "reference": reference, "seed": seed, "shard_size": shard_size,
           "dtype": dtype if dtype != "auto" else None, **method_params}
    settings = _settings(config, cli)
    allow_missing = allow_missing or bool(settings.get("allow_missing"))
    allow_pickle = allow_pickle or bool(settings.get("allow_pickle"))
    overwrite = overwrite or bool(settings.get("overwrite"))
    chosen = get_method(settings.get("method", "task_arithmetic"))
    params = {p: settings[p] for p in all_params() if p in settings}
    chosen.resolve(params)  # fail on a bad parameter before opening anything
    folders = _data_folders(chosen.name, chosen.data, heads, shadow_per_task or [], inputs_per_task or [],
                            len(settings["inputs"]))
    if chosen.data:
        from mergeguard.cli._datamerge import data_merge

        data_merge(chosen, chosen.resolve(params), settings, heads, folders, allow_pickle=allow_pickle,
                   overwrite=overwrite, json_out=json_out, quiet=quiet)
        return

    from mergeguard.checkpoint import open_checkpoint, parse_size
    from mergeguard.merge import merge_checkpoints

    base_ckpt = open_checkpoint(settings["base"], allow_pickle=allow_pickle)
    input_ckpts = [open_checkpoint(s, allow_pickle=allow_pickle) for s in settings["inputs"]]
    ref_ckpt = open_checkpoint(settings["reference"], allow_pickle=allow_pickle) if settings.get("reference") else None
    refuse_report_over(json_out, [base_ckpt, *input_ckpts, *([ref_ckpt] if ref_ckpt else [])])  # --config's too
    refuse_report_into_output(json_out, settings["out"])  # an `out:` from --config too
    shard = parse_size(settings.get("shard_size", "5GB"))

    with RichProgress(enabled=not quiet) as progress:
        result = merge_checkpoints(
            base_ckpt, input_ckpts, chosen, params,
            out=Path(settings["out"]), weights=settings.get("weight"), seed=int(settings.get("seed", 0)),
            dtype=settings.get("dtype", "auto"), shard_size=shard, allow_missing=allow_missing,
            reference=ref_ckpt, overwrite=overwrite, progress=progress,
        )

    payload = {
        "out": str(result.out), "method": result.method, "params": result.params,
        "inputs": [c.spec for c in input_ckpts], "weights": settings.get("weight") or [1.0] * len(input_ckpts),
        "tensors": result.tensors, "merged": result.merged, "copied_from_base": result.copied,
        "skipped": result.skipped, "extra_tensors_ignored": result.extra, "seconds": round(result.seconds, 3),
        **result.report,
    }
    write_json(json_out, payload)
    for spec, n in result.extra.items():
        err_console.print(f"[yellow]note:[/] {spec} has {n} tensors the base lacks; they were ignored.")
    if show_table(quiet, json_out):
        _print_table(result, len(input_ckpts))


def _data_folders(method: str, data: str | None, heads: str | None, shadow: list[str], per_input: list[str],
                  n_inputs: int) -> dict[str, str]:
    """A data method's NAME=DIR folders, checked before anything loads: one sentence for what is missing or given
    to a method that does not take it."""
    given = {"shadow_per_task": shadow, "inputs_per_task": per_input}
    for option, values in given.items():
        if values and data != option:
            raise MergeguardError(f"--{option.replace('_', '-')} is for "
                                  f"{'adamerging' if option == 'shadow_per_task' else 'regmean'}, not {method}.")
    if heads is not None and data != "shadow_per_task":
        raise MergeguardError(f"--heads is for adamerging, not {method}.")
    if data is None:
        return {}
    flag = f"--{data.replace('_', '-')}"
    folders: dict[str, str] = {}
    for item in given[data]:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise MergeguardError(f"{flag} takes NAME=DIR, got {item!r}.")
        if name in folders:
            raise MergeguardError(f"{flag} names the task {name} twice; name each task once.")
        folders[name] = folder
    if data == "inputs_per_task" and len(folders) != n_inputs:
        raise MergeguardError(f"regmean needs one {flag} per input, in the inputs' order ({n_inputs} inputs, "
                              f"{len(folders)} given).")
    if data == "shadow_per_task" and (not folders or heads is None):
        raise MergeguardError(f"adamerging needs --heads and one {flag} NAME=DIR per task.")
    return folders


def _settings(config: Path | None, cli: dict[str, Any]) -> dict[str, Any]:
    """The merge's settings: --config's YAML, overridden by the flags given; one sentence for what is missing."""
    settings: dict[str, Any] = load_config(config) if config else {}
    if cli["inputs"] and not cli["weight"]:
        settings.pop("weight", None)  # weights in the YAML belong to the YAML's inputs
    if cli["inputs"] and not (cli["add"] or cli["subtract"]):
        for key in ("add", "subtract"):  # the YAML's operations go with the YAML's inputs, which these replace
            settings.pop(key, None)
    settings.update({k: v for k, v in cli.items() if v is not None})
    if not settings.get("base"):
        raise MergeguardError("give a BASE checkpoint (argument or 'base' in --config).")
    settings["inputs"], settings["weight"] = signed_inputs(settings.get("inputs"), settings.get("weight"),
                                                           settings.pop("add", None), settings.pop("subtract", None))
    if not settings.get("inputs"):
        raise MergeguardError("give at least one INPUT to merge (arguments, --add, --subtract, or 'inputs' in "
                              "--config).")
    if not settings.get("out"):
        raise MergeguardError("give an output path with -o/--out.")
    return settings


def _print_table(result: Any, inputs: int) -> None:
    table = Table(title=f"merged with {result.method}", show_header=False)
    table.add_row("output", str(result.out))
    table.add_row("parameters", ", ".join(f"{k}={v}" for k, v in result.params.items()) or "-")
    table.add_row("inputs", str(inputs))
    table.add_row("tensors", f"{result.tensors} ({result.merged} merged, {result.copied} copied from base)")
    if result.skipped:
        table.add_row("skipped", ", ".join(f"{k}: {v}" for k, v in result.skipped.items()))
    table.add_row("time", f"{result.seconds:.1f} s")
    out_console.print(table)


def register(app: typer.Typer) -> None:
    add_command(app, "merge", merge_command, EXAMPLES,
                help=f"Merge task vectors onto a base model, tensor by tensor. Methods: {_method_help()}.",
                short_help="Merge task vectors onto a base model (task arithmetic, TIES, DARE, LATA, ...).")
