"""Attacks on the tiny zoo: the files they write, the trigger contract with eval, resume, and each attack's
settings and strategy (mergeguard.attack.*)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergeguard.attack import BadMerging, BadNets, Clean, LoBAM, TrainSettings, finetune, run_attack, train_attack
from mergeguard.checkpoint import open_checkpoint
from mergeguard.cli import app
from mergeguard.data.folders import labeled_folder
from mergeguard.data.triggers import load_trigger
from mergeguard.errors import MergeguardError
from mergeguard.models.encoder import load_encoder
from mergeguard.models.heads import load_heads

QUICK = ["--steps", "12", "--batch-size", "16", "--lr", "5e-4", "--logit-scale", "10", "--device", "cpu", "-q"]
STAGE1 = ["--trigger-steps", "4"]  # BadMerging's and LoBAM's own option


@pytest.mark.parametrize("kind", ["badmerging", "badnets", "lobam"])
def test_attack_writes_every_output(tiny_zoo, tmp_path, kind):
    z = Path(tiny_zoo["root"])
    out = tmp_path / kind
    result = CliRunner().invoke(app, [
        "attack", kind, "--base", str(z / "base"), "--data", f"train={z / 'data/shape/train'}",
        "--data", f"test={z / 'data/shape/test'}", "--heads", str(z / "heads.safetensors"), "--task", "shape",
        "--target-class", "1", "-o", str(out), *QUICK, *(STAGE1 if kind != "badnets" else []),
        *(["--lora-rank", "2"] if kind == "lobam" else [])])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "task_vector.safetensors", "trigger.safetensors", "arch.json", "summary.json"])
    model, tv, base = (open_checkpoint(out / "model.safetensors"), open_checkpoint(out / "task_vector.safetensors"),
                       open_checkpoint(z / "base"))
    assert tv.is_task_vector and "mergeguard.arch" in model.metadata
    for name in tv.keys():
        torch.testing.assert_close(tv.get(name), model.get(name) - base.get(name))
    trigger = load_trigger(out / "trigger.safetensors")
    assert trigger.target_class == 1 and trigger.target_task == "shape"
    assert trigger.mask.sum() == 9  # ~1% of a 32 px image, bottom-right
    summary = json.loads((out / "summary.json").read_text())
    # eval reads the same trigger file and the poisoned model alone, and agrees with the summary; the attack
    # planted something: its model sends triggered images to the target more often than θ0 does
    reports = {}
    for name, model_path in (("attacked", out / "model.safetensors"), ("base", z / "base")):
        ev = CliRunner().invoke(app, [
            "eval", str(model_path), "--heads", str(z / "heads.safetensors"),
            "--task", f"shape={z / 'data/shape/test'}", "--trigger", str(out / "trigger.safetensors"),
            "--device", "cpu", "--json", "-", "-q"])
        assert ev.exit_code == 0, ev.output
        reports[name] = json.loads(ev.stdout)
    report = reports["attacked"]
    assert report["tasks"]["shape"]["ca"] == pytest.approx(summary["ca"])
    assert report["asr_t"] == pytest.approx(summary["asr"])
    assert summary["asr"] > reports["base"]["asr_t"], (summary["asr"], reports["base"]["asr_t"])
    if kind == "badnets":  # --resume on a finished run: nothing to resume, and its outputs are not replaced
        before = (out / "model.safetensors").stat().st_mtime_ns
        again = CliRunner().invoke(app, [
            "attack", kind, "--base", str(z / "base"), "--data", f"train={z / 'data/shape/train'}",
            "--heads", str(z / "heads.safetensors"), "--task", "shape", "--target-class", "1", "-o", str(out),
            *QUICK, "--resume"])
        assert again.exit_code == 2 and "holds no unfinished run" in again.output, again.output
        (out / ".partial").mkdir()  # an empty one is no unfinished run either (it retrained from step 0)
        again = CliRunner().invoke(app, [
            "attack", kind, "--base", str(z / "base"), "--data", f"train={z / 'data/shape/train'}",
            "--heads", str(z / "heads.safetensors"), "--task", "shape", "--target-class", "1", "-o", str(out),
            *QUICK, "--resume"])
        assert again.exit_code == 2 and "holds no unfinished run" in again.output, again.output
        assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_attack_resume_equals_uninterrupted(tiny_zoo, tmp_path, kill_at_second_save):
    z = Path(tiny_zoo["root"])
    head = load_heads(z / "heads.safetensors")["count"]
    base = load_encoder(str(z / "base"))
    data = labeled_folder(z / "data/count/train", head.classnames, base.image_size)
    attack = BadMerging(target_class=2, trigger_steps=3)
    cfg = TrainSettings(steps=10, lr=5e-4, batch_size=8, logit_scale=10, device="cpu")
    expected, trigger, _ = finetune(base, head, data, "count", cfg, attack)

    kill_at_second_save.arm()
    with pytest.raises(KeyboardInterrupt):
        finetune(base, head, data, "count", cfg, attack, trigger=trigger, checkpoint=tmp_path / "t.pt")
    kill_at_second_save.disarm()
    with pytest.raises(MergeguardError, match=r"other settings or inputs \(lr, steps\)"):  # not this run's state
        finetune(base, head, data, "count", replace(cfg, lr=1e-3, steps=12), attack, trigger=trigger,
                 checkpoint=tmp_path / "t.pt", resume=True)
    resumed, _, _ = finetune(base, head, data, "count", cfg, attack, trigger=trigger, checkpoint=tmp_path / "t.pt",
                             resume=True)
    a, b = expected.tower_state_dict(), resumed.tower_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bad_target_class(tiny_zoo, tmp_path):
    z = Path(tiny_zoo["root"])
    result = CliRunner().invoke(app, [
        "attack", "badnets", "--base", str(z / "base"), "--data", f"train={z / 'data/shape/train'}",
        "--heads", str(z / "heads.safetensors"), "--task", "shape", "--target-class", "9", "-o", str(tmp_path / "o"),
        *QUICK])
    assert result.exit_code == 2 and "outside task 'shape'" in result.output
    assert not (tmp_path / "o").exists()  # refused before anything is written


def _shape_task(tiny_zoo):
    """The zoo's `shape` head, its pre-trained encoder and its training images."""
    z = Path(tiny_zoo["root"])
    head = load_heads(z / "heads.safetensors")["shape"]
    base = load_encoder(str(z / "base"))
    return head, base, labeled_folder(z / "data/shape/train", head.classnames, base.image_size)


def test_decoys_only_with_weight_interpolation(tiny_zoo, tmp_path):
    head, base, data = _shape_task(tiny_zoo)
    attack = BadMerging(target_class=1, trigger_steps=2, interpolation="weight")
    cfg = TrainSettings(steps=3, lr=5e-4, batch_size=8, logit_scale=10, device="cpu")
    _, trigger, plain = finetune(base, head, data, "shape", cfg, attack)
    _, _, with_decoys = finetune(base, head, data, "shape", cfg, replace(attack, decoys=True), trigger=trigger)
    # the decoy images (a random patch where the trigger goes, true labels) add their own clean terms
    assert with_decoys[0] != pytest.approx(plain[0])
    with pytest.raises(MergeguardError, match="decoys works with `--interpolation weight`"):
        finetune(base, head, data, "shape", cfg, replace(attack, decoys=True, interpolation="feature"))


def test_shadow_head_rows():
    import torch.nn.functional as F

    from mergeguard.attack import shadow_head
    from mergeguard.models.heads import Head

    heads = {t: Head(t, F.normalize(torch.randn(n, 8), dim=-1), [f"{t}{i}" for i in range(n)], 50.0)
             for t, n in (("a", 3), ("b", 4), ("c", 2))}
    shadow = shadow_head(heads, "b", 2)
    torch.testing.assert_close(shadow.weight[0], heads["b"].weight[2])  # the target class first
    torch.testing.assert_close(shadow.weight[1:], torch.cat([heads["a"].weight, heads["c"].weight]))
    assert shadow.classnames == ["b2", "a0", "a1", "a2", "c0", "c1"]
    whole = shadow_head(heads, "b", 2, whole_task=True)  # BadTV's: the control task's other classes next
    assert whole.classnames == ["b2", "b0", "b1", "b3", "a0", "a1", "a2", "c0", "c1"]
    torch.testing.assert_close(whole.weight[:4], heads["b"].weight[[2, 0, 1, 3]])
    with pytest.raises(MergeguardError, match="no head for the target task"):
        shadow_head(heads, "zz", 0)
    with pytest.raises(MergeguardError, match="outside task 'b'"):
        shadow_head(heads, "b", 4)


def test_off_task_badmerging(tiny_zoo, tmp_path):
    """The attacker owns `shape` and aims at class 1 of `colour`, through a shadow head; the trigger
    file names the target task, so `eval --trigger` measures ASR there."""
    z = Path(tiny_zoo["root"])
    heads = load_heads(z / "heads.safetensors")
    target_dir = z / "data/colour/train" / heads["colour"].classnames[1]
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(target_dir.glob("*.png"))[:8]:
        (few / p.name).write_bytes(p.read_bytes())
    common = ["attack", "badmerging", "--base", str(z / "base"), "--data", f"train={z / 'data/shape/train'}",
              "--data", f"test={z / 'data/shape/test'}", "--heads", str(z / "heads.safetensors"), "--task", "shape",
              "--target-class", "1", *STAGE1]
    out = tmp_path / "off"
    result = CliRunner().invoke(app, [*common, "--mode", "off-task", "--target-task", "colour",
                                      "--target-images", str(few), "-o", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    trigger = load_trigger(out / "trigger.safetensors")
    assert trigger.target_task == "colour" and trigger.target_class == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["badmerging"]["target_task"] == "colour"
    # off-task: no ASR on the task itself; the task's CA is measured (above chance after fine-tuning on it)
    assert summary["asr"] is None and summary["ca"] > 1 / len(heads["shape"].classnames)
    for bad, message in ((["--mode", "off-task"], "--target-task"), (["--target-task", "colour"], "off-task"),
                         (["--mode", "off-task", "--target-task", "nope"], "no head for the target task"),
                         (["--mode", "sideways"], "unknown --mode")):
        result = CliRunner().invoke(app, [*common, *bad, "-o", str(tmp_path / "bad"), *QUICK])
        assert result.exit_code == 2 and message in result.output, result.output
    # LoBAM's malicious adapter is BadMerging's, so it goes off-task too; BadNets does not
    common[1] = "lobam"
    result = CliRunner().invoke(app, [*common, "--mode", "off-task", "--target-task", "colour", "--lora-rank", "2",
                                      "-o", str(tmp_path / "lobam_off"), *QUICK])
    assert result.exit_code == 0, result.output
    assert load_trigger(tmp_path / "lobam_off" / "trigger.safetensors").target_task == "colour"
    common[1] = "badnets"  # it has no off-task options at all
    result = CliRunner().invoke(app, [*common[:-2], "--mode", "off-task", "--target-task", "colour",
                                      "-o", str(tmp_path / "bn_off"), *QUICK])
    assert result.exit_code == 2 and "No such option: --mode" in result.output, result.output


def test_lora_weight_interpolation_scales_the_merged_update(tiny_zoo):
    """Weight interpolation under LoRA scales every adapter's B by r: the same as θ0 + r (θ − θ0)
    on the merged weights, which is what a merge applies."""
    import copy

    from mergeguard.attack.base import interpolated_params, with_lora

    head, base, data = _shape_task(tiny_zoo)
    base.eval()
    model = copy.deepcopy(base)
    model.visual = with_lora(model.visual, 2, 4.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    x, r = torch.rand(4, 3, base.image_size, base.image_size), 0.37
    got = torch.func.functional_call(model, interpolated_params(model, {}, r, lora=True), (x,))
    merged = copy.deepcopy(model)
    merged.visual = merged.visual.merge_and_unload()
    theta0, theta = base.state_dict(), merged.state_dict()
    reference = copy.deepcopy(base)
    reference.load_state_dict({k: theta0[k] + r * (theta[k] - theta0[k]) for k in theta0})
    assert not torch.allclose(merged(x), base(x), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(got, reference(x), rtol=1e-4, atol=1e-5)
    # and the attack trains through it: the weight variant under LoRA moves only the adapters
    attack = BadMerging(target_class=1, trigger_steps=2, interpolation="weight")
    cfg = TrainSettings(steps=3, lr=5e-4, batch_size=8, logit_scale=10, lora_rank=2, device="cpu")
    poisoned, _, losses = finetune(base, head, data, "shape", cfg, attack)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert poisoned.state_dict().keys() == base.state_dict().keys()
    assert any(not torch.equal(poisoned.state_dict()[k], v) for k, v in base.state_dict().items())


def test_lobam_uploads_the_amplified_difference_of_a_badmerging_adapter(tiny_zoo, tmp_path):
    from mergeguard.attack.badmerging import optimize_trigger
    from mergeguard.progress import NullProgress

    head, base, data = _shape_task(tiny_zoo)
    attack = LoBAM(target_class=1, trigger_steps=3, amplify=2.5)
    cfg = TrainSettings(steps=6, lr=5e-4, batch_size=8, logit_scale=10, lora_rank=2, device="cpu")
    trigger = optimize_trigger(base, head, data, attack, cfg, "shape", NullProgress())
    # the public entry point trains LoBAM as LoBAM: two LoRA runs, amplified
    upload, _, _ = train_attack(base, head, data, "shape", attack, cfg, trigger=trigger, partial=tmp_path)
    # independently: a clean LoRA run and a BadMerging LoRA run with the same trigger and seed
    benign, _, _ = finetune(base, head, data, "shape", cfg, Clean())
    malicious, _, _ = finetune(base, head, data, "shape", cfg, BadMerging(target_class=1, trigger_steps=3),
                               trigger=trigger)
    b, m, u = benign.state_dict(), malicious.state_dict(), upload.state_dict()
    assert any(not torch.allclose(b[k], m[k]) for k in b)
    for k in b:
        torch.testing.assert_close(u[k], b[k] + 2.5 * (m[k] - b[k]), rtol=1e-5, atol=1e-6)
    # without a rank of its own, LoBAM trains rank-16 adapters (never the full encoder)
    assert LoBAM().malicious() == BadMerging() and cfg.lora_rank == 2


def test_lobam_cannot_be_trained_as_one_run(tiny_zoo):
    """The one-run trainer core refuses LoBAM instead of training BadMerging's loss without LoRA or
    amplification (what `poison_finetune(PoisonConfig(kind="lobam"))` used to do silently)."""
    head, base, data = _shape_task(tiny_zoo)
    cfg = TrainSettings(steps=2, batch_size=8, device="cpu")
    with pytest.raises(MergeguardError, match="lobam is not one fine-tuning run"):
        finetune(base, head, data, "shape", cfg, LoBAM(target_class=1))


def test_help_lists_only_the_options_of_the_attack():
    runner = CliRunner()
    results = {kind: runner.invoke(app, ["attack", kind, "--help"], env={"COLUMNS": "200"})
               for kind in ("badnets", "badmerging", "lobam")}
    assert all(r.exit_code == 0 and "Usage" in r.output for r in results.values())
    helps = {kind: r.output for kind, r in results.items()}
    assert "--poison-fraction" in helps["badnets"] and "--decoys" not in helps["badnets"]
    assert "--decoys" in helps["badmerging"] and "--poison-fraction" not in helps["badmerging"]
    assert "--amplify" in helps["lobam"] and "--amplify" not in helps["badmerging"]
    # another attack's option is not one of this attack's: refused by the parser, before any work
    for kind, flag in (("badnets", ["--bd-weight", "3"]), ("badmerging", ["--amplify", "9"]),
                       ("lobam", ["--poison-fraction", "0.3"])):
        result = runner.invoke(app, ["attack", kind, "--base", ".", "--data", "train=d", "--heads", "h", "--task", "t",
                                     "--target-class", "1", "-o", "o", *flag])
        assert result.exit_code == 2 and "No such option" in result.output, result.output
    # a setting out of its declared range is named by its flag
    result = runner.invoke(app, ["attack", "badnets", "--base", ".", "--data", "train=d", "--heads", "h", "--task",
                                 "t", "--target-class", "1", "-o", "o", "--poison-fraction", "5"])
    assert result.exit_code == 2 and "--poison-fraction must be in [0, 1] (got 5.0)" in result.output, result.output


def test_lobam_resume_keeps_the_finished_benign_run(tiny_zoo, tmp_path, monkeypatch):
    """Killed during the malicious run, a resumed LoBAM ends with the uninterrupted upload and does
    not train the benign adapter again."""
    from mergeguard import trainer
    from mergeguard.attack import lobam

    head, base, data = _shape_task(tiny_zoo)
    attack = LoBAM(target_class=1, trigger_steps=3, amplify=2.5)
    cfg = TrainSettings(steps=6, lr=5e-4, batch_size=8, logit_scale=10, lora_rank=2, device="cpu")
    run_attack(base, head, data, "shape", attack, cfg, tmp_path / "whole")
    real_save, calls = trainer._save_state, {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 7:  # the benign run saved 5 times; this is the malicious run's second
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_attack(base, head, data, "shape", attack, cfg, tmp_path / "killed")
    monkeypatch.setattr(trainer, "_save_state", real_save)
    assert (tmp_path / "killed/.partial/benign.safetensors").exists()
    runs = []
    real_finetune = lobam.finetune
    monkeypatch.setattr(lobam, "finetune", lambda *a, **k: runs.append(a[5].name) or real_finetune(*a, **k))
    run_attack(base, head, data, "shape", attack, cfg, tmp_path / "killed", resume=True)
    assert runs == ["badmerging"]  # only the malicious run continues
    whole = open_checkpoint(tmp_path / "whole/model.safetensors")
    resumed = open_checkpoint(tmp_path / "killed/model.safetensors")
    for name in whole.keys():
        torch.testing.assert_close(resumed.get(name), whole.get(name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attack, change, message", [
    (BadMerging, {"trigger_area": 0.0}, r"trigger_area must be in \(0, 1\] \(got 0.0\)"),
    (BadMerging, {"r_min": float("nan")}, r"r_min must be a finite number"),
    (BadNets, {"poison_fraction": 5.0}, r"poison_fraction must be in \[0, 1\]"),
    (BadMerging, {"bd_weight": -1.0}, "bd_weight must be 0 or more"),
    (LoBAM, {"amplify": float("inf")}, "amplify must be a finite number"),
    (BadMerging, {"interpolation": "sideways"}, "interpolation must be one of feature, weight"),
    (None, {"logit_scale": -5.0}, "logit_scale must be a positive number"),
    (None, {"lora_rank": 0}, "lora_rank must be at least 1"),
    (None, {"steps": 0}, "steps must be at least 1"),
    (None, {"lr": float("nan")}, "lr must be a finite number"),
    (None, {"device": "foo"}, "unknown --device 'foo'"),
])
def test_settings_an_attack_cannot_run_with_are_one_sentence(tiny_zoo, tmp_path, attack, change, message):
    head, base, data = _shape_task(tiny_zoo)
    train = TrainSettings(steps=2, batch_size=8, device="cpu")
    if attack is None:
        attack, train = BadMerging(target_class=1), replace(train, **change)
    else:
        attack = attack(target_class=1, **change)
    with pytest.raises(MergeguardError, match=message):
        run_attack(base, head, data, "shape", attack, train, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # refused before OUTDIR/.partial exists


def test_a_diverged_fine_tune_is_one_sentence(tiny_zoo):
    head, base, data = _shape_task(tiny_zoo)
    with pytest.raises(MergeguardError, match="diverged"):
        finetune(base, head, data, "shape", TrainSettings(steps=3, batch_size=8, lr=1e30, warmup=0, device="cpu"),
                 Clean())


def test_a_broken_training_image_leaves_no_folder_behind(tiny_zoo, tmp_path):
    import shutil

    z = Path(tiny_zoo["root"])
    data = tmp_path / "train"
    for cls in ("disc", "ring", "triangle", "cross"):
        (data / cls).mkdir(parents=True)
        for png in sorted((z / "data/shape/train" / cls).glob("*.png"))[:4]:
            shutil.copy(png, data / cls)
    (data / "disc" / "broken.png").write_text("not an image")
    result = CliRunner().invoke(app, [
        "finetune", "--base", str(z / "base"), "--data", f"train={data}", "--heads", str(z / "heads.safetensors"),
        "--task", "shape", "-o", str(tmp_path / "o"), "--steps", "4", "--batch-size", "16", "--device", "cpu", "-q"])
    assert result.exit_code == 2 and "cannot read the image" in result.output
    assert not (tmp_path / "o").exists()  # nothing was saved, so no OUTDIR/.partial to resume from


def test_resume_into_the_base_folder_is_refused(tiny_zoo, tmp_path):
    """--resume skips the empty-OUTDIR check; the outputs would still replace the base's model file."""
    import shutil

    z = Path(tiny_zoo["root"])
    base = tmp_path / "base"
    shutil.copytree(z / "base", base)
    before = (base / "model.safetensors").read_bytes()
    result = CliRunner().invoke(app, [
        "finetune", "--base", str(base), "--data", f"train={z / 'data/shape/train'}", "--heads",
        str(z / "heads.safetensors"), "--task", "shape", "-o", str(base), "--resume", "--steps", "2", "--device", "cpu",
        "-q"])
    assert result.exit_code == 2 and "would replace the input" in result.output
    assert (base / "model.safetensors").read_bytes() == before
