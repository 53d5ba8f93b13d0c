"""The pictures: a bar's height is its value, a prompt's tiles are what is pasted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mergeguard.data.pictures import GAP, TILE, bar_chart, first_images, prompt_pictures


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _bar_heights(pixels: np.ndarray, colour: tuple[int, int, int]) -> list[int]:
    """Heights of the runs of `colour` found on each column, scanning the picture: one per bar."""
    hits = np.all(pixels == np.array(colour), axis=2)
    columns = hits.sum(axis=0)
    heights, inside = [], False
    for count in columns:
        if count and not inside and count > 20:  # a bar, not the legend's 11 px square
            heights.append(int(count))
        inside = bool(count)
    return heights


@pytest.mark.parametrize("values", [(0.72, 0.02, 0.5), (1.0, 0.25, 0.9)])
def test_bar_heights_are_the_values(tmp_path, values):
    groups = {f"m{i}": {"CA": v, "ASR(T)": 1 - v} for i, v in enumerate(values)}
    path = bar_chart(tmp_path / "chart.png", "title", groups, colours={"CA": "#0000ff", "ASR(T)": "#ff0000"})
    pixels = _pixels(path)
    blue, red = _bar_heights(pixels, (0, 0, 255)), _bar_heights(pixels, (255, 0, 0))
    full = round(max(max(blue), max(red)) / max(max(values), max(1 - v for v in values)))  # the 100% height
    assert [round(h / full, 2) for h in blue] == pytest.approx([v for v in values if v * full > 20], abs=0.01)
    assert [round(h / full, 2) for h in red] == pytest.approx([1 - v for v in values if (1 - v) * full > 20],
                                                              abs=0.01)
    assert not list(tmp_path.glob(".*"))  # written under a temporary name, renamed


def test_a_patch_prompt_is_shown_at_the_centre_and_tokens_have_no_picture(tmp_path):
    patch = torch.rand(3, 4, 4)
    images = torch.rand(2, 3, 16, 16)
    written = prompt_pictures(tmp_path, {"0.patch": patch, "1.tokens": torch.randn(3, 8)}, images)
    assert [p.name for p in written] == ["prompt_0.png"]
    picture = torch.from_numpy(_pixels(written[0])).permute(2, 0, 1).float() / 255
    scale = TILE // 16
    pasted = images[1].clone()
    pasted[:, 6:10, 6:10] = patch  # the centre of a 16 px image
    left = GAP + 4 * (TILE + GAP)  # mask, pattern, pasted part, image 1, image 2
    torch.testing.assert_close(picture[:, GAP:GAP + TILE:scale, left:left + TILE:scale], pasted,
                               rtol=0, atol=1 / 255 + 1e-6)


def test_first_images():
    data = [(torch.full((3, 2, 2), float(i)), -1) for i in range(6)]
    assert first_images(data, 4)[:, 0, 0, 0].tolist() == [0, 1, 2, 3]
    assert first_images([], 4) is None
