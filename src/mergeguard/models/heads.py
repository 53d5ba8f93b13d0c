"""Classification heads: one frozen matrix per task, logits = scale · W f(x).

Heads come from class names and templates through a CLIP text tower (zero-shot heads,
as CLIP builds them: the normalised mean of the normalised template embeddings), or
from a heads file (safetensors: one (classes × d) matrix per task; metadata: class
names and logit scale per task).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mergeguard.checkpoint import open_checkpoint, write_tensors
from mergeguard.errors import MergeguardError

HEADS_KIND = "heads"
DEFAULT_TEMPLATES = ["a photo of a {}."]


@dataclass
class Head:
    task: str
    weight: torch.Tensor  # (classes, d), rows L2-normalised
    classnames: list[str]
    scale: float = 100.0

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * features @ self.weight.to(features.device, features.dtype).T


def builtin_tasks() -> dict[str, dict[str, list[str]]]:
    """Class names and templates shipped for the standard tasks (cifar100, cars, sun397, ...)."""
    text = resources.files("mergeguard.data").joinpath("classnames.json").read_text()
    return json.loads(text)["tasks"]


def resolve_classnames(spec: str) -> tuple[list[str], list[str]]:
    """NAME (a shipped task), a folder (its class folders), or a text file (one class per line)
    → (class names, templates)."""
    builtin = builtin_tasks()
    if spec in builtin:
        return list(builtin[spec]["classnames"]), list(builtin[spec]["templates"])
    path = Path(spec)
    if path.is_dir():
        names = sorted(p.name.replace("_", " ") for p in path.iterdir() if p.is_dir())
        if not names:
            raise MergeguardError(f"{spec} has no class folders to take class names from.")
        return names, DEFAULT_TEMPLATES
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise MergeguardError(f"{spec} lists no class names.")
        return names, DEFAULT_TEMPLATES
    raise MergeguardError(
        f"{spec!r} is neither a known task ({', '.join(sorted(builtin))}), a folder of class folders, "
        "nor a text file of class names."
    )


def save_heads(heads: dict[str, Head], path: str | Path, *, overwrite: bool = False,
               extra_metadata: dict[str, str] | None = None) -> Path:
    meta = {
        "mergeguard.kind": HEADS_KIND,
        "classnames": json.dumps({t: h.classnames for t, h in heads.items()}),
        "logit_scale": json.dumps({t: h.scale for t, h in heads.items()}),
        **(extra_metadata or {}),
    }
    tensors = {t: F.normalize(h.weight.detach().float(), dim=-1) for t, h in heads.items()}
    return write_tensors(path, tensors, meta, overwrite=overwrite)


def load_heads(path: str | Path) -> dict[str, Head]:
    ckpt = open_checkpoint(path)
    try:
        classnames = json.loads(ckpt.metadata["classnames"])
        scales = json.loads(ckpt.metadata.get("logit_scale", "{}"))
    except (KeyError, ValueError) as exc:
        raise MergeguardError(f"{path} is not a heads file (its metadata lacks class names).") from exc
    heads = {}
    for task in ckpt.keys():
        weight = ckpt.get(task).float()
        names = classnames.get(task) or [str(i) for i in range(weight.shape[0])]
        if len(names) != weight.shape[0]:
            raise MergeguardError(f"{path}: head {task!r} has {weight.shape[0]} rows but {len(names)} class names.")
        if not bool(torch.isfinite(weight).all()):
            raise MergeguardError(f"{path}: head {task!r} holds NaN or Inf values; the heads file is damaged.")
        try:
            scale = float(scales.get(task, 100.0))
        except (TypeError, ValueError) as exc:
            raise MergeguardError(f"{path}: head {task!r} has a logit scale that is not a number.") from exc
        if not math.isfinite(scale) or scale <= 0:
            raise MergeguardError(f"{path}: head {task!r} has logit scale {scale}; it must be a positive number.")
        heads[task] = Head(task, weight, names, scale)
    return heads


def head_for(heads: dict[str, Head], task: str, source: str | Path) -> Head:
    """The head of `task`, or one sentence naming the heads file and what it has."""
    if task not in heads:
        raise MergeguardError(f"the heads file {source} has no head for task {task!r} (it has {', '.join(heads)}).")
    return heads[task]


def check_fits(head: Head, task: str, encoder) -> None:
    """One sentence when the head reads features of another width than the encoder gives."""
    dim = encoder.arch["embed_dim"]
    if head.weight.shape[1] != dim:
        raise MergeguardError(f"the head of {task!r} reads {head.weight.shape[1]}-d features but the model "
                              f"gives {dim}-d ones; use the heads built for this model.")


# -- zero-shot heads through a CLIP text tower ----------------------------------------
def load_text_model(source: str, arch: dict[str, Any] | None, allow_pickle: bool = False) -> tuple[Any, Any]:
    """(open_clip CLIP model with its text tower, tokenizer) from `open_clip:NAME@TAG` or a full
    open_clip checkpoint (text tower included) plus its architecture."""
    import open_clip

    if source.startswith("open_clip:"):
        name, _, tag = source.removeprefix("open_clip:").partition("@")
        from mergeguard.models.encoder import create_open_clip

        return create_open_clip(name, tag, allow_pickle).eval(), open_clip.get_tokenizer(name)
    from mergeguard.models.arch import arch_of

    ckpt = open_checkpoint(source, allow_pickle=allow_pickle)
    arch = arch_of(ckpt, arch)
    if "token_embedding.weight" not in ckpt or not arch.get("text_cfg"):
        raise MergeguardError(
            f"{source} has no CLIP text tower (token_embedding.weight); zero-shot heads need the full open_clip "
            "model, e.g. open_clip:ViT-B-32@openai."
        )
    model = open_clip.model.CLIP(arch["embed_dim"], arch["vision_cfg"], arch["text_cfg"],
                                 quick_gelu=bool(arch.get("quick_gelu", False)))
    state = {k: ckpt.get(k).float() for k in ckpt.keys()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    text_missing = [k for k in missing if not k.startswith("visual.")]
    if text_missing:
        raise MergeguardError(f"{source} lacks text-tower tensor {text_missing[0]!r}.")
    context = arch["text_cfg"].get("context_length", 77)
    return model.eval(), open_clip.tokenizer.SimpleTokenizer(context_length=context)


@torch.no_grad()
def zero_shot_head(model: Any, tokenizer: Any, task: str, classnames: list[str], templates: list[str],
                   device: str | torch.device = "cpu") -> Head:
    """CLIP's zero-shot head: per class, normalise each template's text embedding, average, normalise."""
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
    return Head(task, torch.stack(rows).cpu(), list(classnames), scale)
