"""IBVS: the defended model is exactly the merge minus λ (Vb − Vc) of the defender's own fine-tunes."""

from __future__ import annotations

from pathlib import Path

import torch

from mergeguard.attack import BadNets, Clean, TrainSettings, finetune
from mergeguard.data.folders import labeled_folder
from mergeguard.data.triggers import patch_trigger
from mergeguard.defend import defend_ibvs
from mergeguard.models.encoder import load_encoder
from mergeguard.models.heads import load_heads


def test_ibvs_subtracts_the_defenders_backdoor_direction(tiny_zoo):
    z = Path(tiny_zoo["root"])
    head = load_heads(z / "heads.safetensors")["colour"]
    base = load_encoder(str(z / "base"))
    merged = load_encoder(str(z / "finetuned" / "shape"))  # any model stands in for a merge here
    data = labeled_folder(z / "data/colour/train", head.classnames, base.image_size)
    cfg = TrainSettings(steps=4, lr=1e-3, batch_size=16, logit_scale=10, device="cpu")
    defended, report = defend_ibvs(merged, base, head, data, "colour", cfg, lam=2.0)
    # the reference: the same two fine-tunes, by hand
    clean, _, _ = finetune(base, head, data, "colour", cfg, Clean())
    trigger = patch_trigger(base.image_size, 0.01, target_class=0, target_task="colour", seed=99)
    backdoored, _, _ = finetune(base, head, data, "colour", cfg, BadNets(), trigger=trigger)
    m, d = merged.state_dict(), defended.state_dict()
    vb, vc = backdoored.state_dict(), clean.state_dict()
    for k in m:
        torch.testing.assert_close(d[k], m[k] - 2.0 * (vb[k] - vc[k]))
    assert report["vb_minus_vc_norm"] > 0
    assert report["runs"] == ["clean", "badnets"] and report["config"]["poison_fraction"] == 0.1  # one config


def test_ibvs_cli_keeps_the_merged_models_dtype_and_writes_its_card(tiny_zoo, tmp_path):
    """A float16 merge comes back float16 (computed in float32); OUT holds the model, arch.json, the
    report and a card naming both inputs; nothing of the staging folder is left."""
    import json

    from typer.testing import CliRunner

    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.checkpoint.writer import write_tensors
    from mergeguard.cli import app

    z = Path(tiny_zoo["root"])
    shape = open_checkpoint(z / "finetuned" / "shape" / "model.safetensors")
    half = tmp_path / "half.safetensors"
    half_tensors = {k: v.half() for k, v in shape.items()}
    write_tensors(half, half_tensors, shape.metadata)
    out = tmp_path / "ibvs"
    result = CliRunner().invoke(app, [
        "defend", "ibvs", "--merged", str(half), "--base", str(z / "base"),
        "--data", f"train={z / 'data/colour/train'}", "--heads", str(z / "heads.safetensors"), "--task", "colour",
        "-o", str(out), "--steps", "2", "--batch-size", "16", "--device", "cpu", "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "arch.json", "ibvs_tv.safetensors",
                                                     "model.safetensors", "report.json"]
    defended = open_checkpoint(out / "model.safetensors")
    assert {defended.info(k).dtype for k in defended.keys()} == {torch.float16}
    tv = open_checkpoint(out / "ibvs_tv.safetensors")
    assert tv.is_task_vector
    for k in tv.keys():  # merged + the vector = the defended model (up to float16 rounding)
        torch.testing.assert_close(half_tensors[k].float() + tv.get(k), defended.get(k).float(), rtol=0, atol=2e-3)
    assert json.loads(result.stdout)["vb_minus_vc_norm"] > 0
    card = (out / "README.md").read_text()
    assert f"| merged | `{half}` |" in card and f"| base | `{z / 'base'}` |" in card and "- lam: `2.0`" in card
