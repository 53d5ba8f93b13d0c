"""LFPM through the CLI on the tiny zoo: outputs, τa's relation to the models, and the report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset
from typer.testing import CliRunner

from mergeguard.checkpoint import open_checkpoint
from mergeguard.cli import app
from mergeguard.data import stack_images
from mergeguard.data.folders import unlabeled_folder
from mergeguard.defend import LFPMConfig, defend_lfpm
from mergeguard.errors import MergeguardError
from mergeguard.models.encoder import load_encoder
from mergeguard.progress import NullProgress


def test_defend_lfpm_writes_model_vector_and_report(tiny_zoo, tmp_path, shadow_subset):
    z = Path(tiny_zoo["root"])
    runner = CliRunner()
    merged = tmp_path / "merged"
    inputs = [str(z / "finetuned" / t) for t in tiny_zoo["tasks"]]
    assert runner.invoke(app, ["merge", str(z / "base"), *inputs, "-o", str(merged), "-q"]).exit_code == 0
    out = tmp_path / "defended"
    shadow = shadow_subset(1000)  # 13 steps of 64 once 125 are held out (the whole folder and warm-up: 80 s)
    result = runner.invoke(app, ["defend", "lfpm", "--merged", str(merged), "--base", str(z / "base"),
                                 "--shadow", str(shadow), "-o", str(out), "--epochs", "1", "--batch-size", "64",
                                 "--lr", "1e-3", "--mine-warmup", "3", "--device", "cpu", "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    n = len(list(shadow.glob("*.png")))
    assert report["held_out_images"] == min(512, n // 8) and report["steps"] == (n - n // 8) // 64
    assert 0 < report["drift"] < 1 and report["chosen"]["lr"] == {"value": 1e-3, "why": "set by the user"}
    assert report["lambda_eff_start"] is not None and report["lambda_eff_end"] is not None
    assert report["tau_norm"] > 0 and len(report["loss_per_epoch"]) == 1
    defended = open_checkpoint(out / "model.safetensors")
    tau = open_checkpoint(out / "anti_backdoor_tv.safetensors")
    m = open_checkpoint(merged)
    assert tau.is_task_vector and "mergeguard.arch" in defended.metadata
    for k in tau.keys():
        torch.testing.assert_close(m.get(k) + tau.get(k), defended.get(k), rtol=0, atol=1e-6)
    # everything was written under OUT/.partial and renamed into OUT at the end; nothing else is left
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "anti_backdoor_tv.safetensors", "arch.json", "model.safetensors", "prompts.safetensors",
         "report.json", *(f"prompt_{i}.png" for i in range(4))])
    assert json.loads((out / "arch.json").read_text()) == load_encoder(str(merged)).arch
    card = (out / "README.md").read_text()
    assert "## Results" in card and "λ_eff start → end" in card
    assert f"| merged | `{merged}` |" in card and f"| base | `{z / 'base'}` |" in card and "sha256" in card
    prompts = open_checkpoint(out / "prompts.safetensors")
    assert sorted(prompts.keys()) == sorted(f"{i}.{k}" for i in range(4) for k in ("mask", "pattern"))
    _prompt_png_shows_the_prompt_pasted(out / "prompt_2.png", prompts.get("2.mask"), prompts.get("2.pattern"),
                                        z / "shadow")
    assert "warning:" not in " ".join(result.output.split())  # the zoo's 2048 shadow images are enough


def _prompt_png_shows_the_prompt_pasted(png: Path, mask: torch.Tensor, pattern: torch.Tensor, shadow: Path) -> None:
    """The picture's tiles are mask, pattern, mask × pattern, then shadow images (the folder's first, in
    sorted order) with the prompt pasted, each pixel scaled up to a block: compared with the paste done here."""
    from PIL import Image

    from mergeguard.data.pictures import GAP, TILE

    picture = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"))).permute(2, 0, 1).float() / 255
    scale = TILE // mask.shape[-1]
    first = sorted(shadow.rglob("*.png"))[0]
    x = torch.from_numpy(np.asarray(Image.open(first).convert("RGB"))).permute(2, 0, 1).float() / 255
    expected = {0: mask.expand(3, -1, -1), 1: pattern, 2: mask * pattern, 3: (1 - mask) * x + mask * pattern}
    for tile, want in expected.items():
        left = GAP + tile * (TILE + GAP)
        got = picture[:, GAP:GAP + TILE:scale, left:left + TILE:scale]  # one pixel of each block
        torch.testing.assert_close(got, want.float(), rtol=0, atol=1 / 255 + 1e-6)


def test_defend_lfpm_warns_about_a_small_shadow_set(tiny_zoo, tmp_path, shadow_subset):
    z = Path(tiny_zoo["root"])
    shadow = shadow_subset(64)
    result = CliRunner().invoke(app, ["defend", "lfpm", "--merged", str(z / "finetuned" / "shape"), "--base",
                                      str(z / "base"), "--shadow", str(shadow), "-o", str(tmp_path / "out"),
                                      "--epochs", "1", "--batch-size", "64", "--prompts", "1", "--mine-warmup", "1",
                                      "--path-points", "1", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert "warning: only 64 shadow images" in " ".join(result.output.split())


class _Killed(Exception):
    pass


class _KillAt(NullProgress):
    """Interrupts the run after `n` steps of stage II, as Ctrl-C would."""

    def __init__(self, n: int):
        self.n, self.stage_name, self.done = n, "", 0

    def stage(self, description: str, total: int | None) -> None:
        self.stage_name = description

    def advance(self, steps: int = 1) -> None:
        if "stage II" in self.stage_name:
            self.done += steps
            if self.done > self.n:
                raise _Killed


def _encoders(z: Path):
    base = load_encoder(str(z / "base"))
    merged = load_encoder(str(z / "finetuned" / "shape"))
    return merged, base


def test_lfpm_resume_gives_the_same_vector(tiny_zoo, tmp_path):
    z = Path(tiny_zoo["root"])
    shadow = Subset(unlabeled_folder(z / "shadow", 32), range(512))
    cfg = LFPMConfig(epochs=1, batch_size=64, lr=1e-2, prompts=2, mine_warmup=3, device="cpu")
    _, tau_ref, ref_report = defend_lfpm(*_encoders(z), shadow, cfg)
    assert ref_report.resumed_at_step == 0
    ck = tmp_path / "lfpm.pt"
    with pytest.raises(_Killed):  # 8 steps, checkpoints every step: killed after step 5
        defend_lfpm(*_encoders(z), shadow, cfg, _KillAt(5), checkpoint=ck)
    assert ck.exists()
    # another run's settings or merged model cannot continue from that checkpoint
    with pytest.raises(MergeguardError, match=r"other settings or inputs \(lr\)"):
        defend_lfpm(*_encoders(z), shadow, replace(cfg, lr=5e-2), checkpoint=ck, resume=True)
    with pytest.raises(MergeguardError, match=r"\(merged_weights\)"):
        defend_lfpm(load_encoder(str(z / "finetuned" / "colour")), _encoders(z)[1], shadow, cfg, checkpoint=ck,
                    resume=True)
    _, tau, report = defend_lfpm(*_encoders(z), shadow, replace(cfg, device="auto"), checkpoint=ck, resume=True)
    for k in tau_ref:
        torch.testing.assert_close(tau[k], tau_ref[k], rtol=1e-5, atol=1e-6)
    assert report.resumed_at_step == 5 and report.mined_excess_start == ref_report.mined_excess_start
    # the finished state stays until the caller's outputs exist (the CLI removes it then): a run killed
    # while writing them resumes to the same result without training again
    assert ck.exists()
    # (8 steps in all: one more training step would raise _Killed)
    _, tau_again, again = defend_lfpm(*_encoders(z), shadow, cfg, _KillAt(8), checkpoint=ck, resume=True)
    assert again.resumed_at_step == again.steps
    for k in tau_ref:
        torch.testing.assert_close(tau_again[k], tau[k], rtol=0, atol=0)


def test_lfpm_fresh_prompts_replace_one_prompt_per_epoch_and_resume(tiny_zoo, tmp_path):
    """`fresh_prompt_every`: at every epoch boundary one prompt (in turn) is mined anew from a random start,
    and a run killed just after such a boundary resumes to the same τa."""
    z = Path(tiny_zoo["root"])
    shadow = Subset(unlabeled_folder(z / "shadow", 32), range(256))  # 4 steps per epoch
    cfg = LFPMConfig(epochs=3, batch_size=64, lr=1e-2, prompts=2, mine_warmup=3, fresh_prompt_every=1,
                     checkpoint_every=1, device="cpu")
    _, tau_ref, ref = defend_lfpm(*_encoders(z), shadow, cfg)
    assert ref.fresh_prompts == 2  # at steps 4 and 8
    _, tau_plain, plain = defend_lfpm(*_encoders(z), shadow, replace(cfg, fresh_prompt_every=0))
    assert plain.fresh_prompts == 0
    assert plain.mined_excess_start == ref.mined_excess_start  # stage I is the same
    assert not all(torch.equal(tau_ref[k], tau_plain[k]) for k in tau_ref)  # stage II is not
    ck = tmp_path / "lfpm.pt"
    with pytest.raises(_Killed):  # killed after step 5: one fresh prompt done, the next one ahead
        defend_lfpm(*_encoders(z), shadow, cfg, _KillAt(5), checkpoint=ck)
    _, tau, report = defend_lfpm(*_encoders(z), shadow, cfg, checkpoint=ck, resume=True)
    assert report.resumed_at_step == 5 and report.fresh_prompts == 2
    for k in tau_ref:
        torch.testing.assert_close(tau[k], tau_ref[k], rtol=1e-5, atol=1e-6)


def test_lfpm_leaves_theta0_itself_alone(tiny_zoo):
    """No merge, no excess reaction: the mined prompts find no excess (E||D||^2 at rounding level),
    and τa stays exactly 0 (without the idle gate, Adam turned the rounding-level gradients into
    lr-sized steps: ‖τa‖ 12.7 after 320 steps at lr 1e-2, CA −1.1 points)."""
    z = Path(tiny_zoo["root"])
    base = load_encoder(str(z / "base"))
    shadow = Subset(unlabeled_folder(z / "shadow", 32), range(640))  # 9 steps of 64 once 80 are held out
    cfg = LFPMConfig(epochs=1, batch_size=64, lr=1e-2, prompts=2, mine_warmup=3, device="cpu")
    _, tau, report = defend_lfpm(load_encoder(str(z / "base")), base, shadow, cfg)
    assert all(e < 1e-8 for e in report.mined_excess_start)  # rounding level: θ0 vs θm batch shapes
    assert report.idle_steps == report.steps and report.tau_norm == 0.0
    assert all(float(t.abs().max()) == 0.0 for t in tau.values())
    # the gate off: the same run moves τa (so the assertion above is the gate's doing)
    _, _, drifting = defend_lfpm(load_encoder(str(z / "base")), base, shadow, replace(cfg, idle_tolerance=0.0))
    assert drifting.tau_norm > 0 and drifting.idle_steps == 0


def _flat(tau: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tau[k].flatten() for k in sorted(tau)])


def test_lfpm_under_bf16_autocast_as_on_one_gpu(tiny_zoo, monkeypatch):
    """One GPU runs LFPM under bf16 autocast; CPU bf16 autocast runs the same code here. On θ0 τa must
    stay 0 (θm's clean features were computed in fp32 and compared with bf16 ones: a loss of ~2e-5,
    which the idle gate let through, and ‖τa‖ grew to 7.7 in 8 steps); on a merge, τa must point where
    the fp32 run's does."""
    import mergeguard.defend.lfpm.run as lfpm_module
    import mergeguard.trainer as trainer_module

    z = Path(tiny_zoo["root"])
    shadow = Subset(unlabeled_folder(z / "shadow", 32), range(512))
    # one path point: CPU bf16 matmuls are slow (4 points: 82 s, cos 0.982; 1 point: 40 s, cos 0.983)
    cfg = LFPMConfig(epochs=1, batch_size=64, lr=1e-2, prompts=2, mine_warmup=3, path_points=1, device="cpu")
    _, tau_fp32, _ = defend_lfpm(*_encoders(z), shadow, cfg)
    bf16 = lambda device: torch.bfloat16  # noqa: E731
    monkeypatch.setattr(trainer_module, "autocast_dtype", bf16)
    monkeypatch.setattr(lfpm_module, "autocast_dtype", bf16)
    with trainer_module.autocast(torch.device("cpu")):  # the patch took: this is bf16 now
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    _, tau_bf16, report = defend_lfpm(*_encoders(z), shadow, cfg)
    assert report.idle_steps == 0 and torch.isfinite(_flat(tau_bf16)).all()
    cos = torch.nn.functional.cosine_similarity(_flat(tau_bf16), _flat(tau_fp32), dim=0)
    assert float(cos) > 0.95  # measured 0.99 (and after 16 steps)
    base = load_encoder(str(z / "base"))
    # on the CPU θ0's bf16 features agree exactly once they are computed alike: τa stays 0 even with the
    # fp32 tolerance (so this checks the cached features' precision, not the bf16 tolerance, which is
    # for GPU kernels that round other batch shapes differently)
    monkeypatch.setattr(lfpm_module, "BF16_IDLE_TOLERANCE", 1e-9)
    _, tau0, idle = defend_lfpm(load_encoder(str(z / "base")), base, shadow, cfg)
    assert idle.idle_steps == idle.steps and float(_flat(tau0).abs().max()) == 0.0


@pytest.mark.parametrize("change, message", [
    ({"prompt": "sticker"}, "prompt must be one of mask, patch, tokens \\(got 'sticker'\\)"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"path_points": 0}, "path_points must be at least 1"),
    ({"prompts": 0}, "prompts must be at least 1"),
    ({"subspace_rank": -1}, "subspace_rank must be at least 0"),
    ({"subspace_rank": 65}, "subspace_rank 65 exceeds the feature dimension 64"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"beta": -1.0}, "beta must be 0 or more"),
    ({"patch_fraction": 2.0}, r"patch_fraction must be in \(0, 1\]"),
    ({"checkpoint_every": 0}, "checkpoint_every must be at least 1"),
    ({"fresh_prompt_every": -1}, "fresh_prompt_every must be at least 0"),
    ({"device": "gpu7"}, "unknown --device 'gpu7'"),
])
def test_lfpm_rejects_settings_it_cannot_run_with(tiny_zoo, change, message):
    z = Path(tiny_zoo["root"])
    with pytest.raises(MergeguardError, match=message):
        defend_lfpm(*_encoders(z), unlabeled_folder(z / "shadow", 32), replace(LFPMConfig(mine_warmup=0), **change))


def test_lfpm_and_ibvs_reject_a_base_of_another_architecture(tiny_zoo):
    from mergeguard.attack import TrainSettings
    from mergeguard.defend import defend_ibvs
    from mergeguard.models.encoder import ImageEncoder
    from mergeguard.models.heads import load_heads

    z = Path(tiny_zoo["root"])
    merged = load_encoder(str(z / "finetuned" / "shape"))
    arch = json.loads(json.dumps(merged.arch))
    arch["vision_cfg"]["layers"] += 1
    other = ImageEncoder(arch)
    with pytest.raises(MergeguardError, match="different architectures"):
        defend_lfpm(merged, other, unlabeled_folder(z / "shadow", 32), LFPMConfig(device="cpu"))
    head = load_heads(z / "heads.safetensors")["colour"]
    with pytest.raises(MergeguardError, match="different architectures"):
        defend_ibvs(merged, other, head, unlabeled_folder(z / "shadow", 32), "colour", TrainSettings(device="cpu"))


def test_lfpm_token_prompts(tiny_zoo, tmp_path, shadow_subset):
    """VPT prompts: tokens inserted after the class token; stage I finds an excess reaction on a
    fine-tuned model (not on θ0) and stage II moves τa."""
    z = Path(tiny_zoo["root"])
    out = tmp_path / "tok"
    shadow = shadow_subset(640)  # 9 steps of 64 once 80 are held out
    result = CliRunner().invoke(app, ["defend", "lfpm", "--merged", str(z / "finetuned" / "shape"), "--base",
                                      str(z / "base"), "--shadow", str(shadow), "-o", str(out), "--epochs", "1",
                                      "--batch-size", "64", "--lr", "1e-3", "--prompt", "tokens", "--prompt-tokens",
                                      "3", "--prompts", "2", "--mine-warmup", "5", "--device", "cpu", "--json", "-",
                                      "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tau_norm"] > 0 and all(e > 1e-4 for e in report["mined_excess_start"])
    assert report["prompt_area"] == [None, None]
    prompts = open_checkpoint(out / "prompts.safetensors")
    assert sorted(prompts.keys()) == ["0.tokens", "1.tokens"] and prompts.get("0.tokens").shape == (3, 64)
    # on θ0 the same prompts find nothing: the excess is relative to θ0's own reaction to the tokens
    base = load_encoder(str(z / "base"))
    cfg = LFPMConfig(epochs=1, batch_size=64, prompt="tokens", prompts=1, mine_warmup=3, device="cpu")
    _, _, on_theta0 = defend_lfpm(load_encoder(str(z / "base")), base, unlabeled_folder(shadow, 32), cfg)
    assert on_theta0.mined_excess_start[0] < 1e-8


def test_an_open_clip_base_is_loaded_through_open_clip_and_recorded_by_name(tiny_zoo, monkeypatch):
    """`--base open_clip:NAME@TAG` has no checkpoint file: it goes to load_encoder as is, and the outputs
    record its name (no digest); the dtype comes from the merged model's file."""
    import mergeguard.defend.outputs as outputs
    from mergeguard.defend import load_models

    z = Path(tiny_zoo["root"])
    real = outputs.load_encoder
    monkeypatch.setattr(outputs, "load_encoder",
                        lambda src, **kw: ("open_clip", src) if isinstance(src, str) else real(src, **kw))
    (merged, base), records, dtype = load_models(merged=str(z / "finetuned" / "shape"),
                                                 base="open_clip:ViT-B-32@openai")
    assert base == ("open_clip", "open_clip:ViT-B-32@openai") and merged.image_size == 32
    assert records[1] == {"role": "base", "spec": "open_clip:ViT-B-32@openai"} and "sha256" in records[0]
    assert dtype == torch.float32


def test_lfpm_step_size_follows_the_merge_scale(tiny_zoo):
    """Unset, the learning rate is the RMS of the merge's own task vector θm − θ0 (recomputed here from the
    safetensors files with numpy), so a model whose task vector is twice as large gets twice the step; a
    user's --lr is kept and said to be theirs."""
    from safetensors.numpy import load_file

    z = Path(tiny_zoo["root"])
    merged_file = next((z / "finetuned" / "shape").glob("*.safetensors"))
    base_file = next((z / "base").glob("*.safetensors"))
    m, b = load_file(str(merged_file)), load_file(str(base_file))
    diffs = [(m[k].astype(np.float64) - b[k].astype(np.float64)).ravel() for k in b if k in m]
    want = float(np.sqrt(np.concatenate(diffs).__pow__(2).mean()))
    shadow = Subset(unlabeled_folder(z / "shadow", 32), range(64))
    cfg = LFPMConfig(epochs=1, batch_size=64, prompts=1, mine_warmup=1, device="cpu")
    _, _, report = defend_lfpm(*_encoders(z), shadow, cfg)
    assert report.chosen["lr"]["value"] == pytest.approx(want, rel=1e-5)
    assert "θm − θ0" in report.chosen["lr"]["why"] and report.config["lr"] is None
    merged, base = _encoders(z)
    with torch.no_grad():  # θ0 + 2 (θm − θ0)
        for p, q in zip(merged.parameters(), base.parameters()):
            p.copy_(q + 2 * (p - q))
    _, _, doubled = defend_lfpm(merged, base, shadow, cfg)
    assert doubled.chosen["lr"]["value"] == pytest.approx(2 * want, rel=1e-4)
    _, _, own = defend_lfpm(*_encoders(z), shadow, replace(cfg, lr=3e-3))
    assert own.chosen["lr"] == {"value": 3e-3, "why": "set by the user"}


def test_lfpm_reports_the_clean_feature_drift_on_held_out_images(tiny_zoo):
    """The drift is E‖f_defended(x) − f_θm(x)‖² / E‖f_θm(x) − f_θ0(x)‖² over the last eighth of the shadow
    images (never trained on), recomputed here from the returned model; on θ0 itself there is no shift
    to compare with, and no drift is reported."""
    z = Path(tiny_zoo["root"])
    shadow = Subset(unlabeled_folder(z / "shadow", 32), range(256))
    cfg = LFPMConfig(epochs=2, batch_size=32, lr=1e-2, prompts=1, mine_warmup=2, device="cpu")
    merged, base = _encoders(z)
    defended, _, report = defend_lfpm(merged, base, shadow, cfg)
    assert report.held_out_images == 32 and report.steps == 2 * (224 // 32)
    held = stack_images(shadow)[224:]
    with torch.no_grad():
        fm, f0, fd = merged.eval()(held), base.eval()(held), defended.eval()(held)
    want = float((fd - fm).pow(2).sum(1).mean() / (fm - f0).pow(2).sum(1).mean())
    assert report.drift == pytest.approx(want, rel=1e-4) and report.drift > 0
    assert len(report.drift_per_epoch) == 1 and report.drift_per_epoch[0] > 0
    _, _, still = defend_lfpm(load_encoder(str(z / "base")), base, shadow, cfg)
    assert still.drift is None and still.tau_norm == 0.0


def test_lfpm_with_heads_starts_its_prompts_at_the_triggers_the_scan_recovers(tiny_zoo, tmp_path):
    """With heads, the merged model is scanned first; each mask prompt starts at one recovered trigger whose
    log area ratio reaches the scan's suspicious threshold, the most suspicious target first, and stays there
    (it is the scan's answer, not re-mined); the defended model is scanned after. Checked against a Scanner run
    on its own; with a threshold no target reaches, no prompt starts at the scan's triggers."""
    from mergeguard.defend import defend_lfpm_scanned
    from mergeguard.models.heads import load_heads
    from mergeguard.scan import ScanConfig, Scanner

    z = Path(tiny_zoo["root"])
    heads = load_heads(z / "heads.safetensors")
    shadow = Subset(unlabeled_folder(z / "shadow", 32), range(256))
    cfg = LFPMConfig(epochs=1, batch_size=32, prompts=2, mine_warmup=2, device="cpu")
    merged, base = _encoders(z)
    scan_cfg = ScanConfig(steps=5, batch_size=8, images=40, device="cpu", cache=False)
    ref = Scanner(base, stack_images(shadow), heads, scan_cfg).scan(_encoders(z)[0])
    ratios = sorted({r for r, _ in ref.suspects})
    # a threshold between the two largest ratios: the targets at the largest pass it, the others not
    scan_cfg = replace(scan_cfg, suspicious=(ratios[-1] + ratios[-2]) / 2, backdoored=max(ratios[-1], 1.0))
    defended, _, report = defend_lfpm_scanned(merged, base, shadow, replace(cfg, scan=scan_cfg), heads)
    want = [t for r, t in ref.suspects if r >= scan_cfg.suspicious][: cfg.prompts]
    assert 1 <= len(want) < len(ref.suspects)
    assert report.chosen["scan_prompts"]["value"] == [f"{t.target_task}:{t.target_class}" for t in want]
    for i, t in enumerate(want):
        torch.testing.assert_close(report.prompts[f"{i}.mask"], t.mask.clamp(1e-3, 1 - 1e-3), atol=1e-5, rtol=0)
        torch.testing.assert_close(report.prompts[f"{i}.pattern"], t.pattern.clamp(1e-3, 1 - 1e-3), atol=1e-5,
                                   rtol=0)
    assert report.scan["before"]["score"] == pytest.approx(ref.score)
    after = Scanner(base, stack_images(shadow), heads, scan_cfg).scan(defended)  # the model it returned
    assert report.scan["after"]["score"] == pytest.approx(after.score)
    assert report.scan["after"]["verdict"] == after.verdict
    assert report.tau_norm > 0
    # no target reaches the threshold: nothing to remove, the merge comes back unchanged (τa = 0, no training) ...
    high = replace(scan_cfg, suspicious=ratios[-1] + 1, backdoored=ratios[-1] + 1)
    merged = _encoders(z)[0]
    same, tau, none = defend_lfpm_scanned(merged, base, shadow, replace(cfg, scan=high), heads)
    assert none.steps == 0 and none.epochs_run == 0 and "nothing to remove" in none.stopped
    assert none.chosen["scan_prompts"]["value"] == [] and all(not t.any() for t in tau.values())
    for p, q in zip(same.parameters(), merged.parameters()):
        assert torch.equal(p.detach().cpu(), q.detach().cpu())
    # what `defend lfpm` writes of it: the merge, τa = 0, no prompts, the stop in the card's results
    from mergeguard.defend import write_lfpm_outputs
    from mergeguard.defend.outputs import lfpm_results

    write_lfpm_outputs(tmp_path, same, merged, none, {"defense": "lfpm"})
    assert all(not open_checkpoint(tmp_path / "anti_backdoor_tv.safetensors").get(k).any()
               for k in open_checkpoint(tmp_path / "anti_backdoor_tv.safetensors").keys())
    assert "nothing to remove" in lfpm_results(none.to_json())["stopped"]
    assert "nothing to remove" in (tmp_path / "README.md").read_text()
    # ... unless forced: then only the mined prompts
    _, _, forced = defend_lfpm_scanned(merged, base, shadow, replace(cfg, force=True, scan=high), heads)
    assert forced.chosen["scan_prompts"]["value"] == [] and len(forced.mined_excess_start) == cfg.prompts
    assert forced.epochs_run == 1 and forced.tau_norm > 0
    assert set(none.to_json()) == set(forced.to_json())  # the stopped run's report has every key a trained one has


def test_lfpm_restores_theta0s_features_along_the_top_triggers_direction(tiny_zoo):
    """`restore`: the direction is the mean excess reaction of the merge to the scan's top trigger over θ0's,
    normalised (checked against plain torch forwards); the clean features LFPM preserves keep θ0's component
    along it and the merge's everywhere else (closed form); it is used only when θ0's component sends fewer
    shadow images to the trigger's target class under its head than the merge's (counted here by hand)."""
    from mergeguard.data.triggers import Trigger
    from mergeguard.defend.lfpm.run import keep_base_along
    from mergeguard.defend.lfpm.scanned import restore_decision, trigger_direction
    from mergeguard.models.heads import load_heads

    z = Path(tiny_zoo["root"])
    merged, base = (m.eval() for m in _encoders(z))
    head = load_heads(z / "heads.safetensors")["shape"]
    images = stack_images(Subset(unlabeled_folder(z / "shadow", 32), range(96)))
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(1, 32, 32, generator=gen) > 0.8).float()
    with torch.no_grad():
        f_m, f_0 = merged(images), base(images)
    for target in range(len(head.classnames)):
        trigger = Trigger(torch.rand(3, 32, 32, generator=gen), mask, target, "shape", "blend")
        with torch.no_grad():
            got = trigger_direction(merged, base, images, trigger.apply)
            xp = trigger.apply(images)
            want = ((merged(xp) - merged(images)) - (base(xp) - base(images))).mean(0)
        torch.testing.assert_close(got, want / want.norm(), atol=1e-5, rtol=1e-4)
        kept = f_m - ((f_m - f_0) @ got)[:, None] * got  # the merge's features, θ0's along the direction
        torch.testing.assert_close(keep_base_along(f_m, f_0, got), kept, atol=1e-5, rtol=1e-5)
        fewer = int(((kept @ head.weight.T).argmax(1) == target).sum()) < int(
            ((f_m @ head.weight.T).argmax(1) == target).sum())
        direction, chosen = restore_decision(merged, base, images, trigger, head)
        assert (direction is not None) == fewer and (chosen["value"] == f"shape:{target}") == fewer
        if fewer:
            torch.testing.assert_close(direction, got)
    f, f0 = torch.randn(10, got.numel(), generator=gen), torch.randn(10, got.numel(), generator=gen)
    torch.testing.assert_close(keep_base_along(f, f0, got) @ got, f0 @ got, atol=1e-5, rtol=1e-5)
    shadow = Subset(unlabeled_folder(z / "shadow", 32), range(128))
    cfg = LFPMConfig(epochs=1, batch_size=32, prompts=1, mine_warmup=1, device="cpu")
    assert defend_lfpm(merged, base, shadow, cfg, restore=got)[2].restored_directions == 1
    assert defend_lfpm(merged, base, shadow, cfg)[2].restored_directions == 0
