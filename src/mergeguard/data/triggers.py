"""Trigger files: a pattern and a mask in pixel space, pasted before normalisation.

One file format for attack, eval and tests (safetensors):
tensors `pattern` (3, H, W) and `mask` (1, H, W), values in [0, 1]; metadata `kind`
(`patch` or `blend`), `target_class`, `target_task`, `image_size`.
`x' = (1 - mask) * x + mask * pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class TrainableTriggers:
    """K blend triggers being trained, one per row: a pattern p and a soft mask m over the whole image,
    x ⊕ Π = (1 − m) x + m p, m = σ(a), p = σ(b), optimised with Adam: a trainable blend trigger. The scan
    inverts many targets at once with it; LFPM mines with one row."""

    def __init__(self, count: int, size: int, lr: float, gen: torch.Generator, dev: torch.device,
                 start: float = -3.0, jitter: float = 0.0):
        a = torch.full((count, 1, size, size), start)
        if jitter:  # (no draw without it: LFPM's prompts start from the same numbers as before this class)
            a = a + jitter * torch.randn(count, 1, size, size, generator=gen)
        self.a = a.to(dev).requires_grad_(True)
        self.b = torch.randn(count, 3, size, size, generator=gen).to(dev).requires_grad_(True)
        self.opt = torch.optim.Adam([self.a, self.b], lr=lr)

    def mask(self, grad: bool = False) -> torch.Tensor:
        m = torch.sigmoid(self.a)
        return m if grad else m.detach()

    def pattern(self, grad: bool = False) -> torch.Tensor:
        p = torch.sigmoid(self.b)
        return p if grad else p.detach()

    def apply(self, x: torch.Tensor, grad: bool = False, row: int | None = None) -> torch.Tensor:
        """x (B, 3, H, W) patched by every prompt (K, B, 3, H, W), or by one row (B, 3, H, W)."""
        m, p = self.mask(grad), self.pattern(grad)
        if row is not None:
            return (1 - m[row]) * x + m[row] * p[row]
        return (1 - m[:, None]) * x[None] + (m * p)[:, None]

    def area(self) -> torch.Tensor:
        """Each prompt's mean mask value (K,)."""
        return self.mask().mean((1, 2, 3))

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"a": self.a.detach().cpu(), "b": self.b.detach().cpu(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.a.copy_(state["a"])
            self.b.copy_(state["b"])
        self.opt.load_state_dict(state["opt"])
