"""The image encoder every workflow runs: an open_clip vision tower that takes [0, 1] images.

Normalisation happens inside the module, so triggers are pasted in pixel space before it,
the same way in attack, eval and tests. The forward can insert extra prompt tokens after
the class token (LFPM's visual prompts); without them it computes exactly open_clip's own
forward.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergeguard.checkpoint import Checkpoint, open_checkpoint, write_tensors
from mergeguard.checkpoint.provenance import ARCH_KEY, build_metadata
from mergeguard.errors import MergeguardError, reason
from mergeguard.models.arch import arch_from_name, arch_json, arch_of
from mergeguard.models.hf import hf_to_open_clip, is_hf_clip


def build_visual(arch: dict[str, Any]) -> nn.Module:
    """A randomly initialised open_clip vision tower for `arch`."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if arch.get("family", "open_clip") != "open_clip":
        raise MergeguardError(f"unsupported architecture family {arch.get('family')!r}.")
    try:
        cfg = CLIPVisionCfg(**arch["vision_cfg"])
    except TypeError as exc:
        raise MergeguardError(f"the architecture's vision_cfg is not an open_clip CLIPVisionCfg: {exc}.") from exc
    return _build_vision_tower(arch["embed_dim"], cfg, quick_gelu=bool(arch.get("quick_gelu", False)))


class ImageEncoder(nn.Module):
    """open_clip vision tower + input normalisation; returns L2-normalised embeddings."""

    def __init__(self, arch: dict[str, Any], visual: nn.Module | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.visual = visual if visual is not None else build_visual(arch)
        self.register_buffer("mean", torch.tensor(arch["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(arch["std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        size = self.arch["vision_cfg"].get("image_size", 224)
        return size if isinstance(size, int) else size[0]

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    def forward(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Embed [0, 1] images (B, 3, H, W); `prompts` (P, width) or (B, P, width) are inserted after
        the class token, before ln_pre, and dropped again before pooling."""
        v = self.visual
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        x = v.conv1(x.to(v.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        n_prompts = 0
        if prompts is not None:
            if prompts.dim() == 2:
                prompts = prompts.unsqueeze(0).expand(x.shape[0], -1, -1)
            n_prompts = prompts.shape[1]
            x = torch.cat([x[:, :1], prompts.to(x.dtype), x[:, 1:]], dim=1)
        x = v.ln_pre(x)
        x = v.transformer(x)
        if n_prompts:
            x = torch.cat([x[:, :1], x[:, 1 + n_prompts:]], dim=1)
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled, dim=-1)

    def tower_state_dict(self) -> dict[str, torch.Tensor]:
        """The vision tower's tensors under open_clip's tower names (what mergeguard saves)."""
        return {k: v.detach().contiguous() for k, v in self.visual.state_dict().items()}

    def metadata(self, kind: str = "model", provenance: dict | None = None) -> dict[str, str]:
        meta = build_metadata(kind, provenance or {})
        meta[ARCH_KEY] = arch_json(self.arch)
        return meta


def save_encoder(encoder: ImageEncoder, out: str | Path, provenance: dict | None = None, *,
                 base: ImageEncoder | None = None, dtype: torch.dtype | None = None) -> Path:
    """Save an encoder's tower, or with `base` its task vector (float tensors minus the base's),
    with the architecture in the metadata, its float tensors in `dtype` if given; replaces `out` if it exists."""
    tensors = encoder.tower_state_dict()
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    kind = "model"
    if base is not None:
        base_tensors = base.tower_state_dict()
        tensors = {k: v - base_tensors[k].to(v.device) for k, v in tensors.items() if v.is_floating_point()}
        kind = "task_vector"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return write_tensors(out, tensors, encoder.metadata(kind, provenance), overwrite=True)


def tower_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Read the vision-tower tensors of a checkpoint in any supported layout, under open_clip's tower names."""
    keys = set(ckpt.keys())
    if ckpt.is_task_vector:
        raise MergeguardError(f"{ckpt.spec} is a task vector, not a model; merge it onto a base first.")
    if is_hf_clip(keys):
        wanted = [k for k in keys if k.startswith("vision_model.") or k == "visual_projection.weight"]
        return hf_to_open_clip({k: ckpt.get(k) for k in wanted})
    if "visual.conv1.weight" in keys:
        return {k.removeprefix("visual."): ckpt.get(k) for k in ckpt.keys() if k.startswith("visual.")}
    if "conv1.weight" in keys:
        return {k: ckpt.get(k) for k in ckpt.keys()}
    raise MergeguardError(
        f"{ckpt.spec} is not an open_clip or Hugging Face CLIP vision checkpoint (no patch embedding found)."
    )


def load_encoder(
    source: str | Checkpoint, *, arch: str | dict | None = None, allow_pickle: bool = False
) -> ImageEncoder:
    """Build the encoder of a checkpoint (file, folder or Hub id) or of an open_clip pretrained model.

    `open_clip:NAME@TAG` (e.g. `open_clip:ViT-B-32@openai`) loads open_clip's own pretrained
    weights through its cache (offline once cached).
    """
    if isinstance(source, str) and source.startswith("open_clip:"):
        return _load_open_clip_pretrained(source, allow_pickle)
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source, allow_pickle=allow_pickle)
    description = arch_of(ckpt, arch)
    encoder = ImageEncoder(description)
    state = tower_tensors(ckpt)
    expected = encoder.visual.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise MergeguardError(
            f"{ckpt.spec} lacks tensor {missing[0]!r} of the {description.get('name', 'given')} architecture "
            f"({len(missing)} missing); is --arch right?"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise MergeguardError(
                f"tensor {k!r} of {ckpt.spec} is {list(state[k].shape)} but the architecture expects "
                f"{list(v.shape)}; is --arch right?"
            )
    for k in expected:
        if not bool(torch.isfinite(state[k]).all()):
            raise MergeguardError(f"tensor {k!r} of {ckpt.spec} holds NaN or Inf values; the checkpoint is damaged.")
    encoder.visual.load_state_dict({k: state[k].float() for k in expected}, strict=True)
    return encoder


def open_clip_weights(name: str, tag: str) -> str:
    """What open_clip would load for NAME@TAG: "safetensors" (a Hub repo's, which it prefers), "pickle"
    (the repo's .bin when it has no safetensors, a cached .bin while offline, or a URL-only tag's .pt),
    "missing" (neither cached and the Hub out of reach), or "" (no pretrained weights: open_clip's error)."""
    import open_clip
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if name.startswith("local-dir:"):  # open_clip takes the folder's safetensors first, then a .bin/.pth
        folder = Path(name.removeprefix("local-dir:")).expanduser()
        found = {p.suffix for p in folder.glob("*")} if folder.is_dir() else set()
        if ".safetensors" in found:
            return "safetensors"
        return "pickle" if found & {".bin", ".pth"} else ""
    if name.startswith("hf-hub:"):
        repo, filename = name.removeprefix("hf-hub:"), ""
    else:
        cfg = open_clip.get_pretrained_cfg(name.replace("/", "-"), tag) if tag else {}  # open_clip's spelling
        if not cfg and tag and Path(tag).expanduser().is_file():  # a weights file given as the tag
            return "safetensors" if tag.endswith(".safetensors") else "pickle"
        if not cfg:
            return ""
        if "file" in cfg:
            return "safetensors" if str(cfg["file"]).endswith(".safetensors") else "pickle"
        if not cfg.get("hf_hub"):
            return "pickle"  # a download URL (OpenAI's .pt files)
        repo, _, filename = cfg["hf_hub"].rpartition("/")
    pickle = filename or "open_clip_pytorch_model.bin"
    if pickle.endswith(".safetensors"):
        safe = pickle
    elif pickle == "open_clip_pytorch_model.bin":  # open_clip's names for its default file
        safe = "open_clip_model.safetensors"
    else:
        safe = pickle.rsplit(".", 1)[0] + ".safetensors"
    from mergeguard.checkpoint.resolve import hub_reachable

    cached = [isinstance(try_to_load_from_cache(repo, f), str) for f in (safe, pickle)]
    if not any(cached) and not hub_reachable():  # said at once, not after the Hub client's retries
        return "missing"
    try:
        hf_hub_download(repo, safe)
    except LocalEntryNotFoundError:  # not cached, and offline or the Hub unreachable
        return "pickle" if isinstance(try_to_load_from_cache(repo, pickle), str) else "missing"
    except EntryNotFoundError:
        return "pickle"  # the repo has only the pickle
    return "safetensors"


_CHATTY_LOGGERS = ("huggingface_hub", "timm", "open_clip")  # named loggers of what open_clip calls


@contextmanager
def _held_back_logs(level: int = logging.ERROR) -> Iterator[None]:
    """Hold back open_clip's and the Hub client's log records up to `level` (they say, at length, what our one
    sentence says) without touching global logging state: open_clip logs on the root logger, so a filter
    there drops the records made in its files; the Hub client and timm log on their own loggers, whose
    levels are raised. Both are undone on leaving."""
    import open_clip

    package = str(Path(open_clip.__file__).parent)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno > level or not record.pathname.startswith(package)

    root, named = logging.getLogger(), [logging.getLogger(n) for n in _CHATTY_LOGGERS]
    levels = [logger.level for logger in named]
    root.addFilter(keep)
    for logger, before in zip(named, levels):
        logger.setLevel(max(before, level + 1))
    try:
        yield
    finally:
        root.removeFilter(keep)
        for logger, before in zip(named, levels):
            logger.setLevel(before)


def create_open_clip(name: str, tag: str, allow_pickle: bool = False) -> Any:
    """open_clip's pretrained model NAME with weights TAG, through its cache; one sentence when it cannot
    (weights neither cached nor reachable, an unknown name or tag, weights only a pickle without
    `allow_pickle`). open_clip's and the Hub client's log lines are held back."""
    import open_clip

    schema = name.startswith(("hf-hub:", "local-dir:"))  # these bring their own weights
    if not tag and not schema:  # open_clip would build a randomly initialised model, silently
        raise MergeguardError(f"open_clip:{name} names no pretrained weights; add a tag, e.g. open_clip:{name}@openai.")
    known = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
    if tag and known and tag not in known and not schema and not Path(tag).expanduser().is_file():
        raise MergeguardError(f"open_clip has no pretrained weights {tag!r} for {name}; it has: {', '.join(known)}.")
    with _held_back_logs():  # open_clip logs "Failed to download ..." before raising
        try:
            weights, label = open_clip_weights(name, tag), f"{name}@{tag}" if tag else name
            if weights == "missing":
                raise MergeguardError(f"open_clip's weights for {label} are not in the Hub cache and the Hub cannot "
                                      "be reached; fetch them once with a connection (HF_HOME names the cache).")
            if weights == "pickle" and not allow_pickle:
                raise MergeguardError(f"open_clip's weights for {label} are a pickle, not safetensors; pass "
                                      "--allow-pickle to load them (weights_only) if you trust their source.")
            return open_clip.create_model(name, pretrained=tag or None)
        except MergeguardError:
            raise
        except Exception as exc:  # open_clip raises RuntimeError / HF errors for missing weights
            raise MergeguardError(f"could not load open_clip {name} with pretrained={tag!r} ({reason(exc)}).") from exc


def _load_open_clip_pretrained(source: str, allow_pickle: bool = False) -> ImageEncoder:
    name, _, tag = source.removeprefix("open_clip:").partition("@")
    model = create_open_clip(name, tag, allow_pickle)
    return ImageEncoder(arch_from_name(name), model.visual)


def weights_digest(model: nn.Module) -> str:
    """A digest of a model's parameters (names and values as float32 bytes: exact on any device, the same
    for a model and its copy); what a resume or a cached result must share."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_same_architecture(merged: ImageEncoder, base: ImageEncoder, defense: str) -> None:
    """One sentence unless both models have the same parameter names and shapes (what adding one model's
    weights to the other's needs)."""
    def shapes(model: ImageEncoder) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in model.named_parameters()}

    def describe(encoder: ImageEncoder) -> str:
        vc = encoder.arch["vision_cfg"]
        return (f"{encoder.arch.get('name', 'ViT')}: width {vc.get('width')}, {vc.get('layers')} layers, "
                f"{encoder.image_size} px, embedding {encoder.arch['embed_dim']}")

    if shapes(merged) != shapes(base):
        raise MergeguardError("the merged model and the base have different architectures "
                              f"({describe(merged)} vs {describe(base)}); {defense} needs the base the merge was "
                              "made from.")
