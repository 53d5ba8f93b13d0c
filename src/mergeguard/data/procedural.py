"""Procedural images: objects of a shape and colour, a count of them, on a textured background.

Everything is rendered with tensor ops from a seeded generator, at any size, so the tiny
zoo, the tests and the benchmarks make their own data offline and deterministically.
Four attributes, one task each: shape, colour, count, texture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["disc", "ring", "triangle", "cross"],
    "colour": ["red", "green", "blue", "yellow", "magenta", "cyan"],
    "count": ["one", "two", "three", "four"],
    "texture": ["plain", "stripes", "checker", "dots"],
}
COLOURS = torch.tensor([
    [0.9, 0.15, 0.15], [0.15, 0.8, 0.2], [0.2, 0.3, 0.95],
    [0.95, 0.9, 0.15], [0.9, 0.2, 0.85], [0.15, 0.85, 0.9],
])
# Pre-training sees every attribute, but only at a coarse grain (pairs of classes), so the
# pre-trained encoder knows the attributes exist without separating every class: the
# fine-tunes have something to learn and their task vectors something to carry.
COARSE: dict[str, list[int]] = {
    "shape": [0, 0, 1, 1],
    "colour": [0, 1, 2, 0, 2, 1],
    "count": [0, 0, 1, 1],
    "texture": [0, 1, 1, 0],
}


def sample_attributes(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniformly random attribute labels for `n` images."""
    return {name: torch.randint(len(classes), (n,), generator=gen) for name, classes in ATTRIBUTES.items()}


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


@dataclass(frozen=True)
class Style:
    """How images look (noise, object contrast against the background, object size)."""

    noise: float = 0.03
    contrast: float = 1.0  # 1: objects in their full colour; less: blended toward the background
    radius: tuple[float, float] = (0.15, 0.2)


CLEAN = Style()


def render(attrs: dict[str, torch.Tensor], size: int, gen: torch.Generator, style: Style = CLEAN) -> torch.Tensor:
    """Images (n, 3, size, size) in [0, 1] with the given attribute labels."""
    n = attrs["shape"].shape[0]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy.expand(n, size, size), xx.expand(n, size, size)
    col = lambda t: t.view(n, 1, 1)  # noqa: E731

    # background: a grey level with a texture pattern
    period = col(_uniform(n, 0.14, 0.22, gen))
    angle = col(_uniform(n, 0, math.pi, gen))
    phase = col(_uniform(n, 0, 1, gen))
    stripes = torch.sign(torch.sin(2 * math.pi * ((xx * torch.cos(angle) + yy * torch.sin(angle)) / period + phase)))
    checker = ((torch.floor(xx / period + phase) + torch.floor(yy / period)) % 2) * 2 - 1
    dx = (xx / period + phase) % 1 - 0.5
    dy = (yy / period) % 1 - 0.5
    dots = ((dx**2 + dy**2) < 0.06).float() * 2 - 1
    patterns = torch.stack([torch.zeros_like(xx), stripes, checker, dots], dim=1)
    pattern = patterns[torch.arange(n), attrs["texture"]]
    level = col(_uniform(n, 0.35, 0.55, gen))
    amp = col(_uniform(n, 0.12, 0.18, gen))
    image = (level + amp * pattern).unsqueeze(1).expand(n, 3, size, size).clone()

    # objects: `count + 1` of them, one per quadrant (shuffled), jittered inside it
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)
    colour = COLOURS[attrs["colour"]] + 0.06 * (torch.rand(n, 3, generator=gen) - 0.5)
    for j in range(4):
        active = col((attrs["count"] >= j).float())
        quad = order[:, j]
        cx = col((quad % 2).float() * 0.5 + 0.25 + _uniform(n, -0.06, 0.06, gen))
        cy = col((quad // 2).float() * 0.5 + 0.25 + _uniform(n, -0.06, 0.06, gen))
        r = col(_uniform(n, *style.radius, gen))
        ax, ay = (xx - cx).abs(), (yy - cy).abs()
        d2 = ax**2 + ay**2
        disc = d2 < r**2
        ring = (d2 < r**2) & (d2 > (0.55 * r) ** 2)
        triangle = (yy - cy < r * 0.8) & (yy - cy > -r) & (ax < (yy - cy + r) * 0.6)
        cross = ((ax < r * 0.33) & (ay < r)) | ((ay < r * 0.33) & (ax < r))
        masks = torch.stack([disc, ring, triangle, cross], dim=1)
        mask = masks[torch.arange(n), attrs["shape"]].float() * active * style.contrast
        image = image * (1 - mask.unsqueeze(1)) + colour.view(n, 3, 1, 1) * mask.unsqueeze(1)
    image = image + style.noise * torch.randn(image.shape, generator=gen)
    return image.clamp(0, 1)


def coarse_groups(own_group: tuple[tuple[str, int], ...] = ()) -> dict[str, list[int]]:
    """COARSE, with each (attribute, class) of `own_group` taken out of its pair into a group of its own
    (pre-training then separates it from its look-alike)."""
    groups = {name: list(g) for name, g in COARSE.items()}
    for name, cls in own_group:
        if name not in groups or not 0 <= cls < len(groups[name]):
            raise ValueError(f"no class {cls} of attribute {name!r} to give a group of its own")
        groups[name][cls] = max(groups[name]) + 1
    return groups


def coarse_labels(attrs: dict[str, torch.Tensor],
                  groups: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """The pre-training targets: each attribute at the coarse grain of `groups` (default COARSE)."""
    groups = groups or COARSE
    return {name: torch.tensor(groups[name])[labels] for name, labels in attrs.items()}


def task_dataset(task: str, n: int, size: int, seed: int, style: Style = CLEAN) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images for one task with balanced labels (images in [0, 1], labels as indices)."""
    gen = torch.Generator().manual_seed(seed)
    attrs = sample_attributes(n, gen)
    attrs[task] = torch.arange(n) % len(ATTRIBUTES[task])
    attrs[task] = attrs[task][torch.randperm(n, generator=gen)]
    return render(attrs, size, gen, style), attrs[task]
