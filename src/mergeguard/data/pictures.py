"""Pictures a person would rather look at than read: mined prompts (mask, pattern, pasted on images) and the
demo's before/after bar chart. Pillow only (torchvision already needs it); no plotting library."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

TILE = 96  # pixels per shown image: a 32 px zoo image is scaled up 3x, a 224 px one down
GAP = 4


def _to_image(t: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] (C = 1 or 3) → an RGB tile of TILE × TILE (nearest: a pixel stays a pixel)."""
    t = t.detach().float().cpu().clamp(0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    array = (t.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB").resize((TILE, TILE), Image.NEAREST)


def _row(tiles: Sequence[torch.Tensor], labels: Sequence[str]) -> Image.Image:
    font = ImageFont.load_default()
    label_h = 14
    sheet = Image.new("RGB", (len(tiles) * (TILE + GAP) + GAP, TILE + label_h + 2 * GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x = GAP + i * (TILE + GAP)
        sheet.paste(_to_image(tile), (x, GAP))
        draw.text((x, GAP + TILE + 2), label, fill="black", font=font)
    return sheet


def first_images(dataset, n: int = 4) -> torch.Tensor | None:
    """The first `n` images of a dataset of (image, label) pairs, stacked (None when it is empty)."""
    count = min(n, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)]) if count else None


def paste(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x ⊕ Π = (1 − m) x + m p, as LFPM's mask prompt and a trigger file apply it (pixel space)."""
    return (1 - mask) * images + mask * pattern


def prompt_pictures(folder: Path, prompts: Mapping[str, torch.Tensor], images: torch.Tensor | None) -> list[Path]:
    """One PNG per mined prompt in `folder` (`prompt_<i>.png`): its mask, its pattern, the two multiplied
    (what is pasted), then `images` (N, 3, H, W in [0, 1]) with it pasted. Mask prompts (`i.mask`,
    `i.pattern`) and patch prompts (`i.patch`, shown at the image's centre); token prompts have no picture."""
    written = []
    for i in sorted({key.split(".", 1)[0] for key in prompts}, key=lambda k: (len(k), k)):
        if f"{i}.mask" in prompts and f"{i}.pattern" in prompts:
            mask, pattern = prompts[f"{i}.mask"].float(), prompts[f"{i}.pattern"].float()
        elif f"{i}.patch" in prompts:
            patch = prompts[f"{i}.patch"].float().clamp(0, 1)
            size = images.shape[-1] if images is not None else max(patch.shape[-1] * 4, 32)
            top = (size - patch.shape[-1]) // 2
            mask, pattern = torch.zeros(1, size, size), torch.zeros(3, size, size)
            mask[:, top:top + patch.shape[-2], top:top + patch.shape[-1]] = 1
            pattern[:, top:top + patch.shape[-2], top:top + patch.shape[-1]] = patch
        else:
            continue
        written.append(trigger_picture(folder / f"prompt_{i}.png", mask, pattern, images))
    return written


def trigger_picture(path: Path, mask: torch.Tensor, pattern: torch.Tensor, images: torch.Tensor | None) -> Path:
    """One PNG: the mask, the pattern, the two multiplied (what is pasted), then `images` with it pasted
    (a mined prompt's, a recovered trigger's)."""
    mask, pattern = mask.float(), pattern.float()
    tiles, labels = [mask, pattern, mask * pattern], ["mask", "pattern", "pasted part"]
    if images is not None and len(images):
        pasted = paste(images.float(), mask, pattern)
        tiles += list(pasted)
        labels += [f"image {k + 1}" for k in range(len(pasted))]
    _row(tiles, labels).save(path)
    return path


def bar_chart(path: Path, title: str, groups: Mapping[str, Mapping[str, float]],
              colours: Mapping[str, str] | None = None) -> Path:
    """A grouped bar chart of fractions in [0, 1]: one group per row of `groups` ({"clean merge": {"CA": .7,
    "ASR(T)": .02}, ...}), one bar per series, the value written above each bar."""
    colours = dict(colours or {})
    palette = ["#3b6fb6", "#d1495b", "#edae49", "#66a182", "#8d6a9f"]
    series = list(dict.fromkeys(k for values in groups.values() for k in values))
    for k, name in enumerate(series):
        colours.setdefault(name, palette[k % len(palette)])
    font = ImageFont.load_default()
    bar_w, group_gap, left, top, plot_h, bottom = 28, 30, 50, 40, 240, 50
    group_w = len(series) * bar_w + group_gap
    width = left + len(groups) * group_w + 20
    height = top + plot_h + bottom + 20
    image = Image.new("RGB", (max(width, 360), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill="black", font=font)
    for tick in range(0, 101, 25):  # the axis: 0..100%
        y = top + plot_h - tick * plot_h / 100
        draw.line([(left - 4, y), (width - 10, y)], fill="#dddddd")
        draw.text((6, y - 6), f"{tick}%", fill="black", font=font)
    for g, (group, values) in enumerate(groups.items()):
        x0 = left + g * group_w + group_gap // 2
        for k, name in enumerate(series):
            if name not in values:
                continue
            value = min(max(float(values[name]), 0.0), 1.0)
            x = x0 + k * bar_w
            y = top + plot_h - value * plot_h
            draw.rectangle([x, y, x + bar_w - 4, top + plot_h], fill=colours[name])
            draw.text((x, y - 12), f"{value:.0%}", fill="black", font=font)
        draw.text((x0, top + plot_h + 6), group, fill="black", font=font)
    for k, name in enumerate(series):  # the legend
        x = left + k * 110
        y = top + plot_h + 28
        draw.rectangle([x, y, x + 10, y + 10], fill=colours[name])
        draw.text((x + 14, y - 1), name, fill="black", font=font)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
