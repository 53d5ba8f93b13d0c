"""Task arithmetic's three operations from the CLI and YAML: learning (+), forgetting (θ0 − λτ) and analogy
(θ0 + λ(τC + τB − τA)), checked against the same sums in plain torch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergeguard.cli import app


def _merged(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def _expected(family, lam: float, signs: dict[int, float]) -> dict[str, torch.Tensor]:
    base = family["base"]
    return {k: v + lam * sum(s * (family["fts"][i][k] - v) for i, s in signs.items()) if v.is_floating_point()
            else v for k, v in base.items()}


def _run(*args):
    return CliRunner().invoke(app, ["merge", *map(str, args), "-q"])


def _close(got, want):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_forgetting_subtracts_the_vector(family, tmp_path):
    base, (ft0, *_rest) = family["base_path"], family["paths"]
    result = _run(base, "--subtract", ft0, "-o", tmp_path / "forgot", "--lam", "0.5")
    assert result.exit_code == 0, result.output
    _close(_merged(tmp_path / "forgot"), _expected(family, 0.5, {0: -1.0}))


def test_analogy_adds_two_and_subtracts_one_with_ties_too(family, tmp_path):
    base, (ft0, ft1, ft2) = family["base_path"], family["paths"]
    result = _run(base, "--add", ft0, "--add", ft1, "--subtract", ft2, "-o", tmp_path / "analogy", "--lam", "0.3")
    assert result.exit_code == 0, result.output
    _close(_merged(tmp_path / "analogy"), _expected(family, 0.3, {0: 1.0, 1: 1.0, 2: -1.0}))
    # the same signed weights given as --weight: the same merge, for every method
    for method in ("task_arithmetic", "ties"):
        a = _run(base, "--add", ft0, "--add", ft1, "--subtract", ft2, "-o", tmp_path / f"a_{method}", "-m", method)
        b = _run(base, ft0, ft1, ft2, "-w", "1", "-w", "1", "-w", "-1", "-o", tmp_path / f"b_{method}", "-m", method)
        assert a.exit_code == b.exit_code == 0, a.output + b.output
        _close(_merged(tmp_path / f"a_{method}"), _merged(tmp_path / f"b_{method}"))


def test_positional_inputs_keep_their_weights_beside_the_operations(family, tmp_path):
    base, (ft0, _ft1, ft2) = family["base_path"], family["paths"]
    result = _run(base, ft0, "-w", "0.5", "--subtract", ft2, "-o", tmp_path / "mixed", "--lam", "1")
    assert result.exit_code == 0, result.output
    _close(_merged(tmp_path / "mixed"), _expected(family, 1.0, {0: 0.5, 2: -1.0}))


def test_yaml_add_and_subtract(family, tmp_path):
    base, (ft0, ft1, ft2) = family["base_path"], family["paths"]
    config = tmp_path / "ops.yaml"
    config.write_text(f"base: {base}\nadd: [{ft0}, {ft1}]\nsubtract: [{ft2}]\nlam: 0.3\n")
    result = CliRunner().invoke(app, ["merge", "--config", str(config), "-o", str(tmp_path / "yaml"), "-q"])
    assert result.exit_code == 0, result.output
    _close(_merged(tmp_path / "yaml"), _expected(family, 0.3, {0: 1.0, 1: 1.0, 2: -1.0}))


@pytest.mark.parametrize("args, message", [
    (["--subtract", "{other}"], "shape"),
    (["{ft0}", "-w", "1", "-w", "2", "--subtract", "{ft1}"], "--weight was given 2 times for 1 inputs"),
    ([], "give at least one INPUT"),
])
def test_bad_operations_are_one_sentence_and_write_nothing(family, tmp_path, args, message):
    other = {k: torch.randn(3, 3) if v.is_floating_point() and v.dim() == 2 else v
             for k, v in family["base"].items()}  # another architecture: every matrix 3 x 3
    save_file(other, tmp_path / "other.safetensors")
    names = {"other": tmp_path / "other.safetensors", "ft0": family["paths"][0], "ft1": family["paths"][1]}
    result = _run(family["base_path"], *[a.format(**names) for a in args], "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()
