"""`mergeguard heads`: zero-shot classification heads from class names, through a CLIP text tower.

    mergeguard heads --base open_clip:ViT-B-32@openai --task cars=cars --task dtd=dtd -o heads.safetensors
    mergeguard heads --base clip_full.safetensors --arch ViT-B-32 --task mine=data/mine/train -o heads.safetensors
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mergeguard.cli._cli_utils import (
    AllowPickleOpt,
    ArchOpt,
    DeviceOpt,
    Input,
    JsonOpt,
    Output,
    OverwriteOpt,
    QuietOpt,
    Spec,
)
from mergeguard.cli._errors import add_command
from mergeguard.cli._output import (
    RichProgress,
    out_console,
    show_table,
    write_json,
)
from mergeguard.errors import MergeguardError

EXAMPLES = [
    "mergeguard heads --base open_clip:ViT-B-32@openai --task cars=cars --task dtd=dtd -o heads.safetensors",
    "mergeguard heads --base clip_full.safetensors --arch ViT-B-32 --task pets=data/pets/train -o heads.safetensors",
    "mergeguard heads --base open_clip:ViT-B-32@openai --task mine=classes.txt -o heads.safetensors",
]


def heads_command(
    base: Annotated[str, typer.Option(
        "--base", help="open_clip:NAME@TAG, or a full open_clip checkpoint with its text tower."), Input()],
    task: Annotated[list[str], typer.Option(
        "--task", "-t", metavar="NAME=SPEC",
        help="NAME=SPEC: SPEC is a shipped task name, a folder of class folders, or a text file."),
        Spec()],
    out: Annotated[Path, typer.Option("--out", "-o", help="Heads file to write (.safetensors)."), Output()],
    arch: ArchOpt = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Build one zero-shot head per task (CLIP's normalised mean over prompt templates)."""
    pairs = []
    for item in task:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise MergeguardError(f"--task takes NAME=SPEC, got {item!r}.")
        pairs.append((name, spec))
    # heavy imports (torch, open_clip) wait until the arguments are checked: an error answers at once
    from mergeguard.models.arch import load_arch_arg
    from mergeguard.models.heads import load_text_model, resolve_classnames, save_heads, zero_shot_head
    from mergeguard.trainer import resolve_device

    specs = [(name, *resolve_classnames(spec)) for name, spec in pairs]
    dev = resolve_device(device)
    model, tokenizer = load_text_model(base, load_arch_arg(arch) if arch else None, allow_pickle)
    model = model.to(dev)
    heads = {}
    with RichProgress(enabled=not quiet) as progress:
        progress.stage("zero-shot heads", len(specs))
        for name, classnames, templates in specs:
            heads[name] = zero_shot_head(model, tokenizer, name, classnames, templates, device=dev)
            progress.advance()
    save_heads(heads, out, overwrite=overwrite)
    summary = {n: {"classes": len(h.classnames), "scale": h.scale} for n, h in heads.items()}
    payload = {"out": str(out), "heads": summary}
    write_json(json_out, payload)
    if show_table(quiet, json_out):
        table = Table(title=f"heads → {out}")
        for col in ("task", "classes", "logit scale"):
            table.add_column(col)
        for n, h in heads.items():
            table.add_row(n, str(len(h.classnames)), f"{h.scale:.1f}")
        out_console.print(table)


def register(app: typer.Typer) -> None:
    add_command(app, "heads", heads_command, EXAMPLES)
