"""IBVS: the defended model is exactly the merge minus λ (Vb − Vc) of the defender's own fine-tunes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from mergeguard.attack import PoisonConfig, poison_finetune
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
    cfg = PoisonConfig(steps=4, lr=1e-3, batch_size=16, logit_scale=10, device="cpu")
    defended, report = defend_ibvs(merged, base, head, data, "colour", cfg, lam=2.0)
    # the reference: the same two fine-tunes, by hand
    clean, _, _ = poison_finetune(base, head, data, "colour", replace(cfg, kind="clean"))
    trigger = patch_trigger(base.image_size, cfg.trigger_area, target_class=0, target_task="colour", seed=99)
    backdoored, _, _ = poison_finetune(base, head, data, "colour", replace(cfg, kind="badnets"), trigger=trigger)
    m, d = merged.state_dict(), defended.state_dict()
    vb, vc = backdoored.state_dict(), clean.state_dict()
    for k in m:
        torch.testing.assert_close(d[k], m[k] - 2.0 * (vb[k] - vc[k]))
    assert report["vb_minus_vc_norm"] > 0
    assert report["runs"] == ["clean", "badnets"] and "kind" not in report["config"]  # two runs, one config
