"""open_clip models on the Hub (`open_clip:hf-hub:org/repo`) resolve offline from a filled cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import torch
from safetensors.torch import save_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}

SCRIPT = """
import json, sys, torch
from mergeguard.models.encoder import load_encoder
from mergeguard.models.heads import load_text_model, zero_shot_head
encoder = load_encoder("open_clip:hf-hub:acme/tiny-clip")
torch.save(encoder.visual.state_dict(), sys.argv[1])
model, tokenizer = load_text_model("open_clip:hf-hub:acme/tiny-clip", None)
head = zero_shot_head(model, tokenizer, "t", ["cat", "dog"], ["a photo of a {}."])
torch.save(head.weight, sys.argv[2])
"""


def test_open_clip_hub_model_from_cache_offline(tmp_path):
    repo = tmp_path / "hub" / "models--acme--tiny-clip"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": CFG, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snap / "open_clip_model.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "v.pt"), str(tmp_path / "h.pt")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    visual = torch.load(tmp_path / "v.pt", weights_only=True)
    assert all(torch.equal(visual[k], v) for k, v in model.visual.state_dict().items())
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    with torch.no_grad():
        rows = [torch.nn.functional.normalize(model.encode_text(tokenizer([f"a photo of a {c}."])), dim=-1)[0]
                for c in ("cat", "dog")]
    torch.testing.assert_close(torch.load(tmp_path / "h.pt", weights_only=True), torch.stack(rows))
