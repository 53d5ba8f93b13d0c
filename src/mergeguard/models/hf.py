"""Hugging Face CLIP vision checkpoints (CLIPVisionModel, CLIPModel) mapped onto open_clip's names.

The public per-task CLIP fine-tunes on the Hub use this layout; mapping it lets mergeguard
evaluate and defend them with the same open_clip module.
"""

from __future__ import annotations

import re

import torch

HF_MARK = "vision_model.embeddings.patch_embedding.weight"
_SIMPLE = {
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}
_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_LAYER_KEY = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_clip(keys) -> bool:
    return HF_MARK in keys


def hf_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF CLIP vision state dict renamed (q/k/v fused, projection transposed) to open_clip's tower."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _SIMPLE:
            out[_SIMPLE[key]] = value
        elif key == "visual_projection.weight":
            out["proj"] = value.T.contiguous()
        elif m := _LAYER_KEY.match(key):
            layer, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, leaf), {})[module[-6]] = value
            elif module in _LAYER:
                out[f"transformer.resblocks.{layer}.{_LAYER[module]}.{leaf}"] = value
    for (layer, leaf), parts in qkv.items():
        name = "in_proj_weight" if leaf == "weight" else "in_proj_bias"
        out[f"transformer.resblocks.{layer}.attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
