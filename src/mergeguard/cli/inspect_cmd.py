"""`mergeguard inspect`: what a checkpoint holds, and how task vectors compare.

    mergeguard inspect tv1.safetensors tv2.safetensors tv3.safetensors
    mergeguard inspect --base base/ ft1/ ft2/ --json report.json
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Annotated, Any

import typer
from rich.table import Table

from mergeguard.cli._cli_utils import (
    AllowPickleOpt,
    JsonOpt,
    QuietOpt,
    ReportOverwriteOpt,
    Source,
)
from mergeguard.cli._errors import add_command
from mergeguard.cli._output import (
    RichProgress,
    err_console,
    fmt_bytes,
    out_console,
    show_table,
    write_json,
)
from mergeguard.errors import MergeguardError

EXAMPLES = [
    "mergeguard inspect merged/",
    "mergeguard inspect tv_cars.safetensors tv_dtd.safetensors tv_eurosat.safetensors",
    "mergeguard inspect --base base/ ft_cars/ ft_dtd/ --json stats.json",
    "mergeguard inspect model.safetensors --tensors",
]


def inspect_command(
    paths: Annotated[list[str], typer.Argument(help="Checkpoints, task vectors or LoRA adapters."), Source()],
    base: Annotated[str | None, typer.Option(
        "--base", help="Compare model checkpoints as task vectors relative to this base."), Source()] = None,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor (name, dtype, shape).")] = False,
    outlier_ratio: Annotated[float, typer.Option(
        "--outlier-ratio", help="Flag a vector whose norm exceeds this multiple of the others' median.")] = 2.0,
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = None,
    overwrite: ReportOverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show tensors, dtypes and sizes; for task vectors, norms, cosines, sign conflicts and outliers."""
    if not outlier_ratio > 1:  # NaN too
        raise MergeguardError(f"--outlier-ratio must be above 1 (got {outlier_ratio}); 2 flags twice the median.")

    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.checkpoint.provenance import PROVENANCE_KEY
    from mergeguard.taskvec import task_vector_stats

    ckpts = [open_checkpoint(p, allow_pickle=allow_pickle) for p in paths]
    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle) if base else None
    files = []
    for c in ckpts:
        dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in c.infos.values())
        entry = {
            "path": c.spec, "kind": c.kind, "tensors": len(c), "parameters": sum(i.numel for i in c.infos.values()),
            "bytes": c.total_bytes, "dtypes": dict(dtypes), "partial": c.is_partial,
        }
        if PROVENANCE_KEY in c.metadata:
            entry["provenance"] = json.loads(c.metadata[PROVENANCE_KEY])
        if tensors:
            entry["tensor_list"] = [
                {"name": i.name, "dtype": str(i.dtype).removeprefix("torch."), "shape": list(i.shape)}
                for i in c.infos.values()
            ]
        files.append(entry)

    vectors = [c for c in ckpts if c.is_task_vector or (base_ckpt is not None and c.kind == "model")]
    stats = None
    if vectors:
        with RichProgress(enabled=not quiet and len(vectors) > 0) as progress:
            stats = task_vector_stats(vectors, base_ckpt, outlier_ratio=outlier_ratio, progress=progress)

    payload: dict = {"files": files}
    if stats is not None:
        payload["task_vectors"] = {
            "labels": stats.labels, "norms": stats.norms, "cosine": stats.cosine,
            "sign_conflict": stats.sign_conflict, "outliers": stats.outliers, "outlier_ratio": stats.outlier_ratio,
        }
    write_json(json_out, payload)
    if not show_table(quiet, json_out):
        return
    _print_files(files)
    if stats is not None:
        _print_vectors(stats)


def _print_files(files: list[dict]) -> None:
    table = Table(title="checkpoints")
    for col in ("path", "kind", "tensors", "parameters", "size", "dtypes"):
        table.add_column(col, justify="right" if col in ("tensors", "parameters", "size") else "left")
    for e in files:
        kind = e["kind"] + (" (partial)" if e["partial"] else "")
        dts = ", ".join(f"{k}×{v}" for k, v in e["dtypes"].items())
        table.add_row(e["path"], kind, str(e["tensors"]), f"{e['parameters']:,}", fmt_bytes(e["bytes"]), dts)
    out_console.print(table)
    for e in files:
        if "tensor_list" in e:
            t = Table(title=e["path"])
            for col in ("tensor", "dtype", "shape"):
                t.add_column(col)
            for row in e["tensor_list"]:
                t.add_row(row["name"], row["dtype"], str(row["shape"]))
            out_console.print(t)


def _print_vectors(stats: Any) -> None:
    labels = [f"[{i}]" for i in range(len(stats.labels))]
    t = Table(title="task vectors: L2 norm, then cosine / sign-conflict rate with each other")
    t.add_column("#")
    t.add_column("vector")
    t.add_column("norm", justify="right")
    for lab in labels:
        t.add_column(lab, justify="right")
    for i, label in enumerate(stats.labels):
        flag = " [bold red]⚠ outlier[/]" if label in stats.outliers else ""
        cells = [
            "-" if i == j else f"{stats.cosine[i][j]:+.3f} / {stats.sign_conflict[i][j]:.0%}"
            for j in range(len(stats.labels))
        ]
        t.add_row(labels[i], label + flag, f"{stats.norms[i]:.4g}", *cells)
    out_console.print(t)
    for label in stats.outliers:
        err_console.print(
            f"[bold red]warning:[/] {label} has a norm over {stats.outlier_ratio:g}× the others' median: "
            "an amplified task vector (as LoBAM uploads) can carry a backdoor through a merge."
        )


def register(app: typer.Typer) -> None:
    add_command(app, "inspect", inspect_command, EXAMPLES)
