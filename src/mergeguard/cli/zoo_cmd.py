"""`mergeguard zoo build`: the built-in tiny model family, offline, on the CPU.

    mergeguard zoo build                      # tiny, into the cache
    mergeguard zoo build --size small --out zoo/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mergeguard.cli._cli_utils import (
    Group,
    JsonOpt,
    Output,
    OverwriteOpt,
    QuietOpt,
    check_size,
    refuse_report_into_output,
)
from mergeguard.cli._errors import add_command
from mergeguard.cli._output import (
    RichProgress,
    out_console,
    show_table,
    write_json,
)

EXAMPLES = [
    "mergeguard zoo build",
    "mergeguard zoo build --size small --out zoo/",
    "mergeguard zoo build --size tiny --force --json zoo.json",
]

zoo_app = typer.Typer(cls=Group, help="The built-in tiny model family (no download).", no_args_is_help=True)


def zoo_build_command(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder (default: the cache)."), Output()] = None,
    size: Annotated[str, typer.Option(
        "--size", help="tiny (the tests' and the demo's default) or small (times: docs/times.md).")] = "tiny",
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same tensors.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a built zoo is there.")] = False,
    json_out: JsonOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build (or reuse) the zoo and print its acceptance numbers."""
    check_size(size)
    # heavy imports (torch, open_clip) wait until the arguments are checked: an error answers at once
    from mergeguard.models.zoo import default_zoo_dir
    from mergeguard.workflows.zoo import build_zoo

    # the default folder (the cache's) is known only here
    refuse_report_into_output(json_out, out if out is not None else default_zoo_dir(size, seed))
    with RichProgress(enabled=not quiet) as progress:
        info = build_zoo(out, size=size, seed=seed, force=force, progress=progress)
    write_json(json_out, info)
    if show_table(quiet, json_out):
        acc = info["acceptance"]
        cached = " (cached)" if info.get("cached") else f" (built in {info.get('seconds', 0):.0f} s)"
        table = Table(title=f"zoo {info['size']} at {info['root']}{cached}")
        for col in ("task", "pre-trained CA", "fine-tuned CA", f"merged CA (λ {info['merge_lambda']})"):
            table.add_column(col, justify="right" if col != "task" else "left")
        for task in acc["finetuned"]:
            table.add_row(task, f"{acc['pretrained'][task]:.1%}", f"{acc['finetuned'][task]:.1%}",
                          f"{acc['merged'][task]:.1%}")
        table.add_section()
        table.add_row("average", f"{acc['pretrained_avg']:.1%}", f"{acc['finetuned_avg']:.1%}",
                      f"{acc['merged_avg']:.1%}")
        out_console.print(table)


def register(app: typer.Typer) -> None:
    add_command(zoo_app, "build", zoo_build_command, EXAMPLES)
    app.add_typer(zoo_app, name="zoo")
