"""`mergeguard extract-tv`: turn a fine-tuned checkpoint or a PEFT LoRA adapter into a task vector.

    mergeguard extract-tv BASE FINETUNED -o tv.safetensors
    mergeguard extract-tv BASE LORA_ADAPTER_DIR -o tv.safetensors
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mergeguard.cli._cli_utils import (
    AllowMissingOpt,
    AllowPickleOpt,
    DtypeOpt,
    JsonOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    Source,
)
from mergeguard.cli._errors import add_command
from mergeguard.cli._output import (
    RichProgress,
    out_console,
    show_table,
    write_json,
)

EXAMPLES = [
    "mergeguard extract-tv base/ finetuned_cars/ -o tv_cars.safetensors",
    "mergeguard extract-tv openai/clip-vit-base-patch32 user/clip-cars -o tv_cars.safetensors",
    "mergeguard extract-tv base/ lora_adapter/ -o tv_lora.safetensors      # PEFT LoRA: dense (alpha/r) B A",
]


def extract_tv_command(
    base: Annotated[str, typer.Argument(help="Base (pre-trained) checkpoint: file, folder or Hub id."), Source()],
    finetuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint, or a PEFT LoRA adapter folder."), Source()],
    out: OutOpt,
    dtype: DtypeOpt = "auto",
    allow_missing: AllowMissingOpt = False,
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write the task vector FINETUNED - BASE (or a LoRA adapter's dense update) to a safetensors file."""

    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.taskvec import extract_task_vector

    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle)
    ft_ckpt = open_checkpoint(finetuned, allow_pickle=allow_pickle)
    with RichProgress(enabled=not quiet) as progress:
        result = extract_task_vector(base_ckpt, ft_ckpt, out, dtype=dtype, allow_missing=allow_missing,
                                     overwrite=overwrite, progress=progress)
    write_json(json_out, {"out": str(result.out), "source": result.source, "tensors": result.tensors,
                          "skipped": result.skipped, "norm": result.norm, "lora": result.lora_rule})
    if show_table(quiet, json_out):
        table = Table(title="task vector", show_header=False)
        table.add_row("output", str(result.out))
        table.add_row("from", "LoRA adapter (dense (alpha/r) B A)" if result.source == "lora" else "full fine-tune")
        table.add_row("tensors", str(result.tensors) + (f" ({result.skipped} skipped)" if result.skipped else ""))
        table.add_row("L2 norm", f"{result.norm:.4g}")
        if result.lora_rule and result.lora_rule["out_proj_modules"]:
            rule = result.lora_rule
            table.add_row("attention out_proj", f"{len(rule['out_proj_modules'])} module(s) counted "
                          f"{'twice' if rule['out_proj_doubled'] else 'once'}: {rule['why']}")
        out_console.print(table)


def register(app: typer.Typer) -> None:
    add_command(app, "extract-tv", extract_tv_command, EXAMPLES)
