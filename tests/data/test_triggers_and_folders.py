"""Trigger files and image folders: the pixel-space contract every workflow shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mergeguard.data.folders import class_key, labeled_folder, unlabeled_folder
from mergeguard.data.procedural import ATTRIBUTES, render, sample_attributes, task_dataset
from mergeguard.data.triggers import Trigger, load_trigger, patch_trigger
from mergeguard.errors import MergeguardError


def test_patch_trigger_is_about_one_percent_in_the_corner():
    t = patch_trigger(32, 0.01, target_class=2, target_task="shape")
    assert t.mask.sum().item() == 9  # round(sqrt(10.24)) = 3 → 3×3 of 1024 pixels
    assert t.mask[0, -3:, -3:].all() and t.mask[0, :-3].sum() == 0 and t.mask[0, :, :-3].sum() == 0


def test_apply_pastes_pattern_under_the_mask_only():
    t = patch_trigger(16, 0.05, target_class=0)
    x = torch.rand(4, 3, 16, 16)
    y = t.apply(x)
    m = t.mask.bool().expand(3, 16, 16)
    assert torch.equal(y[:, m], t.pattern.expand(4, 3, 16, 16)[:, m])
    assert torch.equal(y[:, ~m], x[:, ~m])


def test_blend_trigger_formula():
    pattern = torch.rand(3, 8, 8)
    mask = torch.full((1, 8, 8), 0.2)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(Trigger(pattern, mask, 1, kind="blend").apply(x), 0.8 * x + 0.2 * pattern)


def test_trigger_file_round_trip_and_resize(tmp_path):
    t = patch_trigger(32, 0.01, target_class=3, target_task="count", seed=4)
    t.save(tmp_path / "t.safetensors")
    back = load_trigger(tmp_path / "t.safetensors")
    assert back.target_class == 3 and back.target_task == "count" and back.kind == "patch"
    assert torch.equal(back.pattern, t.pattern) and torch.equal(back.mask, t.mask)
    big = back.apply(torch.zeros(1, 3, 64, 64))  # nearest resize keeps the corner placement
    assert big[0, :, -6:, -6:].abs().sum() > 0 and big[0, :, :-6, :].abs().sum() == 0


def test_not_a_trigger_file(tmp_path, family):
    with pytest.raises(MergeguardError, match="not a trigger file"):
        load_trigger(family["base_path"])


def test_procedural_rendering_is_deterministic():
    a = render(sample_attributes(8, torch.Generator().manual_seed(3)), 32, torch.Generator().manual_seed(4))
    b = render(sample_attributes(8, torch.Generator().manual_seed(3)), 32, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.shape == (8, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    x, y = task_dataset("colour", 60, 32, seed=1)
    assert torch.equal(torch.bincount(y), torch.full((len(ATTRIBUTES["colour"]),), 10))


def _write(folder, n, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_labeled_folder_maps_classes_by_name(tmp_path):
    _write(tmp_path / "Annual_Crop", 2, 0)
    _write(tmp_path / "forest", 3, 1)
    ds = labeled_folder(tmp_path, ["forest", "annual crop", "river"], image_size=8)
    assert len(ds) == 5
    labels = sorted(ds[i][1] for i in range(5))
    assert labels == [0, 0, 0, 1, 1]
    image, _ = ds[0]
    assert image.shape == (3, 8, 8) and 0 <= image.min() and image.max() <= 1
    assert class_key("Annual-Crop") == class_key("annual_crop")


def test_numeric_class_folders_index_the_head(tmp_path):
    _write(tmp_path / "2", 1, 0)
    ds = labeled_folder(tmp_path, ["a", "b", "c"], image_size=8)
    assert ds[0][1] == 2


def test_folder_errors(tmp_path):
    with pytest.raises(MergeguardError, match="does not exist"):
        labeled_folder(tmp_path / "nope", None, 8)
    (tmp_path / "a_file.png").write_bytes(b"")
    for read in (lambda p: labeled_folder(p, None, 8), lambda p: unlabeled_folder(p, 8)):
        with pytest.raises(MergeguardError, match="is a file; give a folder"):
            read(tmp_path / "a_file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeguardError, match="no class folders"):
        labeled_folder(tmp_path / "empty", None, 8)
    (tmp_path / "empty" / "cat").mkdir()
    with pytest.raises(MergeguardError, match="contains no images"):
        labeled_folder(tmp_path / "empty", None, 8)
    _write(tmp_path / "d" / "zebra", 1, 0)
    with pytest.raises(MergeguardError, match="'zebra'.*matches none"):
        labeled_folder(tmp_path / "d", ["cat", "dog"], 8)
    (tmp_path / "bad" / "cat").mkdir(parents=True)
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"not a png")
    ds = labeled_folder(tmp_path / "bad", ["cat"], 8)
    with pytest.raises(MergeguardError, match="broken.png"):
        ds[0]
    with pytest.raises(MergeguardError, match="contains no images"):
        unlabeled_folder(tmp_path / "empty", 8)
