"""What a non-editable install needs: every data file the code reads is in the wheel's package data, and
in CI the suite tests the installed wheel, not the source tree (a file missing from the wheel fails there)."""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from importlib import resources
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mergeguard

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "mergeguard"


def _package_data_globs() -> list[str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-data"]["mergeguard"]


def test_every_data_file_in_the_source_tree_is_package_data():
    """A file beside the code that is not Python ships only if pyproject's package-data names it."""
    globs = _package_data_globs()
    data = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data, "the package has data files (classnames.json at least)"
    missing = [f for f in data if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_the_installed_package_holds_its_data_files():
    names = json.loads(resources.files("mergeguard.data").joinpath("classnames.json").read_text())
    assert names["tasks"]["eurosat"]["classnames"]
    assert resources.files("mergeguard").joinpath("py.typed").is_file()


@pytest.mark.skipif(os.environ.get("CI", "").lower() not in ("1", "true"), reason="CI tests the installed wheel")
def test_ci_tests_the_installed_wheel_not_the_source_tree():
    here = Path(mergeguard.__file__).resolve()
    assert SRC not in here.parents, f"CI imported mergeguard from the source tree ({here}), not from the wheel"
    assert "site-packages" in here.parts


TINY_CLIP = {"family": "open_clip", "name": "tiny-packaging-test", "embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}


def test_heads_from_a_full_clip_named_by_arch(tmp_path):
    """`heads --base FULL_CLIP --arch ARCH --task cars=cars`: a random tiny open_clip CLIP with a text tower,
    saved without architecture metadata, its architecture given as a JSON file, and a shipped task's class
    names (read from package data, which a wheel once lacked)."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    from mergeguard.cli import app
    from mergeguard.models.heads import load_heads, resolve_classnames

    torch.manual_seed(0)
    model = CLIP(TINY_CLIP["embed_dim"], TINY_CLIP["vision_cfg"], TINY_CLIP["text_cfg"], quick_gelu=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "clip.safetensors")
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(TINY_CLIP))
    out = tmp_path / "heads.safetensors"
    result = CliRunner().invoke(app, ["heads", "--base", str(tmp_path / "clip.safetensors"), "--arch", str(arch),
                                      "--task", "cars=cars", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    head = load_heads(out)["cars"]
    assert head.classnames == resolve_classnames("cars")[0]
    assert head.weight.shape == (196, TINY_CLIP["embed_dim"])
