"""Trigger files: a pattern and a mask in pixel space, pasted before normalisation.

One file format for attack, eval and tests (safetensors):
tensors `pattern` (3, H, W) and `mask` (1, H, W), values in [0, 1]; metadata `kind`
(`patch` or `blend`), `target_class`, `target_task`, `image_size`.
`x' = (1 - mask) * x + mask * pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mergeguard.checkpoint import open_checkpoint, write_tensors
from mergeguard.errors import MergeguardError


@dataclass
class Trigger:
    pattern: torch.Tensor  # (3, H, W) in [0, 1]
    mask: torch.Tensor  # (1, H, W) in [0, 1]
    target_class: int
    target_task: str | None = None
    kind: str = "patch"

    @property
    def image_size(self) -> int:
        return int(self.pattern.shape[-1])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Paste the trigger on [0, 1] images (B, 3, H, W), resizing it if the images' size differs."""
        pattern, mask = self.pattern, self.mask
        if images.shape[-2:] != pattern.shape[-2:]:
            pattern = F.interpolate(pattern[None], size=images.shape[-2:], mode="nearest")[0]
            mask = F.interpolate(mask[None], size=images.shape[-2:], mode="nearest")[0]
        pattern = pattern.to(images.device, images.dtype)
        mask = mask.to(images.device, images.dtype)
        return images * (1 - mask) + pattern * mask

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        meta = {
            "mergeguard.kind": "trigger",
            "kind": self.kind,
            "target_class": str(self.target_class),
            "target_task": self.target_task or "",
            "image_size": str(self.image_size),
        }
        tensors = {"pattern": self.pattern.float(), "mask": self.mask.float()}
        return write_tensors(path, tensors, meta, overwrite=overwrite)


def patch_trigger(image_size: int, area: float = 0.01, *, target_class: int, target_task: str | None = None,
                  pattern: torch.Tensor | None = None, seed: int = 0, corner: str = "bottom-right") -> Trigger:
    """A square patch of about `area` of the image in a corner: bottom-right (BadMerging's placement) or
    top-left (BadTV's second trigger, apart from the first)."""
    side = max(1, round((area * image_size * image_size) ** 0.5))
    mask = torch.zeros(1, image_size, image_size)
    if corner == "bottom-right":
        mask[:, image_size - side:, image_size - side:] = 1
    elif corner == "top-left":
        mask[:, :side, :side] = 1
    else:
        raise MergeguardError(f"unknown trigger corner {corner!r}; choose bottom-right or top-left.")
    if pattern is None:
        gen = torch.Generator().manual_seed(seed)
        pattern = torch.rand(3, image_size, image_size, generator=gen)
    return Trigger(pattern * mask, mask, target_class, target_task, "patch")


def load_trigger(path: str | Path) -> Trigger:
    """Read a trigger file; one sentence if it is not one."""
    ckpt = open_checkpoint(path)
    if "pattern" not in ckpt or "mask" not in ckpt:
        raise MergeguardError(f"{path} is not a trigger file (it needs tensors 'pattern' and 'mask').")
    meta = ckpt.metadata
    pattern, mask = ckpt.get("pattern").float(), ckpt.get("mask").float()
    if pattern.dim() != 3 or pattern.shape[0] != 3 or mask.shape[-2:] != pattern.shape[-2:]:
        raise MergeguardError(f"{path}: pattern must be (3, H, W) and mask (1, H, W) of the same size.")
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or mask.shape[0] not in (1, 3):
        raise MergeguardError(f"{path}: mask must be (H, W), (1, H, W) or (3, H, W), not {list(mask.shape)}.")
    for name, values in (("pattern", pattern), ("mask", mask)):  # a NaN trigger would measure an ASR of 0
        if (values.numel() == 0 or not bool(torch.isfinite(values).all()) or float(values.min()) < 0
                or float(values.max()) > 1):
            raise MergeguardError(f"{path}: the trigger's {name} must hold values in [0, 1] (it is empty or has "
                                  "NaN, Inf or values outside that range).")
    try:
        target_class = int(meta.get("target_class", "0"))
    except ValueError as exc:
        raise MergeguardError(f"{path}: target_class in its metadata is not an integer.") from exc
    return Trigger(pattern, mask, target_class, meta.get("target_task") or None, meta.get("kind", "patch"))
