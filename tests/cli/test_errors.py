"""`handle_errors` (cli/_errors.py): what a command reads and writes is what its parameters are marked with,
whatever they are called; exceptions become one line and their exit code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from typer.testing import CliRunner

from mergeguard.cli import app as mergeguard_app
from mergeguard.cli._cli_utils import Input, JsonOpt, Output, OverwriteOpt, QuietOpt, Source, Spec, command_roles
from mergeguard.cli._errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, handle_errors
from mergeguard.cli._output import write_json

runner = CliRunner()

# a brand-new command's options, named as no existing command names them
WeightsOpt = Annotated[str, typer.Option("--weights", help="Weights to score."), Input()]
UnmarkedWeightsOpt = Annotated[str, typer.Option("--weights", help="Weights to score.")]
PairOpt = Annotated[list[str], typer.Option("--pair", help="NAME=DIR; repeat."), Spec()]
DestOpt = Annotated[Path, typer.Option("--dest", help="Output folder."), Output()]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue.")]


def score_command(weights: WeightsOpt, json_out: JsonOpt = None, quiet: QuietOpt = False) -> None:
    write_json(json_out, {"weights": weights})


def unmarked_score_command(weights: UnmarkedWeightsOpt, json_out: JsonOpt = None,
                           overwrite: OverwriteOpt = False) -> None:
    write_json(json_out, {"weights": weights})


def pairs_command(pair: PairOpt, dest: DestOpt, json_out: JsonOpt = None) -> None:
    write_json(json_out, {"pairs": pair})


def interrupted_command(dest: DestOpt, resume: ResumeOpt = False) -> None:
    (dest / ".partial").mkdir(parents=True, exist_ok=True)
    (dest / ".partial" / "state.pt").write_text("state")
    raise KeyboardInterrupt


def interrupted_without_resume_command(dest: DestOpt) -> None:
    interrupted_command(dest)


def run(command, *args):
    one = typer.Typer()
    one.command()(handle_errors(command))
    return runner.invoke(one, [str(a) for a in args])


def test_json_over_a_marked_input_is_refused_whatever_its_name(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    result = run(score_command, "--weights", weights, "--json", weights)
    assert result.exit_code == EXIT_BAD_INPUT and "choose another --json" in result.output, result.output
    assert weights.read_bytes() == b"weights"


def test_without_the_marker_the_same_input_is_not_protected(tmp_path):
    """The marker, not the parameter's name, is what makes `--weights` an input (with --overwrite, as the file
    exists)."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    result = run(unmarked_score_command, "--weights", weights, "--json", weights, "--overwrite")
    assert result.exit_code == 0, result.output
    assert weights.read_text().startswith("{")


def test_spec_inputs_and_the_marked_output_are_protected(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "out").mkdir()
    into_spec = run(pairs_command, "--pair", f"a={tmp_path / 'images'}", "--dest", tmp_path / "out", "--json",
                    tmp_path / "images" / "r.json")
    into_output = run(pairs_command, "--pair", f"a={tmp_path / 'images'}", "--dest", tmp_path / "out", "--json",
                      tmp_path / "out" / "r.json")
    assert into_spec.exit_code == EXIT_BAD_INPUT and "choose another --json" in into_spec.output
    assert into_output.exit_code == EXIT_BAD_INPUT and "would be written into the output" in into_output.output
    assert not (tmp_path / "images" / "r.json").exists() and not (tmp_path / "out" / "r.json").exists()
    fine = run(pairs_command, "--pair", f"a={tmp_path / 'images'}", "--dest", tmp_path / "out", "--json",
               tmp_path / "r.json")
    assert fine.exit_code == 0, fine.output


def test_an_interrupted_run_points_to_resume_only_where_the_command_has_it(tmp_path):
    resumable = run(interrupted_command, "--dest", tmp_path / "a")
    assert resumable.exit_code == EXIT_INTERRUPTED
    assert f"--resume continues from {tmp_path / 'a'}/.partial" in resumable.output.replace("\n", "")
    plain = run(interrupted_without_resume_command, "--dest", tmp_path / "b")
    assert plain.exit_code == EXIT_INTERRUPTED and "nothing was written" in plain.output


def _commands(group: typer.Typer, prefix: str = ""):
    for info in group.registered_commands:
        yield prefix + info.name, info.callback
    for sub in group.registered_groups:
        yield from _commands(sub.typer_instance, prefix + sub.name + " ")


def test_every_command_marks_what_it_reads_and_writes():
    """Each command's inputs as its markers say (the merge command's rebuilt signature and the attacks'
    hidden options included); a task's name (`attack --task cars`) is not an input, `eval --task NAME=DIR` is."""
    attack = {"base": Source, "data": Spec, "heads": Input, "target_images": Input, "arch": Input}
    expected = {
        "extract-tv": {"base": Source, "finetuned": Source},
        "merge": {"base": Source, "inputs": Source, "add": Source, "subtract": Source, "reference": Source,
                  "config": Input, "heads": Input, "shadow_per_task": Spec, "inputs_per_task": Spec},
        "inspect": {"paths": Source, "base": Source},
        "heads": {"base": Input, "task": Spec, "arch": Input},
        "eval": {"model": Source, "task": Spec, "heads": Input, "arch": Input, "trigger": Input, "base": Source},
        "finetune": {"base": Source, "data": Spec, "heads": Input, "arch": Input},
        "demo": {"zoo": Input},
        "zoo build": {},
        "attack badmerging": attack, "attack lobam": attack,
        "attack badnets": {k: v for k, v in attack.items() if k != "target_images"},  # it has no off-task mode
        "attack badtv": {**{k: v for k, v in attack.items() if k != "target_images"}, "negation_images": Input},
        "defend lfpm": {"merged": Source, "base": Source, "shadow": Input, "heads": Input, "arch": Input},
        "scan": {"inputs": Source, "base": Source, "shadow": Input, "heads": Input, "merged": Source, "arch": Input},
        "defend ibvs": {"merged": Source, "base": Source, "data": Spec, "heads": Input, "arch": Input},
        "lock": {"inputs": Source, "base": Source},
        "gate": {"policy": Input},
    }
    resumable = {"finetune", "attack badmerging", "attack badnets", "attack lobam", "attack badtv", "defend lfpm"}
    seen = {}
    for name, callback in _commands(mergeguard_app):
        roles = command_roles(callback)
        seen[name] = {k: type(v) for k, v in roles.inputs.items()}
        assert roles.output == ("out" if name not in ("eval", "inspect") else None), name
        assert ("--resume" in roles.flags) == (name in resumable), name
        assert roles.flags["--json"] == "json_out" and roles.flags["--quiet"] == "quiet", name
        assert roles.flags["--overwrite"] == "overwrite", f"{name}: --json without --overwrite breaks the one rule"
    assert seen == expected


def test_one_rule_for_an_existing_output_json_included(family, tmp_path):
    """An existing --json FILE is refused like a non-empty --out (exit 2, the file untouched); --overwrite
    replaces it."""
    report = tmp_path / "report.json"
    report.write_text("mine\n")
    args = ["inspect", *map(str, family["paths"]), "--json", str(report), "-q"]
    refused = CliRunner().invoke(mergeguard_app, args)
    assert refused.exit_code == EXIT_BAD_INPUT and "exists" in refused.output and "--overwrite" in refused.output
    assert report.read_text() == "mine\n"
    replaced = CliRunner().invoke(mergeguard_app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(report.read_text())


def mismatched_torch_command() -> None:
    raise RuntimeError("operator torchvision::nms does not exist")


def test_a_torch_and_torchvision_that_do_not_match_is_one_sentence_naming_both():
    from importlib.metadata import version

    result = run(mismatched_torch_command)
    assert result.exit_code == EXIT_BAD_INPUT and "internal error" not in result.output, result.output
    assert f"torch {version('torch')} and torchvision {version('torchvision')} do not match" in result.output


def test_ctrl_c_while_the_cli_is_still_being_imported_is_one_line_and_130(monkeypatch, capsys):
    """The console script (`mergeguard.__main__:run`) is all that runs before the imports: a Ctrl-C there
    gives one line, no traceback."""
    import sys
    import types

    import pytest

    from mergeguard.__main__ import run as console_script

    class StillImporting(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "mergeguard.cli", StillImporting("mergeguard.cli"))
    with pytest.raises(SystemExit) as exit_info:
        console_script()
    assert exit_info.value.code == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
