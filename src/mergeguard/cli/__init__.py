"""The `mergeguard` command-line tool: one thin module per command.

Exit codes: 0 success, 1 a threshold was crossed (eval), 2 bad input, 3 internal error, 130 interrupted,
143 terminated (`cli/_errors.py`).
"""

from __future__ import annotations

from typing import Annotated

import typer

from mergeguard import __version__
from mergeguard.cli import (
    attack_cmd,
    defend_cmd,
    demo_cmd,
    eval_cmd,
    extract_tv_cmd,
    gate_cmd,
    heads_cmd,
    inspect_cmd,
    merge_cmd,
    scan_cmd,
    zoo_cmd,
)
from mergeguard.cli._cli_utils import Group
from mergeguard.cli._output import install_log_bridge

app = typer.Typer(
    cls=Group,
    name="mergeguard",
    help="Secure merged model checkpoints: extract task vectors, merge them, red-team and defend the merge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mergeguard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Secure merged model checkpoints."""
    install_log_bridge()  # the library's warnings (logging.getLogger("mergeguard.*")) as `warning:` lines


extract_tv_cmd.register(app)
merge_cmd.register(app)
scan_cmd.register(app)
inspect_cmd.register(app)
heads_cmd.register(app)
eval_cmd.register(app)
zoo_cmd.register(app)
attack_cmd.register(app)
defend_cmd.register(app)
demo_cmd.register(app)
gate_cmd.register(app)


def run_command(argv: list[str], *, show_progress: bool = True) -> None:
    """Run `mergeguard ARGV` in this process, as the console script would (`_inprocess.invoke`): what the demo's
    steps and the benchmarks built on it use."""
    import typer.main

    from mergeguard.cli._inprocess import invoke

    invoke(typer.main.get_command(app), argv, show_progress=show_progress)


def main() -> None:
    """Console-script entry point; SIGTERM stops a command the way Ctrl-C does (cleanup, exit 143)."""
    import signal

    from mergeguard.cli._errors import raise_terminated

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        app()
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group before the interpreter exits: a gloo group left to the exit
    path aborted a rank now and then ("terminate called without an active exception", SIGABRT)."""
    import sys

    dist = sys.modules.get("torch.distributed")  # only if a command imported it: `merge` stays light
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
