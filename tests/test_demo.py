"""`mergeguard demo --size tiny` end to end: the backdoor works, LFPM removes it, the table says so."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from string import Template

import pytest
import torch
from typer.testing import CliRunner

from mergeguard.checkpoint import open_checkpoint
from mergeguard.cli import app
from mergeguard.data.folders import labeled_folder
from mergeguard.models.encoder import load_encoder
from mergeguard.models.heads import load_heads
from mergeguard.workflows.demo import SETTINGS, is_demo_folder, run_demo


def _asr_by_hand(model_dir: Path, z: Path, trigger_file: Path, task: str, target: int) -> float:
    """ASR(T) in plain torch: paste the trigger, count non-target images of `task` sent to the target."""
    head = load_heads(z / "heads.safetensors")[task]
    data = labeled_folder(z / "data" / task / "test", head.classnames, 32)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    trig = open_checkpoint(trigger_file)
    mask, pattern = trig.get("mask").float(), trig.get("pattern").float()
    xt = x * (1 - mask) + pattern * mask
    with torch.no_grad():
        feats = torch.nn.functional.normalize(load_encoder(str(model_dir))(xt), dim=-1)
    pred = (feats @ torch.nn.functional.normalize(head.weight, dim=-1).T).argmax(1)
    keep = y != target
    return float((pred[keep] == target).float().mean())


def test_demo_tiny_end_to_end(tiny_zoo, tmp_path, monkeypatch):
    """The demo through the CLI: its numbers (checked by hand where they are headlines), and the commands it
    prints are the very command lines it ran, in order (with $Z and $D standing for its two folders)."""
    import mergeguard.cli._inprocess as inprocess

    ran: list[list[str]] = []
    real = inprocess.invoke
    monkeypatch.setattr(inprocess, "invoke", lambda root, argv, **kw: ran.append(list(argv)) or real(root, argv, **kw))
    z = Path(tiny_zoo["root"])
    out, js = tmp_path / "demo dir", tmp_path / "demo.json"  # a space: the printed lines quote it
    result = CliRunner().invoke(app, ["demo", "--size", "tiny", "--zoo", str(z), "--out", str(out),
                                      "--device", "cpu", "--json", str(js)])
    assert result.exit_code == 0, result.output
    r = json.loads(js.read_text())
    rows = r["rows"]
    assert set(rows) == {"clean_merge", "poisoned_merge", "lfpm", "ibvs"}
    clean, poisoned, lfpm = rows["clean_merge"], rows["poisoned_merge"], rows["lfpm"]
    assert clean["asr_t"] <= 0.20  # the control: the trigger alone is no backdoor
    assert poisoned["asr_t"] >= 0.90  # the backdoor survives the merge
    assert lfpm["asr_t"] <= 0.05  # and LFPM removes it
    assert lfpm["asr_n"] <= clean["asr_n"] + 0.02
    assert lfpm["ca_avg"] >= poisoned["ca_avg"] - 0.03
    # each row is what `eval --json` writes for that model, and the headline numbers match a hand count
    for name in rows:
        assert json.loads((out / f"{name}.eval.json").read_text()) == rows[name]
    trigger = out / "attack" / "trigger.safetensors"
    s = SETTINGS["tiny"]
    for name in ("poisoned_merge", "lfpm"):
        by_hand = _asr_by_hand(out / name, z, trigger, s.target_task, s.attack.target_class)
        assert abs(by_hand - rows[name]["asr_t"]) < 1e-6  # one image is 1/192
    # what is printed is what ran
    assert [c.split()[1] for c in r["commands"]] == ["zoo", "attack", "merge", "merge", "merge", "eval", "eval",
                                                      "eval", "defend", "eval", "defend", "eval"]
    printed = [shlex.split(Template(c).substitute(Z=str(z), D=str(out))) for c in r["commands"]]
    assert [p[0] for p in printed] == ["mergeguard"] * len(ran) and [p[1:] for p in printed] == ran
    assert r["variables"] == {"Z": str(z), "D": str(out / "by-hand")}  # a rerun by hand writes beside the demo
    assert "LFPM" in result.stdout and "IBVS" in result.stdout and "mergeguard defend lfpm" in result.stdout
    from PIL import Image

    with Image.open(r["figure"]) as figure:  # the before/after picture beside the table
        assert figure.format == "PNG" and figure.size[0] >= 360
    assert is_demo_folder(out)


def test_demo_refuses_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    result = CliRunner().invoke(app, ["demo", "--size", "tiny", "--out", str(out)])
    assert result.exit_code == 2 and "not empty" in result.output
    assert (out / "thesis.tex").exists()


def test_a_demo_report_beside_a_users_files_does_not_make_their_folder_the_demos(tmp_path):
    """`mergeguard demo --json demo.json` writes the marker's name into the current folder; a later
    `demo --out .` there must not clear the user's files (the marker alone used to be enough)."""
    from mergeguard.workflows.demo import is_demo_folder

    out = tmp_path / "project"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    (out / "demo.json").write_text('{"rows": {}}')
    result = CliRunner().invoke(app, ["demo", "--size", "tiny", "--out", str(out)])
    assert result.exit_code == 2 and "not empty" in result.output and (out / "thesis.tex").exists()
    # an earlier demo's own folder, finished or killed mid-merge, is the demo's to clear
    (out / "thesis.tex").unlink()
    for name in ("attack", "lfpm", ".poisoned_ties.tmp-123"):
        (out / name).mkdir()
    assert is_demo_folder(out)
    (out / "demo.json").write_text("not json")
    assert not is_demo_folder(out)


def test_demo_runs_the_settings_it_is_given(tiny_zoo, tmp_path):
    """`run_demo(settings=...)` (the defense table's `--set`) replaces the size's own: an attack setting
    the attack refuses stops the demo at the attack, so the given settings reached it."""
    from dataclasses import replace

    from mergeguard.cli import run_command
    from mergeguard.errors import MergeguardError

    bad = replace(SETTINGS["tiny"], attack=replace(SETTINGS["tiny"].attack, interpolation="sideways"))
    with pytest.raises(MergeguardError, match=r"--interpolation sideways .*` failed \(exit 2\)"):
        run_demo(tmp_path / "demo", run_command, size="tiny", zoo=tiny_zoo["root"], device="cpu", settings=bad)
