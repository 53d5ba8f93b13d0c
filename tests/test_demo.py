"""`mergeguard demo --size tiny` end to end: the backdoor works, LFPM removes it, the table says so."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from string import Template

import pytest
import torch
from typer.testing import CliRunner

from mergeguard.attack import BadMerging, TrainSettings
from mergeguard.checkpoint import open_checkpoint
from mergeguard.cli import app
from mergeguard.data.folders import labeled_folder
from mergeguard.defend import LFPMConfig
from mergeguard.models.encoder import load_encoder
from mergeguard.models.heads import load_heads
from mergeguard.scan import ScanConfig
from mergeguard.workflows.demo import SETTINGS, DemoSettings, is_demo_folder, run_demo


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


def test_demo_tiny_end_to_end(tiny_zoo, tmp_path):
    z = Path(tiny_zoo["root"])
    out, js = tmp_path / "demo", tmp_path / "demo.json"
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
    # the table and the rerun commands are printed
    assert "LFPM" in result.stdout and "IBVS" in result.stdout and "mergeguard defend lfpm" in result.stdout
    _printed_lines_rerun_the_demos_settings(r["commands"], r["variables"], s.on("cpu"))


def _printed_lines_rerun_the_demos_settings(commands: list[str], variables: dict[str, str], s) -> None:
    """The printed attack, LFPM and IBVS lines, run through the real CLI, reach the library with the very
    settings the demo ran with (stopped before any training: `test_demo_printed_commands_run_as_printed` runs
    them for real, with short settings)."""
    import mergeguard.cli.attack_cmd as attack_cmd
    import mergeguard.defend as defend

    seen: dict[str, tuple] = {}

    def capture(key):
        def stop(*args, **kwargs):
            seen[key] = args
            raise KeyboardInterrupt  # before any training or writing

        return stop

    # the printed defend lines read $D/by-hand/poisoned_merge, which the printed merge line writes: here, the
    # demo's own merge stands in for it
    hand = Path(variables["D"]) / "by-hand"
    hand.mkdir(exist_ok=True)
    (hand / "poisoned_merge").symlink_to(Path(variables["D"]).resolve() / "poisoned_merge")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attack_cmd, "_run", capture("attack"))
        mp.setattr(defend, "defend_lfpm", capture("lfpm"))
        mp.setattr(defend, "defend_lfpm_scanned", capture("lfpm"))  # the printed line passes --heads
        mp.setattr(defend, "defend_ibvs", capture("ibvs"))
        for line in commands:
            argv = shlex.split(Template(line).substitute(variables))[1:]
            if argv[0] in ("attack", "defend"):
                CliRunner().invoke(app, argv)
    # the command builds the attack's settings (its strategy's fields, `attack.settings`)
    assert seen["attack"][1].name == s.attack.name and asdict(seen["attack"][1]) == asdict(s.attack)
    assert seen["attack"][2] == s.train
    assert seen["lfpm"][3] == s.lfpm and seen["lfpm"][5] == s.scan  # `--heads`' scan: its settings too
    assert seen["ibvs"][5] == s.ibvs


def test_demo_printed_commands_run_as_printed(tiny_zoo, tmp_path):
    """What the demo prints under "redo any step by hand" runs in a shell exactly as printed, in order, after
    the demo (new folders under $D/by-hand, nothing refused), and redoes the demo: the same numbers. Short
    settings keep it quick; the printed lines carry whatever settings the demo ran with, the scan's too (a
    short scan, whose thresholds are lowered so that it still hands LFPM a trigger to start from)."""
    short = DemoSettings(attack=BadMerging(target_class=3, bd_weight=8.0, interpolation="weight", trigger_steps=3),
                         train=TrainSettings(steps=6, lr=5e-4, batch_size=16, logit_scale=10.0),
                         lfpm=LFPMConfig(epochs=1, batch_size=256, lr=1e-2, path_points=1, prompts=1,
                                         mine_warmup=5),
                         ibvs=TrainSettings(steps=4, lr=5e-4, batch_size=16, logit_scale=10.0),
                         scan=ScanConfig(steps=30, images=128, suspicious=0.1, backdoored=0.2))
    out = tmp_path / "demo dir"  # a space: the printed lines quote what a shell would split
    r = run_demo(out, size="tiny", zoo=tiny_zoo["root"], device="cpu", settings=short)
    defend_line = next(c for c in r["commands"] if c.startswith("mergeguard defend lfpm"))
    assert "--scan-steps 30 --scan-images 128 --scan-suspicious 0.1 --scan-backdoored 0.2" in defend_line
    assert [c.split()[1] for c in r["commands"]] == ["zoo", "attack", "merge", "merge", "merge", "eval", "eval",
                                                      "eval", "defend", "eval", "defend", "eval"]
    script = "\n".join([f'mergeguard() {{ {shlex.quote(sys.executable)} -m mergeguard "$@"; }}', "set -e",
                        *(f"{k}={shlex.quote(v)}" for k, v in r["variables"].items()), *r["commands"]])
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    hand = out / "by-hand"
    for name, row in {**r["rows"], **r["extra_rows"]}.items():
        redo = json.loads((hand / f"{name}.eval.json").read_text())
        assert (redo["ca_avg"], redo["asr_t"], redo["asr_n"]) == (row["ca_avg"], row["asr_t"], row["asr_n"]), name
    assert is_demo_folder(out)  # by-hand outputs included: the next demo may clear it
    from PIL import Image

    with Image.open(r["figure"]) as figure:  # the before/after picture beside the table
        assert figure.format == "PNG" and figure.size[0] >= 360
    pngs = sorted(p.name for p in (out / "lfpm").glob("*.png"))
    # the mined prompts and as many triggers recovered by the scan (`--heads`)
    assert pngs == [f"prompt_{i}.png" for i in range(2 * short.lfpm.prompts)]


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

    from mergeguard.errors import MergeguardError
    from mergeguard.workflows.demo import run_demo

    bad = replace(SETTINGS["tiny"], attack=replace(SETTINGS["tiny"].attack, interpolation="sideways"))
    with pytest.raises(MergeguardError, match="sideways"):
        run_demo(tmp_path / "demo", size="tiny", zoo=tiny_zoo["root"], device="cpu", settings=bad)
