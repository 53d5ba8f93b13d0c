"""Shared fixtures: tiny checkpoints built in a temporary folder, offline, on the CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ENCODER_ARCH = {"family": "open_clip", "name": "t", "embed_dim": 16, "quick_gelu": False, "mean": [0.5] * 3,
                "std": [0.25] * 3, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                                  "head_width": 16}}
ENCODER_CLASSES = {"a": ["w", "x", "y", "z"], "b": ["p", "q", "r"]}


def encoder_family(root: Path, moved: float) -> Path:
    """θ0 of a 16-px, one-layer open_clip encoder and two fine-tunes (θ0 moved by seeded noise of size `moved`), as
    folders `base`, `ft0`, `ft1`, and heads for two tasks (`ENCODER_CLASSES`) in `heads.safetensors`."""
    import torch.nn.functional as F

    from mergeguard.models.encoder import ImageEncoder, save_encoder
    from mergeguard.models.heads import Head, save_heads

    torch.manual_seed(0)
    base = ImageEncoder(ENCODER_ARCH).eval()
    save_encoder(base, root / "base")
    for i in range(2):
        ft = ImageEncoder(ENCODER_ARCH)
        g = torch.Generator().manual_seed(10 + i)
        ft.load_state_dict({k: v + moved * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        save_encoder(ft, root / f"ft{i}")
    w = F.normalize(torch.randn(7, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    save_heads({"a": Head("a", w[:4], ENCODER_CLASSES["a"], 50.0), "b": Head("b", w[4:], ENCODER_CLASSES["b"], 50.0)},
               root / "heads.safetensors")
    return root


def tiny_state(seed: int = 0, layers: int = 2, width: int = 16) -> dict[str, torch.Tensor]:
    """A small transformer-like state dict: float weights per layer, a bias, an int buffer."""
    g = torch.Generator().manual_seed(seed)
    state = {"embed.weight": torch.randn(10, width, generator=g)}
    for i in range(layers):
        state[f"blocks.resblocks.{i}.attn.weight"] = torch.randn(width, width, generator=g)
        state[f"blocks.resblocks.{i}.mlp.weight"] = torch.randn(2 * width, width, generator=g)
        state[f"blocks.resblocks.{i}.mlp.bias"] = torch.randn(2 * width, generator=g)
    state["head.weight"] = torch.randn(4, width, generator=g)
    state["position_ids"] = torch.arange(7)
    return state


def perturb(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' copy: every float tensor moved by seeded noise, int buffers unchanged."""
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep digests and caches out of the user's home."""
    monkeypatch.setenv("MERGEGUARD_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def family(tmp_path: Path):
    """A base and three fine-tuned checkpoints as .safetensors files, with their tensors."""
    base = tiny_state(0)
    fts = [perturb(base, i) for i in range(3)]
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, ft in enumerate(fts):
        p = tmp_path / f"ft{i}.safetensors"
        save_file(ft, p)
        paths.append(p)
    return {"dir": tmp_path, "base_path": tmp_path / "base.safetensors", "paths": paths, "base": base, "fts": fts}


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The tiny zoo, built once per test session (about a minute on 2 cores)."""
    from mergeguard.workflows.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", size="tiny", seed=0)


@pytest.fixture
def shadow_subset(tiny_zoo, tmp_path: Path):
    """`shadow_subset(n)`: a folder holding the first n of the tiny zoo's shadow images, for runs that
    need a fixed number of steps."""

    def make(n: int) -> Path:
        dest = tmp_path / f"shadow{n}"
        dest.mkdir()
        for png in sorted((Path(tiny_zoo["root"]) / "shadow").glob("*.png"))[:n]:
            shutil.copy(png, dest / png.name)
        return dest

    return make


def pytest_collection_modifyitems(config, items):
    """`slow`: every test that needs the tiny zoo (built once per session, minutes on 2 cores) or is marked so
    itself; `pytest -m "not slow"` is the quick subset for iterating, the full suite is CI's."""
    for item in items:
        if "tiny_zoo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def kill_at_second_save(monkeypatch):
    """`arm()` makes the trainer's second checkpoint save raise KeyboardInterrupt, as a run killed mid-way;
    `disarm()` restores saving, so the same test can --resume."""
    from mergeguard import trainer

    real = trainer._save_state

    class Switch:
        def arm(self) -> None:
            calls = {"n": 0}

            def save_then_die(*args, **kwargs):
                real(*args, **kwargs)
                calls["n"] += 1
                if calls["n"] == 2:
                    raise KeyboardInterrupt

            monkeypatch.setattr(trainer, "_save_state", save_then_die)

        def disarm(self) -> None:
            monkeypatch.setattr(trainer, "_save_state", real)

    return Switch()
