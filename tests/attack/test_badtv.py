"""BadTV (attack/badtv.py): its two trigger files, its summary under both signs, a resumed run equal to an
uninterrupted one, the negation in plain torch, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergeguard.attack import BadTV, TrainSettings, run_attack
from mergeguard.attack.badtv import negate
from mergeguard.checkpoint import open_checkpoint
from mergeguard.cli import app
from mergeguard.data.folders import labeled_folder
from mergeguard.data.triggers import load_trigger
from mergeguard.models.encoder import load_encoder
from mergeguard.models.heads import load_heads

QUICK = ["--steps", "8", "--batch-size", "16", "--lr", "5e-4", "--logit-scale", "10", "--trigger-steps", "3",
         "--device", "cpu", "-q"]


def _args(z: Path, out: Path, *extra: str) -> list[str]:
    return ["attack", "badtv", "--base", str(z / "base"), "--data", f"train={z / 'data/shape/train'}",
            "--data", f"test={z / 'data/shape/test'}", "--heads", str(z / "heads.safetensors"), "--task", "shape",
            "--target-class", "3", "--negation-task", "colour", "--negation-class", "1", "-o", str(out), *QUICK,
            *extra]


def test_badtv_writes_two_triggers_and_both_signs(tiny_zoo, tmp_path):
    z = Path(tiny_zoo["root"])
    few = tmp_path / "few_colour"
    few.mkdir()
    for p in sorted((z / "data/colour/train").rglob("*.png"))[:8]:
        (few / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "badtv"
    result = CliRunner().invoke(app, _args(z, out, "--negation-images", str(few), "--json", "-"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "task_vector.safetensors", "trigger.safetensors", "trigger_negation.safetensors",
         "arch.json", "summary.json"])
    plus, minus = load_trigger(out / "trigger.safetensors"), load_trigger(out / "trigger_negation.safetensors")
    assert (plus.target_class, plus.target_task, minus.target_class, minus.target_task) == (3, "shape", 1, "colour")
    assert plus.mask[0, -1, -1] == 1 and minus.mask[0, 0, 0] == 1  # apart: bottom-right and top-left
    assert float((plus.mask * minus.mask).sum()) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(result.stdout)["negated"] == summary["negated"]
    neg = summary["negated"]
    assert neg["lambda"] == 0.5 and "shadow_asr" in neg  # neg["ca"] is checked against eval below
    # the negation's CA is what eval says of θ0 − 0.5 τ (the model built here from the task vector file)
    tv, base = open_checkpoint(out / "task_vector.safetensors"), open_checkpoint(z / "base")
    negated = {k: base.get(k) - 0.5 * tv.get(k) for k in tv.keys()}
    from safetensors.torch import save_file

    save_file(negated, tmp_path / "negated.safetensors", metadata=dict(base.metadata))
    ev = CliRunner().invoke(app, ["eval", str(tmp_path / "negated.safetensors"), "--heads",
                                  str(z / "heads.safetensors"), "--task", f"shape={z / 'data/shape/test'}",
                                  "--device", "cpu", "--json", "-", "-q"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["tasks"]["shape"]["ca"] == pytest.approx(neg["ca"], abs=1 / 256 + 1e-9)


def test_negate_is_theta0_minus_lambda_tau(tiny_zoo):
    z = Path(tiny_zoo["root"])
    base, model = load_encoder(str(z / "base")), load_encoder(str(z / "finetuned" / "shape"))
    out = negate(model, base, 0.5)
    b, m, n = base.tower_state_dict(), model.tower_state_dict(), out.tower_state_dict()
    for k in b:
        if b[k].is_floating_point():
            torch.testing.assert_close(n[k], b[k] - 0.5 * (m[k] - b[k]), rtol=0, atol=1e-6)


def test_badtv_resume_equals_uninterrupted(tiny_zoo, tmp_path, kill_at_second_save):
    """Both triggers are kept in OUT/.partial; a run killed after its first checkpoint ends where an
    uninterrupted one does."""
    z = Path(tiny_zoo["root"])
    heads = load_heads(z / "heads.safetensors")
    base = load_encoder(str(z / "base"))
    data = labeled_folder(z / "data/shape/train", heads["shape"].classnames, base.image_size)
    attack = BadTV(target_class=3, negation_task="colour", negation_class=1, trigger_steps=2)
    cfg = TrainSettings(steps=6, lr=5e-4, batch_size=8, logit_scale=10, device="cpu")
    shadow = attack.aim_head(heads, False)
    run_attack(base, heads["shape"], data, "shape", attack, cfg, tmp_path / "a", shadow=shadow)

    kill_at_second_save.arm()
    with pytest.raises(KeyboardInterrupt):
        run_attack(base, heads["shape"], data, "shape", attack, cfg, tmp_path / "b", shadow=shadow)
    assert (tmp_path / "b" / ".partial" / "trigger_negation.safetensors").exists()
    kill_at_second_save.disarm()
    run_attack(base, heads["shape"], data, "shape", attack, cfg, tmp_path / "b", shadow=shadow, resume=True)
    a, b = open_checkpoint(tmp_path / "a" / "model.safetensors"), open_checkpoint(tmp_path / "b" / "model.safetensors")
    for k in a.keys():
        torch.testing.assert_close(a.get(k), b.get(k), rtol=1e-5, atol=1e-6)
    for stem in ("trigger", "trigger_negation"):
        ta, tb = (load_trigger(tmp_path / run / f"{stem}.safetensors") for run in ("a", "b"))
        assert torch.equal(ta.pattern, tb.pattern) and torch.equal(ta.mask, tb.mask)


@pytest.mark.parametrize("change, message", [
    (["--negation-task", "nosuch"], "no head for the target task 'nosuch'"),
    (["--negation-class", "99"], "--negation-class 99 is outside task 'colour'"),
    (["--negation-task", "shape"], "--negation-task must be another task"),
    (["--target-class", "9"], "--target-class 9 is outside task 'shape'"),
])
def test_badtv_bad_inputs_are_one_sentence(tiny_zoo, tmp_path, change, message):
    z = Path(tiny_zoo["root"])
    args = _args(z, tmp_path / "out")
    for flag, value in zip(change[::2], change[1::2]):
        args[args.index(flag) + 1] = value
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


def test_trimmed_keeps_the_top_magnitudes_and_their_gradient():
    """The added point BadTV trains at (`density_min`): τ with its top-d magnitudes, as TIES's per-tensor trim
    keeps them; checked against a plain argsort."""
    from mergeguard.attack.badtv import trimmed

    delta = torch.randn(37, 11, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = trimmed(delta, 0.2)
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.detach().abs().flatten().argsort(descending=True)[: int(0.2 * delta.numel())]] = True
    keep = keep.view_as(delta)
    torch.testing.assert_close(out.detach(), delta.detach() * keep, rtol=0, atol=0)
    out.sum().backward()
    assert torch.equal(delta.grad, keep.float())  # the gradient reaches the kept entries only
    assert trimmed(delta, 1.0) is delta
