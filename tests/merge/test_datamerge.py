"""RegMean and AdaMerging (`mergeguard.datamerge`, `merge --method regmean | adamerging`): RegMean against the
least-squares answer a linear layer has in closed form, AdaMerging's objective and gradients against a hand
computation on a two-layer toy, both through the CLI on a 16-px encoder, and their bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import encoder_family
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from mergeguard import datamerge
from mergeguard.cli import app
from mergeguard.models.encoder import load_encoder

runner = CliRunner()


def test_gram_matrices_are_the_mean_of_xtx_over_every_row():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(37, 5)
    grams = datamerge.gram_matrices(net, x, batch_size=8, device=torch.device("cpu"))
    assert set(grams) == {"0.weight", "2.weight"}
    h = torch.relu(net[0](x)).detach().double()
    torch.testing.assert_close(grams["0.weight"], x.double().T @ x.double() / 37)
    torch.testing.assert_close(grams["2.weight"], h.T @ h / 37)


def test_regmean_is_the_least_squares_fit_of_every_input_on_its_own_inputs():
    """With alpha 1, W* minimises Σ_i ‖X_i W_iᵀ − X_i Wᵀ‖² / n_i: the answer of torch.linalg.lstsq on the stacked,
    scaled rows; and where the tasks' inputs span orthogonal subspaces, W* reproduces each model exactly there."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    xs = [torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(25, 6, generator=g, dtype=torch.float64)]
    grams = [x.T @ x / len(x) for x in xs]
    got = datamerge.regmean_solve(ws, grams, alpha=1.0)
    a = torch.cat([x / len(x) ** 0.5 for x in xs])
    b = torch.cat([x @ w.T / len(x) ** 0.5 for x, w in zip(xs, ws)])
    torch.testing.assert_close(got, torch.linalg.lstsq(a, b).solution.T)

    basis = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64)).Q
    xs = [torch.randn(30, 3, generator=g, dtype=torch.float64) @ basis[:, :3].T,
          torch.randn(30, 3, generator=g, dtype=torch.float64) @ basis[:, 3:].T]
    got = datamerge.regmean_solve(ws, [x.T @ x / 30 for x in xs], alpha=1.0)
    for x, w in zip(xs, ws):
        torch.testing.assert_close(x @ got.T, x @ w.T)
    # alpha 0 keeps only the diagonals: a per-input-feature weighted mean of the weights
    diag = [torch.diagonal(x.T @ x / 30) for x in xs]
    want = (ws[0] * diag[0] + ws[1] * diag[1]) / (diag[0] + diag[1])
    torch.testing.assert_close(datamerge.regmean_solve(ws, [x.T @ x / 30 for x in xs], alpha=0.0), want)


def test_adamerging_objective_and_gradients_equal_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    toy = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    names = ["0.weight", "1.weight"]
    theta0 = {n: torch.randn(p.shape, generator=g) for n, p in toy.named_parameters()}
    taus = [{n: torch.randn(v.shape, generator=g) * 0.5 for n, v in theta0.items()} for _ in range(2)]
    lam = torch.tensor([[0.3, 0.6], [0.2, 0.9]], requires_grad=True)
    xs = [torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g)]
    loss = datamerge.adamerging_loss(toy, theta0, taus, lam, names, xs, [lambda z: z, lambda z: 2 * z])
    loss.backward()

    w = {n: theta0[n] + lam[0, p].detach() * taus[0][n] + lam[1, p].detach() * taus[1][n]
         for p, n in enumerate(names)}
    want_loss, dw = 0.0, {n: torch.zeros_like(v) for n, v in w.items()}
    for x, scale in zip(xs, (1.0, 2.0)):
        h = x @ w["0.weight"].T
        z = scale * (h @ w["1.weight"].T)
        p = torch.softmax(z, -1)
        ent = -(p * p.log()).sum(-1)
        want_loss += float(ent.mean())
        dz = -p * (p.log() + ent[:, None]) / len(x) * scale  # ∂ mean entropy / ∂ logits, through the head's scale
        dw["1.weight"] += dz.T @ h
        dw["0.weight"] += (dz @ w["1.weight"]).T @ x
    want_grad = torch.tensor([[float((dw[n] * taus[k][n]).sum()) for n in names] for k in range(2)])
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-5)
    torch.testing.assert_close(lam.grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = encoder_family(tmp_path_factory.mktemp("datamerge"), moved=0.05)
    gen = torch.Generator().manual_seed(2)
    for task in ("a", "b"):
        (root / task).mkdir()
        for i in range(24):
            x = torch.rand(3, 16, 16, generator=gen)
            Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / task / f"{i}.png")
    (root / "empty").mkdir()
    return root


def test_regmean_through_the_cli_solves_each_linear_map_and_averages_the_rest(world, tmp_path):
    r = world
    res = runner.invoke(app, ["merge", str(r / "base"), str(r / "ft0"), str(r / "ft1"), "-o", str(tmp_path / "m"),
                              "--method", "regmean", "--inputs-per-task", f"a={r / 'a'}", "--inputs-per-task",
                              f"b={r / 'b'}", "--alpha", "1", "--device", "cpu", "-q", "--json",
                              str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    got = load_file(tmp_path / "m" / "model.safetensors")
    fts = [load_file(r / f"ft{i}" / "model.safetensors") for i in range(2)]
    report = json.loads((tmp_path / "m.json").read_text())
    solved = {k.removeprefix("visual.") for k in report["learned"]["solved"]}
    assert "transformer.resblocks.0.mlp.c_fc.weight" in solved and "transformer.resblocks.0.attn.in_proj_weight" \
        in solved
    for k, v in got.items():
        if k not in solved and v.is_floating_point():
            torch.testing.assert_close(v, (fts[0][k] + fts[1][k]) / 2)
    # the first MLP layer, recomputed here: its inputs under each fine-tune on its own task's images
    images = {}
    for task in ("a", "b"):
        files = sorted((r / task).glob("*.png"), key=lambda p: int(p.stem))
        images[task] = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1).float() / 255
                                    for f in files])
    xs = []
    for i, task in enumerate(("a", "b")):
        enc = load_encoder(str(r / f"ft{i}"))
        seen = []
        hook = enc.visual.transformer.resblocks[0].mlp.c_fc.register_forward_pre_hook(
            lambda m, a, seen=seen: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
        with torch.no_grad():
            enc(images[task])
        hook.remove()
        xs.append(torch.cat(seen))
    a = torch.cat([x / len(x) ** 0.5 for x in xs])
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    b = torch.cat([x @ fts[i][key].double().T / len(x) ** 0.5 for i, x in enumerate(xs)])
    torch.testing.assert_close(got[key].double(), torch.linalg.lstsq(a, b).solution.T, rtol=1e-4, atol=1e-5)
    assert "regmean" in (tmp_path / "m" / "README.md").read_text()


def test_adamerging_through_the_cli_lowers_the_entropy_and_reports_its_coefficients(world, tmp_path):
    r = world
    res = runner.invoke(app, ["merge", str(r / "base"), str(r / "ft0"), str(r / "ft1"), "-o", str(tmp_path / "m"),
                              "--method", "adamerging", "--heads", str(r / "heads.safetensors"), "--shadow-per-task",
                              f"a={r / 'a'}", "--shadow-per-task", f"b={r / 'b'}", "--steps", "25", "--lr", "0.05",
                              "--device", "cpu", "-q", "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    learned = json.loads((tmp_path / "m.json").read_text())["learned"]
    assert learned["entropy_last"] < learned["entropy_first"]
    lams = torch.tensor(list(learned["lambdas"].values()))  # (tensors, inputs)
    assert lams.shape[1] == 2 and float(lams.min()) >= 0 and float(lams.max()) <= 1 and float(lams.std()) > 0
    # the written model is θ0 + Σ λ τ with the reported coefficients
    base = load_file(r / "base" / "model.safetensors")
    fts = [load_file(r / f"ft{i}" / "model.safetensors") for i in range(2)]
    got = load_file(tmp_path / "m" / "model.safetensors")
    for name, (l0, l1) in learned["lambdas"].items():
        k = name.removeprefix("visual.")
        torch.testing.assert_close(got[k], base[k] + l0 * (fts[0][k] - base[k]) + l1 * (fts[1][k] - base[k]),
                                   rtol=1e-5, atol=1e-6)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "What AdaMerging learned" in card and "transformer.resblocks.0.mlp.c_fc.weight" in card


BAD = {
    "a task with no folder": (["--method", "regmean", "--inputs-per-task", "a=A"], "one --inputs-per-task per input"),
    "an empty folder": (["--method", "regmean", "--inputs-per-task", "a=A", "--inputs-per-task", "b=EMPTY"],
                        "contains no images"),
    "no heads": (["--method", "adamerging", "--shadow-per-task", "a=A"], "needs --heads"),
    "a task without a head": (["--method", "adamerging", "--heads", "HEADS", "--shadow-per-task", "c=A"],
                              "no head for task 'c'"),
    "a folder for another method": (["--method", "ties", "--shadow-per-task", "a=A"],
                                    "--shadow-per-task is for adamerging, not ties"),
    "not NAME=DIR": (["--method", "regmean", "--inputs-per-task", "A", "--inputs-per-task", "b=A"], "takes NAME=DIR"),
    "a negative weight": (["--method", "regmean", "--inputs-per-task", "a=A", "--inputs-per-task", "b=A",
                           "--weight", "1", "--weight", "-1"], "takes positive weights"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_are_one_sentence_exit_2_and_nothing_written(world, tmp_path, name):
    r = world
    argv, words = BAD[name]
    subst = {"A": str(r / "a"), "EMPTY": str(r / "empty"), "HEADS": str(r / "heads.safetensors")}
    argv = [next((a.replace(k, v) for k, v in subst.items() if a.endswith(k)), a) for a in argv]
    res = runner.invoke(app, ["merge", str(r / "base"), str(r / "ft0"), str(r / "ft1"), "-o", str(tmp_path / "m"),
                              *(["--device", "cpu"] if "ties" not in argv else []), *argv])
    assert res.exit_code == 2, (name, res.output)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], (name, res.output)
    assert not (tmp_path / "m").exists()


def test_the_streaming_engine_refuses_a_data_method_with_the_way_to_run_it(family, tmp_path):
    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.errors import MergeguardError
    from mergeguard.merge import merge_checkpoints

    base = open_checkpoint(family["base_path"])
    with pytest.raises(MergeguardError, match="--inputs-per-task"):
        merge_checkpoints(base, [open_checkpoint(family["paths"][0])], "regmean", out=tmp_path / "x")
