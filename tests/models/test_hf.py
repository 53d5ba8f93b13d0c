"""Hugging Face CLIP checkpoints (CLIPVisionModelWithProjection, CLIPModel) run as open_clip towers.

The reference is transformers' own forward on the same random weights: equal embeddings prove the
renaming, the q/k/v fusion order, the projection transpose and the architecture read from config.json.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from mergeguard.models.arch import OPENAI_MEAN, OPENAI_STD, arch_from_hf_config  # noqa: E402
from mergeguard.models.encoder import ImageEncoder, load_encoder  # noqa: E402
from mergeguard.models.hf import hf_to_open_clip, is_hf_clip  # noqa: E402

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8, projection_dim=32, hidden_act="quick_gelu")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


@torch.no_grad()
def jitter(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Seeded noise on every parameter: biases (zero-initialised) and LayerNorm gains become informative."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def vision_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(**{**VISION, **overrides})
    return jitter(transformers.CLIPVisionModelWithProjection(cfg), seed).eval()


def clip_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=32)
    return jitter(transformers.CLIPModel(cfg), seed).eval()


def save_hf_folder(folder, model) -> None:
    folder.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))


@torch.no_grad()
def hf_vision_reference(model, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(model(pixel_values=normalised(x)).image_embeds, dim=-1)


@torch.no_grad()
def hf_clip_reference(model, x: torch.Tensor) -> torch.Tensor:
    pooled = model.vision_model(pixel_values=normalised(x)).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


# -- CLIPVisionModelWithProjection ----------------------------------------------------------
@torch.no_grad()
def test_vision_model_folder_matches_transformers(tmp_path):
    hf = vision_model(seed=0)
    save_hf_folder(tmp_path / "hf", hf)
    enc = load_encoder(str(tmp_path / "hf")).eval()  # arch from config.json
    assert enc.arch.get("hf") is True
    assert enc.arch["embed_dim"] == 32 and enc.arch["quick_gelu"] is True
    assert enc.arch["vision_cfg"]["width"] == 64 and enc.arch["vision_cfg"]["head_width"] == 32
    assert enc.arch["mean"] == OPENAI_MEAN and enc.arch["std"] == OPENAI_STD
    x = images()
    ours = enc(x)
    assert ours.shape == (3, 32)
    torch.testing.assert_close(ours, hf_vision_reference(hf, x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_vision_model_with_gelu_activation(tmp_path):
    """hidden_act='gelu' maps to open_clip's GELU (quick_gelu False); the embeddings still agree."""
    hf = vision_model(seed=1, hidden_act="gelu")
    save_hf_folder(tmp_path / "hf", hf)
    enc = load_encoder(str(tmp_path / "hf")).eval()
    assert enc.arch["quick_gelu"] is False
    x = images()
    torch.testing.assert_close(enc(x), hf_vision_reference(hf, x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_vision_model_safetensors_file_beside_config(tmp_path):
    """A .safetensors file path (not the folder) also finds the config.json next to it."""
    hf = vision_model(seed=2)
    save_hf_folder(tmp_path / "hf", hf)
    enc = load_encoder(str(tmp_path / "hf" / "model.safetensors")).eval()
    x = images()
    torch.testing.assert_close(enc(x), hf_vision_reference(hf, x), rtol=0, atol=1e-5)


# -- CLIPModel --------------------------------------------------------------------------------
@torch.no_grad()
def test_clip_model_folder_matches_transformers(tmp_path):
    hf = clip_model(seed=3)
    keys = set(hf.state_dict())
    assert any(k.startswith("text_model.") for k in keys) and "visual_projection.weight" in keys
    save_hf_folder(tmp_path / "clip", hf)
    enc = load_encoder(str(tmp_path / "clip")).eval()
    assert enc.arch["embed_dim"] == 32 and enc.arch["vision_cfg"]["layers"] == 2
    x = images()
    torch.testing.assert_close(enc(x), hf_clip_reference(hf, x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_clip_model_save_pretrained(tmp_path):
    """The layout `save_pretrained` writes (what the Hub's CLIP fine-tunes look like)."""
    hf = clip_model(seed=4)
    hf.save_pretrained(tmp_path / "pretrained")
    enc = load_encoder(str(tmp_path / "pretrained")).eval()
    x = images()
    torch.testing.assert_close(enc(x), hf_clip_reference(hf, x), rtol=0, atol=1e-5)


# -- the mapping itself ---------------------------------------------------------------------
def test_mapping_covers_exactly_the_open_clip_tower():
    hf = vision_model(seed=5)
    state = hf.state_dict()
    assert is_hf_clip(set(state)) and not is_hf_clip({"conv1.weight"})
    mapped = hf_to_open_clip(state)
    arch = arch_from_hf_config(hf.config.to_dict())
    expected = ImageEncoder(arch).visual.state_dict()
    assert set(mapped) == set(expected)
    for k, v in expected.items():
        assert tuple(mapped[k].shape) == tuple(v.shape), k
    # the projection is transposed (open_clip computes pooled @ proj; HF computes W @ pooled)
    assert torch.equal(mapped["proj"], state["visual_projection.weight"].T)


@torch.no_grad()
def test_qkv_fusion_order_is_what_the_equality_checks(tmp_path):
    """Sensitivity: fusing q/k/v in another order gives different embeddings, so the agreement with
    transformers above proves the fused order is open_clip's (q, k, v)."""
    hf = vision_model(seed=6)
    state = hf.state_dict()
    arch = arch_from_hf_config(hf.config.to_dict())
    x = images()
    reference = hf_vision_reference(hf, x)

    good = ImageEncoder(arch).eval()
    good.visual.load_state_dict(hf_to_open_clip(state), strict=True)
    torch.testing.assert_close(good(x), reference, rtol=0, atol=1e-5)

    swapped = dict(state)
    for i in range(2):
        for leaf in ("weight", "bias"):
            q = f"vision_model.encoder.layers.{i}.self_attn.q_proj.{leaf}"
            k = f"vision_model.encoder.layers.{i}.self_attn.k_proj.{leaf}"
            swapped[q], swapped[k] = state[k], state[q]
    bad = ImageEncoder(arch).eval()
    bad.visual.load_state_dict(hf_to_open_clip(swapped), strict=True)
    assert not torch.allclose(bad(x), reference, atol=1e-3)


def test_arch_from_clip_model_config():
    hf = clip_model(seed=7)
    arch = arch_from_hf_config(hf.config.to_dict())
    assert arch["embed_dim"] == 32
    assert arch["vision_cfg"] == {
        "image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0,
    }
    assert arch["quick_gelu"] is True
