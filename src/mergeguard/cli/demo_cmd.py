"""`mergeguard demo`: the whole loop on the built-in zoo, offline, on whatever device there is.

    mergeguard demo                        # the tiny zoo, outputs in ./mergeguard-demo
    mergeguard demo --size tiny --json demo.json
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mergeguard.cli._cli_utils import (
    DeviceOpt,
    Input,
    JsonOpt,
    Output,
    OverwriteOpt,
    QuietOpt,
    check_size,
)
from mergeguard.cli._errors import add_command
from mergeguard.cli._output import (
    err_console,
    out_console,
    show_table,
    write_json,
)

EXAMPLES = [
    "mergeguard demo",
    "mergeguard demo --size tiny --out /tmp/demo --json demo.json",
    "mergeguard demo --device cuda",
]

ROW_NAMES = {  # short enough that the table fits 80 columns
    "clean_merge": "clean",
    "poisoned_merge": "poisoned",
    "poisoned_ties": "poisoned TIES",
    "lfpm": "poisoned+LFPM",
    "ibvs": "poisoned+IBVS",
}


def demo_command(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for everything the demo writes."), Output()] = Path(
        "mergeguard-demo"),
    size: Annotated[str, typer.Option("--size", help="Zoo size: tiny (the README's first command) or small (a "
                                                      "larger model, several times slower; times: docs/times.md).")
                    ] = "tiny",
    zoo: Annotated[Path | None, typer.Option("--zoo", help="A zoo folder built by `zoo build` (default: the cache)."),
                   Input()] = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Red-team and defend a merge on the built-in zoo, end to end, and print one before/after table.

    Builds (or loads) the zoo, poisons one task vector with BadMerging, merges it with the clean
    ones (task arithmetic and TIES), evaluates, defends with LFPM and with IBVS, evaluates again,
    and prints the commands that redo each step by hand. Offline, on a CPU (times: docs/times.md).
    """
    def say(text: str) -> None:
        if not quiet:
            err_console.print(text, highlight=False)

    check_size(size)
    from mergeguard.cli import _inprocess
    from mergeguard.workflows.demo import run_demo

    root = ctx.find_root().command  # the `mergeguard` group: each step runs through it, as typed
    result = run_demo(out, lambda argv: _inprocess.invoke(root, argv, show_progress=not quiet), size=size,
                      zoo=zoo, device=device, say=say)
    write_json(json_out, result)
    if not show_table(quiet, json_out):
        return
    rows = {**result["rows"], **result["extra_rows"]}
    tasks = list(rows["clean_merge"]["tasks"])
    table = Table(title=f"mergeguard demo ({result['size']} zoo, {result['seconds']:.0f} s): CA per task, "
                        f"ASR with the trigger of the BadMerging attack on {rows['clean_merge']['target_task']!r}",
                  caption="task arithmetic merges (λ 0.3) unless named; ASR(T) on the attacked task, "
                          "ASR(N) on the others")
    table.add_column("merge")
    for t in tasks:
        table.add_column(t, justify="right")
    for col in ("avg CA", "ASR(T)", "ASR(N)"):
        table.add_column(col, justify="right")
    for key in ("clean_merge", "poisoned_merge", "poisoned_ties", "lfpm", "ibvs"):
        r = rows[key]
        table.add_row(ROW_NAMES[key], *(f"{r['tasks'][t]['ca']:.1%}" for t in tasks), f"{r['ca_avg']:.1%}",
                      f"{r['asr_t']:.1%}", f"{r['asr_n']:.1%}")
    out_console.print(table)
    out_console.print(f"The same as a picture: {result['figure']}", highlight=False, soft_wrap=True)
    out_console.print(f"Everything is in {result['out']}. The steps as they ran (with D={result['out']}); to redo "
                      f"them by hand, in order, in a shell, without touching the demo's outputs:", highlight=False,
                      soft_wrap=True)
    for name, value in result["variables"].items():
        out_console.print(f"  {name}={shlex.quote(value)}", highlight=False, soft_wrap=True)
    for line in result["commands"]:
        out_console.print(f"  {line}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    add_command(app, "demo", demo_command, EXAMPLES)
