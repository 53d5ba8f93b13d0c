"""ImageEncoder: open_clip's own forward without prompts, LFPM prompt insertion, and loading checkpoints.

Every expected value is computed independently: by open_clip's VisionTransformer / CLIP forward, or
by a step-by-step plain-torch re-implementation of the vision tower.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mergeguard.checkpoint import CheckpointWriter, PlannedTensor
from mergeguard.errors import MergeguardError
from mergeguard.models.arch import OPENAI_MEAN, OPENAI_STD
from mergeguard.models.encoder import ImageEncoder, load_encoder

VISION_CFG = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
TEXT_CFG = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
EMBED_DIM = 32
# Not the OpenAI statistics, so a test notices if the encoder ignores the arch's mean/std.
MEAN = [0.3, 0.5, 0.7]
STD = [0.2, 0.25, 0.4]


def make_arch(quick_gelu: bool = True, **vision_overrides) -> dict:
    return {
        "family": "open_clip",
        "name": "tiny-test",
        "embed_dim": EMBED_DIM,
        "vision_cfg": {**VISION_CFG, **vision_overrides},
        "quick_gelu": quick_gelu,
        "mean": list(MEAN),
        "std": list(STD),
    }


@torch.no_grad()
def jitter(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter (LayerNorm gains and zero-initialised biases included) by seeded noise,
    so that no step of the forward is an identity by accident."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def make_encoder(seed: int = 0, **arch_kwargs) -> ImageEncoder:
    torch.manual_seed(seed)
    return jitter(ImageEncoder(make_arch(**arch_kwargs)), seed).eval()


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 32, 32, generator=g)


def normalised(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def write_checkpoint(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with CheckpointWriter(path, plan, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.commit()


# -- without prompts: exactly open_clip's forward ---------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [{}, {"pool_type": "avg"}, {"pool_type": "avg", "final_ln_after_pool": True}, {"no_ln_pre": True}],
    ids=["tok", "avg", "avg+final_ln_after_pool", "no_ln_pre"],
)
@torch.no_grad()
def test_forward_matches_open_clip(overrides):
    enc = make_encoder(**overrides)
    x = images()
    ours = enc(x)
    reference = F.normalize(enc.visual(normalised(x)), dim=-1)
    assert ours.shape == (3, EMBED_DIM)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))


@torch.no_grad()
def test_forward_uses_arch_mean_and_std():
    enc = make_encoder()
    x = images()
    # With OpenAI statistics the embedding is different: the arch's mean/std are what the module applies.
    other = F.normalize(enc.visual(normalised(x, OPENAI_MEAN, OPENAI_STD)), dim=-1)
    assert not torch.allclose(enc(x), other, atol=1e-3)


@torch.no_grad()
def test_pooling_variants_differ():
    """The parametrised comparison above is only meaningful if the variants compute different things."""
    x = images()
    tok = make_encoder(seed=0)(x)
    avg = make_encoder(seed=0, pool_type="avg")(x)
    # (with 'tok' pooling, ln_post before or after pooling is the same thing; with 'avg' it is not)
    avg_late_ln = make_encoder(seed=0, pool_type="avg", final_ln_after_pool=True)(x)
    base = make_encoder(seed=0)
    no_ln_pre_enc = ImageEncoder(make_arch(no_ln_pre=True)).eval()
    no_ln_pre_enc.visual.load_state_dict(
        {k: t for k, t in base.visual.state_dict().items() if not k.startswith("ln_pre.")}, strict=True)
    no_ln_pre = no_ln_pre_enc(x)
    assert not torch.allclose(tok, avg, atol=1e-3)
    assert not torch.allclose(avg, avg_late_ln, atol=1e-3)
    assert not torch.allclose(tok, no_ln_pre, atol=1e-3)


# -- with prompts: a hand computation on open_clip's submodules ---------------------------
def _attention(x: torch.Tensor, attn: torch.nn.MultiheadAttention) -> torch.Tensor:
    b, n, d = x.shape
    h = attn.num_heads
    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).split(d, dim=-1)
    q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, d)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def _block(x: torch.Tensor, blk) -> torch.Tensor:
    x = x + _attention(blk.ln_1(x), blk.attn)
    hidden = blk.mlp.c_fc(blk.ln_2(x))
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU: the arch sets quick_gelu
    return x + blk.mlp.c_proj(hidden)


def reference_with_prompts(enc: ImageEncoder, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    v = enc.visual
    z = v.conv1(normalised(x))  # (B, width, g, g)
    z = z.flatten(2).transpose(1, 2)  # (B, g*g, width)
    cls = v.class_embedding.view(1, 1, -1).expand(z.shape[0], 1, -1)
    z = torch.cat([cls, z], dim=1) + v.positional_embedding
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0).expand(z.shape[0], -1, -1)
    p = prompts.shape[1]
    z = torch.cat([z[:, :1], prompts, z[:, 1:]], dim=1)
    z = v.ln_pre(z)
    for blk in v.transformer.resblocks:
        z = _block(z, blk)
    z = torch.cat([z[:, :1], z[:, 1 + p:]], dim=1)
    pooled = v.ln_post(z[:, 0])
    return F.normalize(pooled @ v.proj, dim=-1)


def test_hand_reference_reproduces_open_clip_without_prompts():
    """The plain-torch reference agrees with open_clip when there are no prompts (P = 0)."""
    enc = make_encoder()
    x = images()
    with torch.no_grad():
        ref = reference_with_prompts(enc, x, torch.zeros(0, enc.width))
        torch.testing.assert_close(ref, F.normalize(enc.visual(normalised(x)), dim=-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("batched", [False, True], ids=["shared (P, width)", "per-image (B, P, width)"])
def test_forward_with_prompts_matches_hand_computation(batched):
    enc = make_encoder()
    x = images()
    g = torch.Generator().manual_seed(7)
    shape = (3, 4, enc.width) if batched else (4, enc.width)
    prompts = torch.randn(shape, generator=g).requires_grad_()

    ours = enc(x, prompts)
    with torch.no_grad():
        ref = reference_with_prompts(enc, x, prompts)
        plain = enc(x)
    assert ours.shape == (3, EMBED_DIM)
    torch.testing.assert_close(ours.detach(), ref, rtol=0, atol=1e-5)
    # prompts change every image's embedding
    assert not torch.allclose(ours.detach(), plain, atol=1e-3)
    for i in range(3):
        assert not torch.allclose(ours[i].detach(), plain[i], atol=1e-3)

    # gradients reach the prompts (and only through the forward, not the frozen tower)
    w = torch.randn(ours.shape, generator=g)
    (ours * w).sum().backward()
    assert prompts.grad is not None and prompts.grad.shape == prompts.shape
    assert torch.isfinite(prompts.grad).all() and prompts.grad.abs().sum() > 0
    if batched:
        for i in range(3):  # each image's prompts get their own gradient
            assert prompts.grad[i].abs().sum() > 0


def test_shared_prompts_equal_repeated_per_image_prompts():
    enc = make_encoder()
    x = images()
    prompts = torch.randn(2, enc.width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(enc(x, prompts), enc(x, prompts.expand(3, -1, -1)), rtol=0, atol=1e-6)


def test_forward_with_prompts_avg_pool_ignores_prompt_tokens():
    """With avg pooling the mean runs over the patch tokens only: the prompt outputs are dropped first."""
    enc = make_encoder(pool_type="avg")
    x = images()
    prompts = torch.randn(3, enc.width, generator=torch.Generator().manual_seed(5))
    v = enc.visual
    with torch.no_grad():
        z = v.conv1(normalised(x)).flatten(2).transpose(1, 2)
        z = torch.cat([v.class_embedding.view(1, 1, -1).expand(3, 1, -1), z], dim=1) + v.positional_embedding
        z = torch.cat([z[:, :1], prompts.expand(3, -1, -1), z[:, 1:]], dim=1)
        z = v.ln_post(v.transformer(v.ln_pre(z)))
        ref = F.normalize(z[:, 1 + 3:].mean(dim=1) @ v.proj, dim=-1)
        torch.testing.assert_close(enc(x, prompts), ref, rtol=0, atol=1e-5)


# -- loading ------------------------------------------------------------------------------
@torch.no_grad()
def test_round_trip_through_checkpoint_writer(tmp_path):
    enc = make_encoder(seed=3)
    path = write_checkpoint(tmp_path / "enc.safetensors", enc.tower_state_dict(), enc.metadata())
    loaded = load_encoder(str(path))  # no arch: it comes from the metadata
    assert loaded.arch == enc.arch
    assert set(loaded.visual.state_dict()) == set(enc.visual.state_dict())
    for k, t in enc.visual.state_dict().items():
        assert torch.equal(loaded.visual.state_dict()[k], t), k
    x = images()
    assert torch.equal(loaded.eval()(x), enc(x))
    prompts = torch.randn(2, enc.width, generator=torch.Generator().manual_seed(9))
    assert torch.equal(loaded.eval()(x, prompts), enc(x, prompts))


@torch.no_grad()
def test_round_trip_keeps_pooling_options(tmp_path):
    enc = make_encoder(seed=4, pool_type="avg")
    path = write_checkpoint(tmp_path / "avg.safetensors", enc.tower_state_dict(), enc.metadata())
    loaded = load_encoder(path).eval()
    assert loaded.visual.pool_type == "avg"
    x = images()
    assert torch.equal(loaded(x), enc(x))


def _tiny_clip(seed: int = 0, quick_gelu: bool = True):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return jitter(CLIP(EMBED_DIM, VISION_CFG, TEXT_CFG, quick_gelu=quick_gelu), seed).eval()


@pytest.mark.parametrize("quick_gelu", [True, False])
@torch.no_grad()
def test_full_open_clip_checkpoint_with_visual_prefix(tmp_path, quick_gelu):
    clip = _tiny_clip(seed=5, quick_gelu=quick_gelu)
    state = clip.state_dict()
    assert "visual.conv1.weight" in state and "token_embedding.weight" in state
    path = write_checkpoint(tmp_path / "clip.safetensors", state)
    arch = make_arch(quick_gelu=quick_gelu)
    enc = load_encoder(str(path), arch=arch).eval()
    x = images()
    expected = F.normalize(clip.encode_image(normalised(x)), dim=-1)
    torch.testing.assert_close(enc(x), expected, rtol=0, atol=1e-6)
    # the text tower is not loaded into the image encoder
    assert not any(k.startswith(("token_embedding", "text")) for k in enc.visual.state_dict())


@torch.no_grad()
def test_full_checkpoint_wrong_activation_changes_output(tmp_path):
    """Sensitivity check: loading with the other activation (quick_gelu flag) gives different embeddings,
    so the comparison above proves the flag is honoured."""
    clip = _tiny_clip(seed=5, quick_gelu=True)
    path = write_checkpoint(tmp_path / "clip.safetensors", clip.state_dict())
    enc = load_encoder(str(path), arch=make_arch(quick_gelu=False)).eval()
    x = images()
    assert not torch.allclose(enc(x), F.normalize(clip.encode_image(normalised(x)), dim=-1), atol=1e-4)


@torch.no_grad()
def test_arch_json_file_argument(tmp_path):
    enc = make_encoder(seed=6)
    path = write_checkpoint(tmp_path / "bare.safetensors", enc.tower_state_dict())  # no arch metadata
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(enc.arch))
    loaded = load_encoder(str(path), arch=str(arch_file)).eval()
    x = images()
    assert torch.equal(loaded(x), enc(x))


# -- bad inputs ---------------------------------------------------------------------------
def test_no_arch_metadata_and_no_arch(tmp_path):
    enc = make_encoder()
    path = tmp_path / "bare.safetensors"
    save_file(enc.tower_state_dict(), path)
    with pytest.raises(MergeguardError, match="does not say which architecture") as err:
        load_encoder(str(path))
    assert "--arch" in str(err.value) and "bare.safetensors" in str(err.value)


def test_wrong_arch_shape_mismatch_names_the_tensor(tmp_path):
    enc = make_encoder()
    path = write_checkpoint(tmp_path / "enc.safetensors", enc.tower_state_dict(), enc.metadata())
    wrong = {**enc.arch, "embed_dim": 16}  # only the projection differs: (64, 32) vs (64, 16)
    with pytest.raises(MergeguardError) as err:
        load_encoder(str(path), arch=wrong)
    msg = str(err.value)
    assert "'proj'" in msg and "[64, 32]" in msg and "[64, 16]" in msg and "--arch" in msg


def test_wrong_arch_patch_size_names_a_mismatching_tensor(tmp_path):
    enc = make_encoder()
    path = write_checkpoint(tmp_path / "enc.safetensors", enc.tower_state_dict(), enc.metadata())
    with pytest.raises(MergeguardError) as err:
        load_encoder(str(path), arch=make_arch(patch_size=16))
    msg = str(err.value)
    assert ("'positional_embedding'" in msg or "'conv1.weight'" in msg) and "--arch" in msg


def test_wrong_arch_missing_layer_names_the_tensor(tmp_path):
    enc = make_encoder()
    path = write_checkpoint(tmp_path / "enc.safetensors", enc.tower_state_dict(), enc.metadata())
    with pytest.raises(MergeguardError, match=r"lacks tensor 'transformer\.resblocks\.2\.") as err:
        load_encoder(str(path), arch=make_arch(layers=3))
    assert "--arch" in str(err.value)


def test_task_vector_is_refused(tmp_path):
    enc = make_encoder()
    meta = enc.metadata(kind="task_vector")
    path = write_checkpoint(tmp_path / "tv.safetensors", enc.tower_state_dict(), meta)
    with pytest.raises(MergeguardError, match="task vector"):
        load_encoder(str(path))


def test_not_a_clip_checkpoint(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"embed.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(MergeguardError, match="no patch embedding"):
        load_encoder(str(path), arch=make_arch())


def test_bad_vision_cfg_is_a_mergeguard_error():
    with pytest.raises(MergeguardError, match="vision_cfg"):
        ImageEncoder(make_arch(not_an_option=1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_one_sentence(tmp_path, bad):
    enc = make_encoder(seed=5)
    state = enc.tower_state_dict()
    name = sorted(state)[0]
    state[name] = state[name].clone().view(-1).index_fill(0, torch.tensor([0]), bad).view_as(state[name])
    path = write_checkpoint(tmp_path / "damaged.safetensors", state, enc.metadata())
    with pytest.raises(MergeguardError, match=f"tensor '{name}' of .* holds NaN or Inf"):
        load_encoder(str(path))
