"""open_clip models on the Hub (`open_clip:hf-hub:org/repo`) resolve offline from a filled cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.slow  # each test starts a Python that imports open_clip and builds a CLIP

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


def _cached_repo(tmp_path, pickled: bool = False) -> tuple[open_clip.model.CLIP, dict]:
    """acme/tiny-clip in a Hub cache under tmp_path (its weights as safetensors, or only as a pickle), and
    the environment that reads it offline."""
    repo = tmp_path / "hub" / "models--acme--tiny-clip"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": CFG, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if pickled:
        torch.save(state, snap / "open_clip_pytorch_model.bin")
    else:
        save_file(state, snap / "open_clip_model.safetensors")
    return model, {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}


PICKLE_SCRIPT = """
import sys
from mergeguard.errors import MergeguardError
from mergeguard.models.encoder import load_encoder
try:
    load_encoder("open_clip:hf-hub:acme/tiny-clip")
    print("loaded without --allow-pickle")
except MergeguardError as exc:
    print(exc)
load_encoder("open_clip:hf-hub:acme/tiny-clip", allow_pickle=True)
print("loaded with it")
"""


def test_open_clip_weights_only_as_a_pickle_need_allow_pickle(tmp_path):
    """open_clip falls back to open_clip_pytorch_model.bin when a repo has no safetensors: a pickle, which
    mergeguard loads only when asked (open_clip then reads it weights_only)."""
    _, env = _cached_repo(tmp_path, pickled=True)
    done = subprocess.run([sys.executable, "-c", PICKLE_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    refused, loaded = done.stdout.strip().splitlines()
    assert "are a pickle, not safetensors; pass --allow-pickle" in refused and loaded == "loaded with it"


def test_open_clip_weights_neither_cached_nor_reachable_are_one_sentence(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    script = PICKLE_SCRIPT.split("load_encoder(\"open_clip:hf-hub:acme/tiny-clip\", allow_pickle=True)")[0]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ("open_clip's weights for hf-hub:acme/tiny-clip are not in the Hub cache and the "
                                   "Hub cannot be reached; fetch them once with a connection (HF_HOME names the "
                                   "cache).")


def test_open_clip_hub_model_from_cache_offline(tmp_path):
    model, env = _cached_repo(tmp_path)
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


def test_other_ways_to_a_pickle_or_to_random_weights_are_refused(tmp_path):
    """A review run reached a pickle through `local-dir:` and a weights file given as the tag, and got a
    randomly initialised encoder (chance accuracy, exit 0) from a spec without a tag."""
    import pytest

    from mergeguard.errors import MergeguardError
    from mergeguard.models.encoder import load_encoder, open_clip_weights

    model, _ = _cached_repo(tmp_path, pickled=True)
    folder = tmp_path / "hub" / "models--acme--tiny-clip" / "snapshots" / COMMIT  # config + .bin only
    with pytest.raises(MergeguardError, match="are a pickle, not safetensors; pass --allow-pickle"):
        load_encoder(f"open_clip:local-dir:{folder}")
    encoder = load_encoder(f"open_clip:local-dir:{folder}", allow_pickle=True)
    assert all(torch.equal(encoder.visual.state_dict()[k], v) for k, v in model.visual.state_dict().items())
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"")
    assert open_clip_weights("ViT-B/32", str(weights)) == "pickle"
    assert open_clip_weights("ViT-B-32", str(weights.with_suffix(".safetensors"))) == ""  # no such file, no tag
    for spec in ("open_clip:ViT-B-32", "open_clip:ViT-B-32@"):
        with pytest.raises(MergeguardError, match="names no pretrained weights; add a tag"):
            load_encoder(spec)
