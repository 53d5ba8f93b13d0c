"""The command line as a user meets it: outputs, JSON, config files, and one sentence per bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergeguard.checkpoint import CheckpointWriter
from mergeguard.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(result):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert sum(line.startswith("error:") for line in lines) == 1, result.output
    return result.output


@pytest.mark.parametrize("command", ["extract-tv", "merge", "inspect"])
def test_help_shows_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Examples" in result.output and f"mergeguard {command}" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("mergeguard ")


def test_merge_with_flags_equals_merge_with_config(family, tmp_path):
    base, paths = family["base_path"], family["paths"]
    r1 = invoke("merge", base, *paths, "-o", tmp_path / "flags", "--method", "ties", "--density", "0.4",
                "--normalize", "sum", "--weight", "1", "--weight", "0.5", "--weight", "2", "-q")
    assert r1.exit_code == 0, r1.output
    (tmp_path / "merge.yaml").write_text(
        f"method: ties\nbase: {base}\ndensity: 0.4\nnormalize: sum\ninputs:\n"
        f"  - {paths[0]}\n  - {{path: {paths[1]}, weight: 0.5}}\n  - {{path: {paths[2]}, weight: 2}}\n"
    )
    r2 = invoke("merge", "--config", tmp_path / "merge.yaml", "-o", tmp_path / "config", "-q")
    assert r2.exit_code == 0, r2.output
    a = load_file(tmp_path / "flags" / "model.safetensors")
    b = load_file(tmp_path / "config" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_json_to_stdout(family, tmp_path):
    result = invoke("merge", family["base_path"], *family["paths"], "-o", tmp_path / "m", "--json", "-", "-q")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["method"] == "task_arithmetic" and payload["params"] == {"lam": 0.3}
    assert payload["tensors"] == len(family["base"]) and payload["copied_from_base"] == 1


def test_inspect_flags_amplified_vector(family, tmp_path):
    b, f = family["base"], family["fts"][0]
    save_file({k: b[k] + 4 * (f[k] - b[k]) if b[k].is_floating_point() else b[k] for k in b},
              tmp_path / "amp.safetensors")
    result = invoke("inspect", "--base", family["base_path"], *family["paths"], tmp_path / "amp.safetensors",
                    "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["task_vectors"]["outliers"] == [str(tmp_path / "amp.safetensors")]
    assert "outlier" in result.output


def test_inputs_are_never_modified(family, tmp_path):
    files = [family["base_path"], *family["paths"]]
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert invoke("merge", *files, "-o", tmp_path / "m", "--method", "dare_ties", "-q").exit_code == 0
    assert invoke("extract-tv", files[0], files[1], "-o", tmp_path / "tv.safetensors", "-q").exit_code == 0
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in files] == before


def test_every_output_goes_into_missing_folders(family, tmp_path):
    """One rule for every command that writes: missing parent folders are created, as `mkdir -p` would (the
    README's quick start writes tv/cars.safetensors into a folder nobody made)."""
    base, ft = family["base_path"], family["paths"][0]
    tv = tmp_path / "a" / "tv" / "cars.safetensors"
    assert invoke("extract-tv", base, ft, "-o", tv, "-q", "--json", tmp_path / "r1" / "x.json").exit_code == 0
    assert tv.is_file() and (tmp_path / "r1" / "x.json").is_file()
    for out in (tmp_path / "b" / "by-hand" / "clean_merge", tmp_path / "c" / "d" / "merged.safetensors"):
        result = invoke("merge", base, *family["paths"], "-o", out, "-q")
        assert result.exit_code == 0, result.output
        assert out.exists()
    result = invoke("inspect", tv, "--json", tmp_path / "e" / "f" / "inspect.json", "-q")
    assert result.exit_code == 0 and (tmp_path / "e" / "f" / "inspect.json").is_file(), result.output
    # a file where a folder must be: one sentence, nothing written
    (tmp_path / "blocker").write_text("")
    out = _one_error_line(invoke("merge", base, *family["paths"], "-o", tmp_path / "blocker" / "m"))
    assert "is a file, not a folder" in out
    assert invoke("inspect", tv, "--json", tmp_path / "blocker" / "x.json", "-q").exit_code == 2


# -- bad input: one sentence, exit 2, nothing written ------------------------------
def test_missing_file(family, tmp_path):
    out = _one_error_line(invoke("merge", family["base_path"], tmp_path / "nope.safetensors", "-o", tmp_path / "m"))
    assert "does not exist" in out and not (tmp_path / "m").exists()


def test_truncated_input(family, tmp_path):
    raw = family["paths"][0].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    out = _one_error_line(invoke("merge", family["base_path"], tmp_path / "cut.safetensors", "-o", tmp_path / "m"))
    assert "truncated" in out and not (tmp_path / "m").exists()


def test_shape_mismatch(family, tmp_path):
    save_file(dict(family["fts"][0], **{"head.weight": torch.zeros(3, 3)}), tmp_path / "bad.safetensors")
    out = _one_error_line(invoke("extract-tv", family["base_path"], tmp_path / "bad.safetensors", "-o",
                                 tmp_path / "tv.safetensors"))
    assert "'head.weight'" in out and not (tmp_path / "tv.safetensors").exists()


def test_nan_input(family, tmp_path):
    ft = dict(family["fts"][0])
    ft["embed.weight"] = ft["embed.weight"].clone()
    ft["embed.weight"][0, 0] = float("nan")
    save_file(ft, tmp_path / "nan.safetensors")
    out = _one_error_line(invoke("merge", family["base_path"], tmp_path / "nan.safetensors", "-o", tmp_path / "m"))
    assert "'embed.weight'" in out and "NaN" in out and not (tmp_path / "m").exists()


def test_missing_keys_error_then_allowed(family, tmp_path):
    save_file({k: v for k, v in family["fts"][0].items() if k != "embed.weight"}, tmp_path / "p.safetensors")
    out = _one_error_line(invoke("merge", family["base_path"], tmp_path / "p.safetensors", "-o", tmp_path / "m"))
    assert "--allow-missing" in out
    ok = invoke("merge", family["base_path"], tmp_path / "p.safetensors", "-o", tmp_path / "m", "--allow-missing",
                "-q")
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "frankenmerge"], "unknown merge method"),
        (["--method", "ties_merging"], "Did you mean 'ties'?"),
        (["--method", "ties", "--normalize", "sums"], "Did you mean 'sum'?"),
        (["--method", "ties", "--density", "0"], "--density for ties must be in (0, 1]"),
        (["--method", "ties", "--density", "1.5"], "--density for ties must be in (0, 1]"),
        (["--method", "task_arithmetic", "--density", "0.5"], "--density is not a parameter of task_arithmetic"),
        (["--method", "ties", "--normalize", "median"], "must be one of mean, sum"),
        (["--shard-size", "lots"], "--shard-size"),
    ],
)
def test_bad_method_or_parameter(family, tmp_path, args, message):
    out = _one_error_line(invoke("merge", family["base_path"], *family["paths"], "-o", tmp_path / "m", *args))
    assert message in out and not (tmp_path / "m").exists()


def test_unknown_config_key(family, tmp_path):
    (tmp_path / "c.yaml").write_text(f"base: {family['base_path']}\ninputs: [{family['paths'][0]}]\nlambda: 0.3\n")
    assert "unknown setting 'lambda'" in _one_error_line(invoke("merge", "-c", tmp_path / "c.yaml", "-o",
                                                                  tmp_path / "m"))


def test_pickle_needs_the_flag(family, tmp_path):
    torch.save(family["fts"][0], tmp_path / "ft.bin")
    out = _one_error_line(invoke("merge", family["base_path"], tmp_path / "ft.bin", "-o", tmp_path / "m"))
    assert "--allow-pickle" in out
    ok = invoke("merge", family["base_path"], tmp_path / "ft.bin", "-o", tmp_path / "m", "--allow-pickle", "-q")
    assert ok.exit_code == 0, ok.output


def test_existing_output_needs_overwrite(family, tmp_path):
    args = ["merge", family["base_path"], *family["paths"], "-o", tmp_path / "m", "-q"]
    assert invoke(*args).exit_code == 0
    assert "--overwrite" in _one_error_line(invoke(*args))
    assert invoke(*args, "--overwrite").exit_code == 0


def test_ctrl_c_leaves_no_output(family, tmp_path, monkeypatch):
    real_write = CheckpointWriter.write
    calls = {"n": 0}

    def interrupted(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_write(self, name, tensor)

    monkeypatch.setattr(CheckpointWriter, "write", interrupted)
    result = invoke("merge", family["base_path"], *family["paths"], "-o", tmp_path / "m", "--shard-size", "2000")
    assert result.exit_code == 130
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".m", "m"))]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """A CI timeout or `kill` sends SIGTERM; the half-built zoo's `.NAME.tmp-PID` folder used to stay behind."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "zoo"
    proc = subprocess.Popen([sys.executable, "-m", "mergeguard", "zoo", "build", "--size", "tiny", "--out", str(out),
                             "-q"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".zoo.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be stopped"
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the build
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "interrupted" in err, err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_to_the_process_group_with_dataloader_workers_is_one_line(tiny_zoo, tmp_path):
    """The workers die of the same SIGTERM; torch's SIGCHLD handler used to raise 'DataLoader worker ... killed
    by signal' with a traceback in the middle of the cleanup (5 runs in 6, a review run)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    z, out = tiny_zoo["root"], tmp_path / "attack"
    proc = subprocess.Popen([sys.executable, "-m", "mergeguard", "attack", "badnets", "--base", f"{z}/base", "--data",
                             f"train={z}/data/shape/train", "--heads", f"{z}/heads.safetensors", "--task", "shape",
                             "--target-class", "0", "--steps", "400", "--batch-size", "8", "--device", "cpu", "-q",
                             "--workers", "2", "-o", str(out)], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / ".partial").exists():  # training has started: the workers are up
        assert proc.poll() is None and time.monotonic() < deadline, "the attack ended before it could be stopped"
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err and "Exception ignored" not in err, err
    assert [line for line in err.splitlines() if line.strip()][0].startswith("interrupted:"), err


# -- regressions from review ---------------------------------------------------------
def test_overwrite_never_deletes_files_mergeguard_did_not_write(family, tmp_path):
    # the folder holding the inputs: refused before anything is read
    out = _one_error_line(invoke("merge", family["base_path"], family["paths"][0], "-o", family["dir"],
                                 "--overwrite"))
    assert "would replace the input" in out
    assert family["base_path"].exists() and family["paths"][0].exists()
    # an input file itself (extract-tv too)
    before = family["paths"][0].read_bytes()
    for command in (("merge", family["base_path"], family["paths"][0]), ("extract-tv", family["base_path"],
                                                                         family["paths"][0])):
        assert "would replace the input" in _one_error_line(invoke(*command, "-o", family["paths"][0], "--overwrite"))
    assert family["paths"][0].read_bytes() == before
    # a folder of someone else's files
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("mine")
    out = _one_error_line(invoke("merge", family["base_path"], family["paths"][0], "-o", notes, "--overwrite"))
    assert "did not write" in out and (notes / "thesis.txt").read_text() == "mine"


def test_output_under_a_file_is_one_sentence(family, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = _one_error_line(invoke("merge", family["base_path"], family["paths"][0], "-o", tmp_path / "afile" / "o"))
    assert "afile" in out


def test_json_that_cannot_get_its_folder_fails_before_any_work(family, tmp_path):
    (tmp_path / "nope").write_text("a file where the report's folder would be")
    result = invoke("merge", family["base_path"], family["paths"][0], "-o", tmp_path / "m", "--json",
                    tmp_path / "nope" / "r.json")
    assert result.exit_code == 2 and not (tmp_path / "m").exists()


def test_yaml_types_and_weights(family, tmp_path):
    (tmp_path / "c.yaml").write_text(f"base: {family['base_path']}\ninputs: [{family['paths'][0]}]\nweight: 0.5\n")
    assert "'weight'" in _one_error_line(invoke("merge", "-c", tmp_path / "c.yaml", "-o", tmp_path / "m"))
    (tmp_path / "d.yaml").write_text(f"base: {family['base_path']}\ninputs: [{{path: {family['paths'][0]}, "
                                     "weight: 0.0}]\nmethod: task_arithmetic\nlam: 1.0\n")
    # inputs given on the command line take their own weights (1), not the YAML's
    ok = invoke("merge", "-c", tmp_path / "d.yaml", family["paths"][1], "-o", tmp_path / "m", "-q")
    assert ok.exit_code == 0, ok.output
    torch.testing.assert_close(load_file(tmp_path / "m" / "model.safetensors")["head.weight"],
                               family["fts"][1]["head.weight"])


def test_non_finite_weight_and_task_vector_base(family, tmp_path):
    assert "finite" in _one_error_line(invoke("merge", family["base_path"], family["paths"][0], "-o",
                                              tmp_path / "m", "--weight", "nan"))
    assert invoke("extract-tv", family["base_path"], family["paths"][0], "-o", tmp_path / "tv.safetensors",
                  "-q").exit_code == 0
    assert "not a model" in _one_error_line(invoke("merge", tmp_path / "tv.safetensors", family["paths"][0],
                                                   "-o", tmp_path / "m"))


def test_mistyped_local_path_is_not_sent_to_the_hub(family, tmp_path):
    out = _one_error_line(invoke("merge", family["base_path"], f"{family['dir']}/ft9.safetensors", "-o",
                                 tmp_path / "m"))
    assert "does not exist" in out


def test_pickle_base_held_in_memory_is_not_changed_by_a_merge(family, tmp_path):
    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.merge import merge_checkpoints

    torch.save(family["base"], tmp_path / "base.pt")
    base = open_checkpoint(tmp_path / "base.pt", allow_pickle=True)
    ft = open_checkpoint(family["paths"][0])
    merge_checkpoints(base, [ft], "task_arithmetic", {"lam": 0.5}, out=tmp_path / "a.safetensors")
    merge_checkpoints(base, [ft], "task_arithmetic", {"lam": 0.5}, out=tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(base.get("head.weight"), family["base"]["head.weight"])


def test_non_finite_merge_parameter_is_one_sentence(family, tmp_path):
    out = _one_error_line(invoke("merge", family["base_path"], *family["paths"], "-o", tmp_path / "m", "--lam", "nan"))
    assert "must be a finite number" in out and not (tmp_path / "m").exists()


def test_an_unforeseen_exception_is_one_line_and_exit_3(monkeypatch):
    """Exit 1 means `eval`'s gate was crossed; a crash must not read as that, nor print a traceback."""
    import typer

    from mergeguard.cli._errors import EXIT_INTERNAL, handle_errors

    def broken():
        raise RuntimeError("shapes cannot be multiplied")

    monkeypatch.delenv("MERGEGUARD_DEBUG", raising=False)
    with pytest.raises(typer.Exit) as stop:
        handle_errors(broken)()
    assert stop.value.exit_code == EXIT_INTERNAL == 3
    monkeypatch.setenv("MERGEGUARD_DEBUG", "1")  # the traceback, for a bug report
    with pytest.raises(RuntimeError):
        handle_errors(broken)()


def test_invalid_yaml_config_is_one_sentence(tmp_path):
    (tmp_path / "c.yaml").write_text("method: ties\n  lam: [0.3\n")
    out = _one_error_line(invoke("merge", "--config", tmp_path / "c.yaml"))
    assert "is not valid YAML (line 2, column 6)" in out and len(out.strip().splitlines()) == 1


def test_a_config_that_is_not_text_is_one_sentence(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xc2\x00\xff")
    out = _one_error_line(invoke("merge", "--config", tmp_path / "c.yaml"))
    assert "is not text" in out and len(out.strip().splitlines()) == 1


def _commands(cmd, path=()):
    """Every leaf command of the CLI, with its path."""
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, cmd


def test_help_texts_name_only_options_their_command_has():
    """A help text that names an option names one of its own command's (`inspect --overwrite` once spoke of
    an --out that inspect does not have); another command's flag is named with that command (`merge --subtract`)
    or in backticks. Flags show as flags: no `<bool>` after them."""
    import re

    from typer.main import get_command

    root = get_command(app)
    names = {p[-1] for p, _ in _commands(root)} | {"attack", "defend", "zoo"}
    for path, cmd in _commands(root):
        flags = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for text in [cmd.help or "", *(getattr(p, "help", "") or "" for p in cmd.params)]:
            text = re.sub(r"`[^`]*`", "", text)
            text = re.sub(rf"\b(?:{'|'.join(map(re.escape, names))}) --[a-z][a-z0-9-]*", "", text)
            unknown = set(re.findall(r"--[a-z][a-z0-9-]*", text)) - flags
            assert not unknown, (" ".join(path), unknown, text)
        shown = invoke(*path, "--help").output
        assert "<bool>" not in shown, " ".join(path)
