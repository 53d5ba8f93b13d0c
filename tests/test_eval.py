"""eval: CA and ASR against a hand count, through the library and the CLI (exit codes 0 / 1 / 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from mergeguard.checkpoint import CheckpointWriter, PlannedTensor
from mergeguard.cli import app
from mergeguard.data.triggers import patch_trigger
from mergeguard.eval import evaluate
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head, save_heads

ARCH = {"family": "open_clip", "name": "t", "embed_dim": 16, "quick_gelu": False, "mean": [0.5] * 3,
        "std": [0.25] * 3, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                          "head_width": 16}}


@pytest.fixture
def setup():
    torch.manual_seed(0)
    encoder = ImageEncoder(ARCH).eval()
    heads = {"a": Head("a", torch.nn.functional.normalize(torch.randn(3, 16), dim=-1), ["x", "y", "z"], 50.0),
             "b": Head("b", torch.nn.functional.normalize(torch.randn(2, 16), dim=-1), ["p", "q"], 50.0)}
    # 8-bit images, so the PNG copies on disk are the same tensors
    data = {t: (torch.randint(0, 256, (12, 3, 16, 16)).float() / 255, torch.arange(12) % len(h.classnames))
            for t, h in heads.items()}
    return encoder, heads, data


def _hand_count(encoder, heads, data, trigger, target_task):
    out = {}
    with torch.no_grad():
        for t, (x, y) in data.items():
            pred = (encoder(x) @ heads[t].weight.T).argmax(1)
            ca = (pred == y).float().mean().item()
            asr = floor = None
            if trigger is not None and trigger.target_class < len(heads[t].classnames):
                keep = y != trigger.target_class
                pt = (encoder(trigger.apply(x)) @ heads[t].weight.T).argmax(1)
                asr = (pt[keep] == trigger.target_class).float().mean().item()
                floor = (pred[keep] == trigger.target_class).float().mean().item()
            out[t] = (ca, asr, floor)
    return out


def test_ca_and_asr_equal_a_hand_count(setup):
    encoder, heads, data = setup
    trigger = patch_trigger(16, 0.25, target_class=1, target_task="a", seed=2)
    with torch.no_grad():  # head "a" along directions the images differ in, so predictions vary;
        f = encoder(data["a"][0])  # head "b" along the trigger's feature shift, so it spills over
        w = torch.nn.functional.normalize(f[:3] - f.mean(0), dim=-1)
        fb = encoder(data["b"][0])
        shift = (encoder(trigger.apply(data["b"][0])) - fb).mean(0)
        wb = torch.nn.functional.normalize(torch.stack([fb.mean(0) - shift, fb.mean(0) + shift]), dim=-1)
    heads = {"a": Head("a", w, heads["a"].classnames, 50.0), "b": Head("b", wb, heads["b"].classnames, 50.0)}
    result = evaluate(encoder, heads, {t: TensorDataset(*d) for t, d in data.items()}, trigger=trigger,
                      batch_size=5, device="cpu")
    expected = _hand_count(encoder, heads, data, trigger, "a")
    for t, (ca, asr, floor) in expected.items():
        assert result["tasks"][t]["ca"] == pytest.approx(ca)
        assert result["tasks"][t]["asr"] == pytest.approx(asr)
        assert result["tasks"][t]["asr_no_trigger"] == pytest.approx(floor)
    assert result["asr_t"] == pytest.approx(expected["a"][1])
    assert result["asr_t_no_trigger"] == pytest.approx(expected["a"][2])
    assert 0 < expected["a"][2] < 1  # the count is not trivially 0 or 1 here
    assert result["asr_n"] == pytest.approx(expected["b"][1])
    assert result["asr_n_no_trigger"] == pytest.approx(expected["b"][2])
    assert expected["b"][1] != expected["b"][2]  # ASR(N) and its count without the trigger differ here
    assert result["ca_avg"] == pytest.approx((expected["a"][0] + expected["b"][0]) / 2)


def test_target_index_beyond_a_head_gives_no_asr(setup):
    encoder, heads, data = setup
    trigger = patch_trigger(16, 0.25, target_class=2, target_task="a")
    result = evaluate(encoder, heads, {t: TensorDataset(*d) for t, d in data.items()}, trigger=trigger,
                      device="cpu")
    assert result["tasks"]["b"]["asr"] is None and result["asr_n"] is None and result["asr_n_no_trigger"] is None


def _write_folder(root, x, y, classnames):
    for i in range(len(x)):
        folder = root / classnames[int(y[i])]
        folder.mkdir(parents=True, exist_ok=True)
        array = (x[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{i}.png")


def test_cli_eval_json_and_exit_codes(setup, tmp_path):
    encoder, heads, data = setup
    tensors = encoder.tower_state_dict()
    with CheckpointWriter(tmp_path / "m.safetensors", [PlannedTensor(k, v.dtype, tuple(v.shape))
                                                       for k, v in tensors.items()], encoder.metadata()) as w:
        for k, v in tensors.items():
            w.write(k, v)
        w.commit()
    save_heads(heads, tmp_path / "h.safetensors")
    trigger = patch_trigger(16, 0.25, target_class=1, target_task="a", seed=2)
    trigger.save(tmp_path / "t.safetensors")
    for t, (x, y) in data.items():
        _write_folder(tmp_path / "data" / t, x, y, heads[t].classnames)
    base = ["eval", str(tmp_path / "m.safetensors"), "--heads", str(tmp_path / "h.safetensors"),
            "--task", f"a={tmp_path / 'data' / 'a'}", "--task", f"b={tmp_path / 'data' / 'b'}",
            "--trigger", str(tmp_path / "t.safetensors"), "--device", "cpu", "-q"]
    runner = CliRunner()
    ok = runner.invoke(app, [*base, "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "r.json").read_text())
    expected = _hand_count(encoder, heads, data, trigger, "a")
    assert report["tasks"]["a"]["ca"] == pytest.approx(expected["a"][0])
    assert report["asr_t"] == pytest.approx(expected["a"][1])
    assert set(report) >= {"tasks", "ca_avg", "asr_t", "asr_n", "asr_n_no_trigger"}
    # the table's summary row: ASR(T) / ASR(N) with the trigger, then both counts without it; a target
    # index beyond head b's classes leaves ASR(N) as "-" in both cells
    wide = {"COLUMNS": "200"}
    shown = runner.invoke(app, base[:-1], env=wide)
    (summary,) = [line for line in shown.output.splitlines() if "average" in line]
    assert shown.exit_code == 0 and f"T {expected['a'][2]:.1%} / N {expected['b'][2]:.1%}" in summary
    patch_trigger(16, 0.25, target_class=2, target_task="a", seed=2).save(tmp_path / "t2.safetensors")
    beyond = runner.invoke(app, [*base[:-4], str(tmp_path / "t2.safetensors"), "--device", "cpu"], env=wide)
    (summary,) = [line for line in beyond.output.splitlines() if "average" in line]
    assert beyond.exit_code == 0 and summary.count("/ N -") == 2, beyond.output
    crossed = runner.invoke(app, [*base, "--max-asr", str(max(0.0, report["asr_t"] - 0.01))])
    assert crossed.exit_code == 1 and "threshold crossed" in crossed.output
    assert runner.invoke(app, [*base, "--max-asr", "1.0", "--min-ca", "0.0"]).exit_code == 0
    for flag, value in (("--min-ca", "1.01"), ("--max-asr", "nan"), ("--max-asr", "5")):  # not a fraction: bad input
        wrong = runner.invoke(app, [*base, flag, value])
        assert wrong.exit_code == 2 and "is a fraction between 0 and 1" in wrong.output
    bad = runner.invoke(app, [*base[:4], "--task", "c=/nonexistent", "-q"])
    assert bad.exit_code == 2 and "no head for task 'c'" in bad.output


def test_a_bad_image_read_by_a_worker_process_is_one_sentence(tiny_zoo, tmp_path):
    """A DataLoader worker re-raises the error wrapped in its own traceback text; the user sees the sentence."""
    import shutil

    z = Path(tiny_zoo["root"])
    for cls in ("red", "green"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for png in sorted((z / "data/colour/test" / cls).glob("*.png"))[:2]:
            shutil.copy(png, tmp_path / "data" / cls)
    (tmp_path / "data/red/broken.png").write_text("not an image")
    result = CliRunner().invoke(app, ["eval", str(z / "base"), "--heads", str(z / "heads.safetensors"),
                                      "--task", f"colour={tmp_path / 'data'}", "--workers", "1", "-q"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "cannot read the image" in result.output


def test_forgotten_task_next_to_the_controls_and_theta0(setup, tmp_path):
    """`eval --forgotten a --base θ0`: a's CA, the controls' average, and θ0's, against a hand count."""
    encoder, heads, data = setup
    torch.manual_seed(1)
    other = ImageEncoder(ARCH).eval()  # "θ0": another random encoder of the same architecture
    for name, enc in (("m", encoder), ("base", other)):
        tensors = enc.tower_state_dict()
        with CheckpointWriter(tmp_path / f"{name}.safetensors", [PlannedTensor(k, v.dtype, tuple(v.shape))
                                                                  for k, v in tensors.items()], enc.metadata()) as w:
            for k, v in tensors.items():
                w.write(k, v)
            w.commit()
    save_heads(heads, tmp_path / "h.safetensors")
    for t, (x, y) in data.items():
        _write_folder(tmp_path / "data" / t, x, y, heads[t].classnames)
    args = ["eval", str(tmp_path / "m.safetensors"), "--heads", str(tmp_path / "h.safetensors"),
            "--task", f"a={tmp_path / 'data' / 'a'}", "--task", f"b={tmp_path / 'data' / 'b'}",
            "--forgotten", "a", "--device", "cpu", "--json", "-", "-q"]
    result = CliRunner().invoke(app, [*args, "--base", str(tmp_path / "base.safetensors")])
    assert result.exit_code == 0, result.output
    f = json.loads(result.stdout)["forgetting"]
    mine, theirs = _hand_count(encoder, heads, data, None, None), _hand_count(other, heads, data, None, None)
    assert (f["task"], f["controls"]) == ("a", ["b"])
    assert f["ca"] == pytest.approx(mine["a"][0]) and f["control_ca"] == pytest.approx(mine["b"][0])
    assert f["base_ca"] == pytest.approx(theirs["a"][0]) and f["forgotten"] == pytest.approx(
        theirs["a"][0] - mine["a"][0])
    without_base = json.loads(CliRunner().invoke(app, args).stdout)["forgetting"]
    assert "base_ca" not in without_base and without_base["ca"] == f["ca"]
    common = args[:8]  # the model, heads and both tasks
    for extra, message in ((["--forgotten", "c"], "--forgotten c is not among the --task names"),
                           (["--base", str(tmp_path / "base.safetensors")], "--base goes with --forgotten")):
        wrong = CliRunner().invoke(app, [*common, *extra, "--device", "cpu", "-q"])
        assert wrong.exit_code == 2 and message in wrong.output, wrong.output


def test_the_release_gate_names_each_threshold_crossed_and_only_those():
    """`eval --max-asr / --min-ca`'s gate lives in the library (`crossed_thresholds`): ASR(T) and ASR(N) above
    --max-asr and the average CA below --min-ca each give one line; equal values pass; a missing ASR (no other
    task) is not judged."""
    from mergeguard.eval import crossed_thresholds

    result = {"asr_t": 0.30, "asr_n": 0.05, "ca_avg": 0.70}
    assert crossed_thresholds(result, None, None) == []
    assert crossed_thresholds(result, 0.30, 0.70) == []  # on the bar: passes
    assert crossed_thresholds(result, 0.05, None) == ["ASR(T) 30.0% > --max-asr 5.0%"]
    assert crossed_thresholds(result, 0.01, 0.75) == ["ASR(T) 30.0% > --max-asr 1.0%", "ASR(N) 5.0% > --max-asr 1.0%",
                                                      "average CA 70.0% < --min-ca 75.0%"]
    assert crossed_thresholds({**result, "asr_n": None}, 0.01, None) == ["ASR(T) 30.0% > --max-asr 1.0%"]
