"""The command line answers at once: `--help` of every command, an argument error and a checkpoint that does
not exist import neither torch nor open_clip (each checked on `sys.modules` in a fresh interpreter;
bench/startup_bench.py times them)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "open_clip")

# argument errors, one or more per command: each exits 2 with its sentence before anything heavy is imported
ARGUMENT_ERRORS = [
    ["merge", ".", ".", "-o", "c", "--method", "ties_merging"],
    ["merge", ".", ".", "-o", "c", "--method", "ties", "--density", "3"],
    ["extract-tv", "."],
    ["inspect"],
    ["scan", "--base", ".", ".", "--shadow", "s", "--fail-on", "maybe"],
    ["scan", "--base", ".", ".", "--shadow", "s", "--steps", "0"],
    ["defend", "lfpm", "--merged", ".", "--base", ".", "--shadow", "s", "-o", "o", "--epochs", "0"],
    ["defend", "lfpm", "--merged", ".", "--base", ".", "--shadow", "s", "-o", "o", "--scan-suspicious", "2",
     "--scan-backdoored", "1"],
    ["defend", "ibvs", "--merged", ".", "--base", ".", "-o", "o", "--steps", "0"],
    ["attack", "badmerging", "--base", ".", "--data", "train=d", "--heads", "h", "--task", "t", "-o", "o",
     "--target-class", "1", "--r-min", "2"],
    ["attack", "badmerging", "--base", ".", "--data", "train=d", "--heads", "h", "--task", "t", "-o", "o",
     "--target-class", "1", "--mode", "sideways"],
    ["attack", "badtv", "--base", ".", "--data", "train=d", "--heads", "h", "--task", "t", "-o", "o"],
    ["finetune", "--base", ".", "--data", "test=d", "--heads", "h", "--task", "t", "-o", "o"],
    ["eval", ".", "--heads", "h", "--task", "x"],
    ["heads", "--base", "b", "--task", "x", "-o", "h.safetensors"],
    ["zoo", "build", "--size", "huge"],
    ["demo", "--size", "tiyn"],
    ["nonsense"],
    # a checkpoint that is neither on disk nor a Hub id is said at once too
    ["merge", "nope.safetensors", "also_nope.safetensors", "-o", "o"],
    ["extract-tv", "./nope", "b", "-o", "c"],
    ["scan", "--base", "missing/base.safetensors", "x", "--shadow", "s"],
    ["eval", "./nope", "--heads", "h", "--task", "a=b"],
]

SCRIPT = """
import json, sys
from typer.testing import CliRunner
from mergeguard.cli import app
result = CliRunner().invoke(app, json.loads(sys.argv[1]))
print(json.dumps({"exit": result.exit_code, "output": result.output,
                  "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args), json.dumps(HEAVY)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _all_commands() -> list[list[str]]:
    from typer.main import get_command

    from mergeguard.cli import app

    def walk(cmd, path):
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(get_command(app), []))


def test_every_help_loads_no_torch():
    for path in _all_commands():
        got = _run([*path, "--help"])
        assert got["exit"] == 0 and "Usage" in got["output"], (path, got["output"])
        assert got["heavy"] == [], (path, got["heavy"])


def test_argument_errors_answer_before_loading_torch():
    for args in ARGUMENT_ERRORS:
        got = _run(args)
        assert got["exit"] == 2, (args, got["output"])
        assert "Traceback" not in got["output"] and "internal error" not in got["output"], (args, got["output"])
        assert got["heavy"] == [], (args, got["heavy"], got["output"])


def test_the_size_names_checked_early_are_the_zoos_and_the_demos():
    from mergeguard.cli._cli_utils import ZOO_SIZES
    from mergeguard.models.zoo import SIZES
    from mergeguard.workflows.demo import SETTINGS

    assert tuple(SIZES) == ZOO_SIZES == tuple(SETTINGS)
