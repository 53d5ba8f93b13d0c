"""The tiny zoo: a deterministic model family built on the CPU with no download; its sizes,
architecture, text embeddings and heads, and the folder a build leaves (`mergeguard.workflows.zoo`
builds it).

A small open_clip ViT is "pre-trained" on procedural images (every attribute, at a coarse
grain), heads are made from its class-mean embeddings (a stand-in for CLIP's text heads),
and each procedural task gets a clean fine-tune through the trainer core. Everything is
written as ordinary checkpoints, a heads file and ImageFolder data, so every command works
on it exactly as on real data:

    ZOO/base/                     pre-trained encoder (safetensors, architecture in its metadata)
    ZOO/finetuned/<task>/         clean fine-tune of each task (same form)
    ZOO/heads.safetensors         one head per task
    ZOO/data/<task>/{train,test}/<class>/*.png
    ZOO/shadow/                   unlabeled images from the pre-training distribution
    ZOO/zoo.json                  tasks, sizes, seed, acceptance numbers
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeguard.cache import cache_dir
from mergeguard.data import procedural
from mergeguard.models.heads import Head

# 2: four times the shadow images (LFPM's clean-feature preservation generalises; docs/lfpm-log.md)
# 3: the small zoo's pre-training separates its attacked class, yellow, from red (`own_group`), so ASR(T)
#    counts the trigger and not the merge's red/yellow boundary (docs/lfpm-log.md); tiny unchanged
ZOO_VERSION = 3
TASKS = list(procedural.ATTRIBUTES)


@dataclass(frozen=True)
class ZooSize:
    image_size: int
    patch_size: int
    width: int
    layers: int
    embed_dim: int
    pretrain_images: int
    pretrain_steps: int
    pretrain_lr: float
    fine_fraction: float
    finetune_steps: int
    finetune_lr: float
    batch_size: int
    train_per_task: int
    test_per_task: int
    shadow_images: int
    # (attribute, class) pairs pre-training sees at their own grain, not paired with a look-alike
    own_group: tuple[tuple[str, int], ...] = ()


SIZES: dict[str, ZooSize] = {
    "tiny": ZooSize(image_size=32, patch_size=8, width=64, layers=3, embed_dim=64,
                    pretrain_images=4096, pretrain_steps=500, pretrain_lr=2e-3, fine_fraction=0.0,
                    finetune_steps=250, finetune_lr=5e-4, batch_size=64,
                    train_per_task=1024, test_per_task=256, shadow_images=2048),
    "small": ZooSize(image_size=32, patch_size=8, width=96, layers=4, embed_dim=64,
                     pretrain_images=12288, pretrain_steps=1000, pretrain_lr=2e-3, fine_fraction=0.0,
                     finetune_steps=400, finetune_lr=5e-4, batch_size=64,
                     train_per_task=1536, test_per_task=512, shadow_images=4096, own_group=(("colour", 3),)),
}
LOGIT_SCALE = 100.0


def zoo_arch(size: ZooSize) -> dict[str, Any]:
    return {
        "family": "open_clip",
        "name": f"mergeguard-zoo-{size.width}x{size.layers}",
        "embed_dim": size.embed_dim,
        "vision_cfg": {"image_size": size.image_size, "patch_size": size.patch_size, "width": size.width,
                       "layers": size.layers, "head_width": 32, "mlp_ratio": 4.0},
        "quick_gelu": False,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }


def default_zoo_dir(size: str, seed: int) -> Path:
    return cache_dir() / "zoo" / f"{size}-seed{seed}-v{ZOO_VERSION}"


def text_embeddings(embed_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """The zoo's stand-in for CLIP's text tower: one fixed unit vector per class of every task,
    all mutually orthogonal (a random rotation of the first axes)."""
    n = sum(len(v) for v in procedural.ATTRIBUTES.values())
    gen = torch.Generator().manual_seed(seed + 7)
    basis, _ = torch.linalg.qr(torch.randn(embed_dim, n, generator=gen))
    out, start = {}, 0
    for task, classes in procedural.ATTRIBUTES.items():
        out[task] = basis[:, start:start + len(classes)].T.contiguous()
        start += len(classes)
    return out


def text_head(task: str, text: dict[str, torch.Tensor]) -> Head:
    """A task's zero-shot head: its classes' text embeddings."""
    return Head(task, text[task].clone(), list(procedural.ATTRIBUTES[task]), LOGIT_SCALE)


ZOO_ENTRIES = frozenset({"base", "data", "finetuned", "heads.safetensors", "shadow", "zoo.json"})


def folder_entries(root: Path) -> set[str]:
    """The names in `root` (none when it is no folder)."""
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def is_zoo(root: Path) -> bool:
    """A finished zoo: its zoo.json (a zoo's, not any JSON of that name) and every entry a build writes
    (a report or notes kept beside them do not stop it being used; they stop `--force` deleting it)."""
    try:
        info = json.loads((root / "zoo.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and {"version", "size", "seed"} <= info.keys() and ZOO_ENTRIES <= folder_entries(root)


def holds_something_else(root: Path) -> bool:
    """A non-empty folder that is not a finished zoo: never built into, never deleted."""
    return bool(folder_entries(root)) and not is_zoo(root)
