"""An adversarial user of `defend`, `eval` and `zoo` (a review run): each bad input gets one sentence
before any work, and no option writes over an input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergeguard.cli import app
from mergeguard.data.triggers import Trigger, load_trigger
from mergeguard.errors import MergeguardError, reason
from mergeguard.models.heads import Head, load_heads, save_heads

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_sentence(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lfpm_args(z: Path, out: Path) -> list:
    return ["defend", "lfpm", "--merged", z / "finetuned" / "shape", "--base", z / "base", "--shadow", z / "shadow",
            "-o", out, "--epochs", "1", "--device", "cpu", "-q"]


def test_json_never_replaces_or_lands_in_an_input(tiny_zoo, family, tmp_path):
    z = Path(tiny_zoo["root"])
    model = z / "finetuned" / "shape" / "model.safetensors"
    heads = z / "heads.safetensors"
    before = {p: digest(p) for p in (model, heads)}
    cases = [
        ["eval", model.parent, "--heads", heads, "--task", f"shape={z / 'data/shape/test'}", "--json", model],
        ["eval", model.parent, "--heads", heads, "--task", f"shape={z / 'data/shape/test'}", "--json",
         z / "data/shape/test/report.json"],  # inside a NAME=FOLDER input
        [*lfpm_args(z, tmp_path / "d"), "--json", model],
        ["defend", "ibvs", "--merged", model.parent, "--base", z / "base", "--data", f"train={z / 'data/shape/train'}",
         "--heads", heads, "--task", "shape", "-o", tmp_path / "i", "--json", heads],
        ["merge", family["base_path"], *family["paths"], "-o", tmp_path / "m", "--json", family["paths"][0]],
    ]
    for args in cases:
        assert "choose another --json" in one_sentence(invoke(*args))
    assert {p: digest(p) for p in before} == before
    assert not (z / "data/shape/test/report.json").exists() and not (tmp_path / "d").exists()
    # inputs named only in a --config file are inputs too
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {family['base_path']}\ninputs: [{family['paths'][0]}, {family['paths'][1]}]\n")
    before_input = digest(family["paths"][1])
    out = one_sentence(invoke("merge", "--config", config, "-o", tmp_path / "m2", "--json", family["paths"][1]))
    assert "choose another --json" in out and digest(family["paths"][1]) == before_input


def test_json_never_lands_in_the_commands_own_output(tiny_zoo, family, tmp_path, monkeypatch):
    """The report would replace the defended model just written (OUT/model.safetensors), or be deleted by
    the next --overwrite of OUT."""
    z = Path(tiny_zoo["root"])
    monkeypatch.setenv("MERGEGUARD_CACHE", str(tmp_path / "cache"))  # the default zoo folder, here
    done = tmp_path / "done"
    done.mkdir()
    (done / "model.safetensors").write_bytes(b"the output of an earlier run")
    (tmp_path / "d").mkdir()  # empty OUTs (--json needs its folder to exist)
    (tmp_path / "demo").mkdir()
    cases = [
        [*lfpm_args(z, tmp_path / "d"), "--json", tmp_path / "d" / "model.safetensors"],
        [*lfpm_args(z, done), "--overwrite", "--json", done / "model.safetensors"],
        ["merge", family["base_path"], *family["paths"], "-o", tmp_path / "m.safetensors", "--json",
         tmp_path / "m.safetensors"],
        ["demo", "--size", "tiny", "--out", tmp_path / "demo", "--json", tmp_path / "demo" / "demo.json"],
    ]
    # an `out:` given in merge's --config, and zoo build's default folder (the cache's), count as well
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {family['base_path']}\ninputs: [{family['paths'][0]}]\n"
                      f"out: {tmp_path / 'cfg.safetensors'}\n")
    cases.append(["merge", "--config", config, "--json", tmp_path / "cfg.safetensors"])
    from mergeguard.models.zoo import default_zoo_dir

    zoo = default_zoo_dir("tiny", 0)
    zoo.mkdir(parents=True)
    cases.append(["zoo", "build", "--size", "tiny", "--json", zoo / "zoo.json"])
    for args in cases:
        assert "choose a --json outside it" in one_sentence(invoke(*args))
    assert not (tmp_path / "cfg.safetensors").exists() and not any(zoo.iterdir())
    assert not any((tmp_path / "d").iterdir()) and not any((tmp_path / "demo").iterdir())
    assert not (tmp_path / "m.safetensors").exists()
    assert (done / "model.safetensors").read_bytes() == b"the output of an earlier run"


def test_ibvs_refuses_heads_of_another_width_before_training(tiny_zoo, tmp_path):
    z = Path(tiny_zoo["root"])
    head = load_heads(z / "heads.safetensors")["shape"]
    narrow = tmp_path / "narrow.safetensors"
    save_heads({"shape": Head("shape", head.weight[:, :8].contiguous(), head.classnames, head.scale)}, narrow)
    args = ["--base", z / "base", "--data", f"train={z / 'data/shape/train'}", "--heads", narrow, "--task", "shape"]
    out = one_sentence(invoke("defend", "ibvs", "--merged", z / "finetuned" / "shape", *args, "-o", tmp_path / "i",
                              "--steps", "2", "--device", "cpu"))
    assert "reads 8-d features" in out and not (tmp_path / "i").exists()
    out = one_sentence(invoke("attack", "badnets", *args, "--target-class", "1", "-o", tmp_path / "a",
                              "--steps", "2", "--device", "cpu"))
    assert "reads 8-d features" in out and not (tmp_path / "a").exists()


@pytest.mark.parametrize("lam", ["-1", "0"])
def test_ibvs_lam_must_be_positive(tiny_zoo, tmp_path, lam):
    z = Path(tiny_zoo["root"])
    out = one_sentence(invoke("defend", "ibvs", "--merged", z / "finetuned" / "shape", "--base", z / "base",
                              "--data", f"train={z / 'data/shape/train'}", "--heads", z / "heads.safetensors",
                              "--task", "shape", "-o", tmp_path / "i", "--lam", lam, "--steps", "2"))
    assert "--lam must be a positive number" in out


def test_an_empty_data_folder_spec_is_named(tiny_zoo, tmp_path):
    z = Path(tiny_zoo["root"])
    out = one_sentence(invoke("defend", "ibvs", "--merged", z / "finetuned" / "shape", "--base", z / "base",
                              "--data", "train=", "--heads", z / "heads.safetensors", "--task", "shape",
                              "-o", tmp_path / "i"))
    assert "--data takes train=DIR" in out


@pytest.mark.parametrize("bad", ["nan_pattern", "inf_mask", "mask_above_one", "negative_pattern"])
def test_a_trigger_with_values_outside_0_1_is_refused(tmp_path, bad):
    """A NaN pattern pasted into images made every prediction NaN → argmax 0 → an ASR of 0: a poisoned
    model passed `eval --max-asr`."""
    pattern, mask = torch.rand(3, 8, 8), torch.zeros(1, 8, 8)
    mask[:, -2:, -2:] = 1
    {"nan_pattern": lambda: pattern.__setitem__((0, 0, 0), float("nan")),
     "inf_mask": lambda: mask.__setitem__((0, 0, 0), float("inf")),
     "mask_above_one": lambda: mask.mul_(5),
     "negative_pattern": lambda: pattern.sub_(2)}[bad]()
    path = Trigger(pattern, mask, 1, "shape").save(tmp_path / "t.safetensors")
    with pytest.raises(MergeguardError, match=r"must hold values in \[0, 1\]"):
        load_trigger(path)


def test_eval_flags_that_would_be_ignored_are_refused(tiny_zoo):
    z = Path(tiny_zoo["root"])
    base = ["eval", z / "base", "--heads", z / "heads.safetensors", "--task", f"shape={z / 'data/shape/test'}"]
    assert "--target-task needs --trigger" in one_sentence(invoke(*base, "--target-task", "shape"))
    out = one_sentence(invoke(*base, "--task", f"shape={z / 'data/colour/test'}"))
    assert "--task shape is given twice" in out


def test_an_unfinished_lfpm_run_is_named_and_resume_says_when_it_starts_over(tiny_zoo, tmp_path, monkeypatch):
    import mergeguard.defend as defend

    z = Path(tiny_zoo["root"])
    out = tmp_path / "d"

    def killed(*args, checkpoint, **kwargs):
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(defend, "defend_lfpm", killed)
    result = invoke(*lfpm_args(z, out))
    assert result.exit_code == 130 and "--resume continues" in result.output, result.output
    assert "pass --resume to finish it" in one_sentence(invoke(*lfpm_args(z, out)))

    def finished(*args, checkpoint, **kwargs):
        raise MergeguardError("stop here")

    monkeypatch.setattr(defend, "defend_lfpm", finished)
    result = invoke(*lfpm_args(z, tmp_path / "fresh"), "--resume")
    assert "nothing to resume" in result.output and "stop here" in result.output, result.output


def test_library_errors_reach_the_user_as_their_first_line(tmp_path):
    """torch appends paragraphs of advice ("Re-running torch.load with weights_only set to False will
    likely succeed") that must not reach the user; a truncated resume checkpoint says so."""
    from mergeguard.trainer import Checkpointing, TrainConfig, fit

    for text in ("Weights only load failed.\n\nRe-running `torch.load` with `weights_only` set to False ...",
                 "Weights only load failed. In PyTorch 2.6, we changed the default value ..."):
        assert reason(RuntimeError(text)) == "Weights only load failed"
    assert len(reason(ValueError("x" * 500))) == 160
    ck = tmp_path / "state.pt"
    ck.write_bytes(b"PK\x03\x04 truncated")
    a = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(MergeguardError) as info:
        fit([a], lambda step: a.sum(), TrainConfig(steps=2, lr=0.1, warmup=0),
            checkpointing=Checkpointing(ck, every=1, resume=True))
    assert "truncated or not a mergeguard checkpoint" in str(info.value) and "\n" not in str(info.value)


def test_only_what_a_command_reads_counts_as_an_input(tmp_path, monkeypatch):
    """A task's name or a device that happens to name a folder here is not an input: `--json shape/r.json`
    stays allowed for `attack --task shape`."""
    from mergeguard.cli._cli_utils import Input, Spec, read_paths

    monkeypatch.chdir(tmp_path)
    for name in ("shape", "auto", "train"):
        (tmp_path / name).mkdir()
    inputs = {"data": Spec(), "base": Input(), "heads": Input()}  # what `attack` marks; --task, --device unmarked
    assert read_paths(inputs, {"task": "shape", "device": "auto", "target_task": "shape",
                               "json_out": "shape/r.json"}) == []
    assert read_paths({"task": Spec(), **inputs}, {"task": ["shape=train"], "data": ["train=train"],
                                                   "base": "x" * 400}) == [Path("train")] * 2


def test_open_clip_errors_are_one_sentence_and_leave_logging_as_it_was():
    import logging

    import open_clip  # noqa: F401  (importing huggingface_hub sets its logger's level once: not ours to check)

    from mergeguard.models.encoder import create_open_clip

    hub_level = logging.getLogger("huggingface_hub").level
    logging.disable(logging.WARNING)
    try:
        with pytest.raises(MergeguardError, match="no pretrained weights 'nosuchtag' for ViT-B-32; it has: .*openai"):
            create_open_clip("ViT-B-32", "nosuchtag")
        assert logging.root.manager.disable == logging.WARNING
        assert not logging.root.filters and logging.getLogger("huggingface_hub").level == hub_level
    finally:
        logging.disable(logging.NOTSET)
    text = "Weights only load failed. Advice.\n\nWeightsUnpickler error: Unsupported global: GLOBAL os.system\n\nMore."
    assert reason(RuntimeError(text)) == "WeightsUnpickler error: Unsupported global: GLOBAL os.system"


def test_a_legacy_format_pickle_loads_when_allowed(tmp_path):
    """torch's pre-zip format cannot be memory-mapped; it is read whole (still weights_only)."""
    from mergeguard.checkpoint import open_checkpoint

    path = tmp_path / "old.pt"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(open_checkpoint(str(path), allow_pickle=True).get("w"), torch.arange(3.0))


def test_defend_attack_and_heads_take_allow_pickle(tiny_zoo, tmp_path):
    """Their messages said 'pass --allow-pickle' for a .bin input, an option only eval/merge had; defend also
    takes --arch, which a checkpoint without metadata needs."""
    from safetensors.torch import load_file

    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.models.arch import arch_json, arch_of

    z = Path(tiny_zoo["root"])
    pickled = tmp_path / "merged.bin"
    torch.save(load_file(z / "finetuned" / "shape" / "model.safetensors"), pickled)
    ibvs = ["defend", "ibvs", "--merged", pickled, "--base", z / "base", "--data", f"train={z / 'data/shape/train'}",
            "--heads", z / "heads.safetensors", "--task", "shape", "--steps", "1", "--batch-size", "8",
            "--device", "cpu", "-q"]
    assert "--allow-pickle" in one_sentence(invoke(*ibvs, "-o", tmp_path / "i"))
    assert not (tmp_path / "i").exists()
    # with it the pickle is read; a bare state dict says no architecture, which --arch gives
    assert "does not say which architecture" in one_sentence(invoke(*ibvs, "-o", tmp_path / "i", "--allow-pickle"))
    arch = tmp_path / "arch.json"
    arch.write_text(arch_json(arch_of(open_checkpoint(z / "base"))))
    done = invoke(*ibvs, "-o", tmp_path / "i", "--allow-pickle", "--arch", arch)
    assert done.exit_code == 0 and (tmp_path / "i" / "model.safetensors").exists(), done.output
    for command in (["attack", "badnets"], ["finetune"], ["defend", "lfpm"], ["heads"]):
        assert "--allow-pickle" in invoke(*command, "--help").output, command
    assert "--arch" in invoke("defend", "lfpm", "--help").output
    not_an_arch = tmp_path / "summary.json"
    not_an_arch.write_text('{"ca": 0.5}')
    assert "is not an architecture JSON" in one_sentence(invoke(*ibvs, "-o", tmp_path / "j", "--allow-pickle",
                                                                "--arch", not_an_arch))
