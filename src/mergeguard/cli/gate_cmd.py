"""`mergeguard lock` and `mergeguard gate`: pin every input, then run a release's steps and gates from one policy
file (`workflows/gate.py` says what the policy holds).

    mergeguard lock --base openai/clip-vit-base-patch32@main tv/cars.safetensors tv/dtd/ -o mergeguard.lock.yaml
    mergeguard gate policy.yaml -o release/ --json report.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mergeguard.cli._cli_utils import (
    AllowPickleOpt,
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
from mergeguard.cli._output import RichProgress, err_console, out_console, show_table, write_json
from mergeguard.errors import MergeguardError

LOCK_EXAMPLES = [
    "mergeguard lock --base openai/clip-vit-base-patch32@main someone/clip-cars@v2 tv/dtd.safetensors "
    "-o mergeguard.lock.yaml",
    "mergeguard lock --base base/ ft_cars/ ft_dtd/ lora_eurosat/ -o mergeguard.lock.yaml --overwrite   # re-pin",
]
GATE_EXAMPLES = [
    "mergeguard gate policy.yaml                       # release/ beside the policy, when every gate passes",
    "mergeguard gate policy.yaml -o release/ --json report.json",
    "mergeguard gate policy.yaml && cat .mergeguard-gate/report.md >> \"$GITHUB_STEP_SUMMARY\"",
]


def lock_command(
    inputs: Annotated[list[str], typer.Argument(
        help="The checkpoints to merge: fine-tunes, task vectors, LoRA adapters, Hub ids (owner/name@rev).",
        show_default=False), Source()],
    base: BaseOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="The lock file to write (YAML)."), Output()] = Path(
        "mergeguard.lock.yaml"),
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Pin the base and every input: the Hub commit each resolves to and the sha256 of every file read from it.
    `mergeguard gate` refuses an input whose bytes differ from its pin."""
    from mergeguard.checkpoint.paths import make_parents
    from mergeguard.workflows.lock import make_lock

    if out.exists() and not overwrite:
        raise MergeguardError(f"{out} exists; pass --overwrite to pin again.")
    if out.is_dir():
        raise MergeguardError(f"{out} is a folder; give the lock file's name (e.g. mergeguard.lock.yaml).")
    with RichProgress(enabled=not quiet) as progress:
        lock = make_lock(base, list(inputs), out, allow_pickle=allow_pickle, progress=progress)
    make_parents(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(lock.to_yaml())
    tmp.replace(out)
    pins = [lock.base, *lock.inputs]
    write_json(json_out, {"out": str(out), "pins": [p.to_yaml() for p in pins]})
    if show_table(quiet, json_out):
        table = Table(title=f"pinned → {out}")
        for col in ("role", "input", "Hub commit", "files (sha256)"):
            table.add_column(col)
        for role, p in [("base", lock.base), *(("input", p) for p in lock.inputs)]:
            table.add_row(role, p.spec, p.commit or "—",
                          ", ".join(f"{n} {d[:12]}…" for n, d in p.files.items()))
        out_console.print(table)


def gate_command(
    ctx: typer.Context,
    policy: Annotated[Path, typer.Argument(help="The policy file (YAML): lock, merge, shadow, heads and the gates.",
                                           show_default=False), Input()],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="The release folder, written only when every gate passes (default: the policy's "
                            "'release', else release/ beside it)."), Output()] = None,
    work: Annotated[Path | None, typer.Option(
        "--work", help="Where the steps' outputs are kept, and reused by a rerun with the same inputs and "
                       "settings (default: .mergeguard-gate/ beside the policy).")] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Check every pin, then scan the inputs, merge, defend, scan the result and evaluate it, as the policy says,
    stopping at the first gate that fails. Writes the release (the model, a model card naming every input with its
    pin and every check with its number, report.json, report.md) only when every gate passes. Exit 0: passed;
    1: a gate failed (the report says which, and by how much); 2: bad input (a pin that does not match, a
    mistake in the policy)."""
    from mergeguard.cli import _inprocess
    from mergeguard.workflows.gate import REPORT, SUMMARY, GateRun, load_policy, summary, write_release

    p = load_policy(policy, out)
    work = (work or policy.resolve().parent / ".mergeguard-gate").resolve()
    if p.release.exists() and not p.release.is_dir():
        raise MergeguardError(f"the release {p.release} is a file; give a folder.")
    require_empty(p.release, overwrite)
    if p.release.resolve() == work or work in p.release.resolve().parents or p.release.resolve() in work.parents:
        raise MergeguardError(f"the release {p.release} and the work folder {work} must be apart.")

    def say(text: str) -> None:
        if not quiet:
            err_console.print(text, highlight=False, soft_wrap=True)

    root = ctx.find_root().command
    run = GateRun(p, work, lambda argv: _inprocess.invoke(root, argv, show_progress=not quiet, ok=(0, 1)), say)
    model = run.go()
    passed = model is not None
    report = run.report(passed, p.release if passed else None)
    (work / SUMMARY).write_text(summary(report))
    (work / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    if passed:
        write_release(p.release, model, report)
    write_json(json_out, report)
    if show_table(quiet, json_out):
        table = Table(title=f"gate {policy}: {'PASSED' if passed else 'FAILED at ' + str(report['failed_step'])}")
        for col in ("step", "check", "value", "limit", ""):
            table.add_column(col)
        for c in run.checks:
            table.add_row(c.step, c.what, f"{c.value:.4g}" if isinstance(c.value, float) else str(c.value),
                          f"{c.limit:.4g}" if isinstance(c.limit, float) else str(c.limit),
                          "not gated" if not c.gated else "[green]pass[/]" if c.passed else "[bold red]FAIL[/]")
        out_console.print(table)
        out_console.print(f"release: {p.release}" if passed else "no release written", highlight=False)
    if not passed:
        failed = next(c for c in run.checks if not c.passed)
        err_console.print(f"[bold red]gate failed:[/] {failed.line()}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_THRESHOLD)


def register(app: typer.Typer) -> None:
    add_command(app, "lock", lock_command, LOCK_EXAMPLES,
                short_help="Pin the base and every input (Hub commit, sha256 of every file) for `gate`.")
    add_command(app, "gate", gate_command, GATE_EXAMPLES,
                short_help="A release in one command: check the pins, scan, merge, defend, scan, eval, gate.")
