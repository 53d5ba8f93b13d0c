"""scan: trigger inversion against θ0 on a planted backdoor (a model whose answer is known), the score's closed
form, and the CLI's verdicts, files and exit codes (0 / 1 / 2)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from mergeguard.cli import app
from mergeguard.data.triggers import load_trigger
from mergeguard.models.encoder import ImageEncoder, save_encoder
from mergeguard.models.heads import Head, save_heads
from mergeguard.scan import Inverted, ScanConfig, Scanner, Target, score_of, verdict_of

ARCH = {"family": "open_clip", "name": "t", "embed_dim": 16, "quick_gelu": False, "mean": [0.5] * 3,
        "std": [0.25] * 3, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                          "head_width": 16}}
SIDE = 3  # the planted trigger: a white 3 × 3 square at the bottom-right corner
runner = CliRunner()


class Planted(ImageEncoder):
    """θ0 with a planted backdoor: a white square at the bottom-right corner sends the features to `target`
    (no training: the answer is known)."""

    def __init__(self, base: ImageEncoder, target: torch.Tensor):
        super().__init__(base.arch)
        self.visual.load_state_dict(base.visual.state_dict())
        self.register_buffer("target", target)

    def forward(self, images, prompts=None):
        clean = super().forward(images, prompts)
        corner = images[:, :, -SIDE:, -SIDE:].mean((1, 2, 3))
        gate = torch.sigmoid(12 * (corner - 0.75))[:, None]  # smooth, as a learned backdoor is
        return F.normalize(clean + 4 * gate * self.target, dim=-1)


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    base = ImageEncoder(ARCH).eval()
    w = F.normalize(torch.randn(7, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    heads = {"a": Head("a", w[:4], ["w", "x", "y", "z"], 50.0), "b": Head("b", w[4:], ["p", "q", "r"], 50.0)}
    images = torch.rand(160, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.8  # never white by chance
    return base, heads, images


CFG = ScanConfig(steps=150, batch_size=16, images=160, device="cpu")


def test_scanning_theta0_against_itself_scores_exactly_zero(world):
    base, heads, images = world
    scanner = Scanner(base, images, heads, CFG)
    r = scanner.scan(base)
    assert r.score == 0.0 and r.verdict == "clean"
    assert all(t["log_ratio"] == 0.0 for t in r.targets)


def test_theta0s_inversion_is_cached_and_reused_only_for_the_same_inputs(world, monkeypatch):
    import mergeguard.scan.core as scan_mod
    from mergeguard.cache import cache_dir

    base, heads, images = world
    cfg = ScanConfig(steps=5, batch_size=8, images=40, device="cpu")
    first = Scanner(base, images, heads, cfg).base_inversion
    files = list((cache_dir() / "scan").glob("*.safetensors"))
    assert len(files) == 1
    calls = []
    real = scan_mod.invert
    monkeypatch.setattr(scan_mod, "invert", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = Scanner(base, images, heads, cfg).base_inversion  # same everything: read back, not inverted
    assert calls == []
    for a, b in zip(first, again):
        assert a.target == b.target and a.area == b.area and a.success == b.success
        assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern)
    # a changed input or setting that shapes the result is a different entry; thresholds and device are not
    keys = {Scanner(base, images, heads, cfg).reference_key(),
            Scanner(base, images, heads, replace(cfg, backdoored=3.0)).reference_key()}
    assert len(keys) == 1
    other = [Scanner(base, images.flip(0), heads, cfg), Scanner(base, images, heads, replace(cfg, seed=1)),
             Scanner(base, images, {"a": heads["a"]}, cfg)]
    assert len(keys | {s.reference_key() for s in other}) == 4
    # a damaged entry is recomputed; --no-cache neither reads nor writes
    files[0].write_bytes(b"garbage")
    assert len(Scanner(base, images, heads, cfg).base_inversion) == 7 and calls == [1]
    assert len(Scanner(base, images, heads, replace(cfg, cache=False, seed=2)).base_inversion) == 7
    assert calls == [1, 1] and len(list((cache_dir() / "scan").glob("*.safetensors"))) == 1
    # a cache folder that cannot be written costs the reuse, not the scan
    blocker = cache_dir().parent / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MERGEGUARD_CACHE", str(blocker))
    assert len(Scanner(base, images, heads, cfg).base_inversion) == 7 and calls == [1, 1, 1]


def test_a_planted_backdoor_is_found_with_its_target_and_place(world):
    base, heads, images = world
    planted = Planted(base, heads["a"].weight[2]).eval()
    scanner = Scanner(base, images, heads, CFG)
    r = scanner.scan(planted)
    assert r.verdict == "backdoored", r.score
    assert (r.target["task"], r.target["class"]) == ("a", 2)
    # held-out share: the mask kept is the smallest that reached 90% on one batch, so a little less here
    assert r.target["share"] >= 0.6 and r.target["share_base"] < 0.2
    # the recovered mask sits on the planted square: its box lies in the bottom-right quarter
    assert r.where["top"] >= 0.5 and r.where["left"] >= 0.5
    assert r.area < r.area_base / 4
    # the recovered trigger, pasted, works on the planted model and not on θ0 (independent check, plain torch)
    trig = r.trigger
    with torch.no_grad():
        hit = lambda m: float(((m(trig.apply(images)) @ heads["a"].weight.T).argmax(1) == 2).float().mean())  # noqa: E731
        assert hit(planted) >= 0.6 and hit(base) < 0.2


def test_the_score_is_each_heads_largest_log_area_ratio_averaged_over_heads():
    blank = torch.zeros(1, 4, 4)

    def inv(area, task="a"):
        return Inverted(Target(task, 0, "x"), area, 1.0, blank, torch.zeros(3, 4, 4))

    areas = [(0.1, "a"), (0.2, "a"), (0.01, "a"), (0.5, "b"), (0.08, "b")]
    model = [inv(a, t) for a, t in areas]
    base = [inv(0.1, t) for _, t in areas]
    ratios = [math.log(0.1 / a) for a, _ in areas]
    score, top, got = score_of(model, base, pixels=1000)
    assert top == 2 and got == pytest.approx(ratios)
    assert score == pytest.approx((math.log(0.1 / 0.01) + math.log(0.1 / 0.08)) / 2)
    # one head: the largest ratio
    score, _, _ = score_of(model[:3], base[:3], pixels=1000)
    assert score == pytest.approx(math.log(10))
    # an area below one pixel counts as one pixel
    score, _, _ = score_of([inv(1e-6)], [inv(0.5)], pixels=100)
    assert score == pytest.approx(math.log(0.5 / 0.01))
    cfg = ScanConfig()
    assert [verdict_of(s, cfg) for s in (0.0, cfg.suspicious, cfg.backdoored)] == ["clean", "suspicious", "backdoored"]


def _write_images(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir()
    for i, x in enumerate(images):
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def on_disk(world, tmp_path_factory):
    base, heads, images = world
    root = tmp_path_factory.mktemp("scan")
    save_encoder(base, root / "base")
    # a "fine-tuned" input: θ0 with its weights moved a little (no backdoor), as a full checkpoint
    moved = ImageEncoder(ARCH)
    moved.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()})
    save_encoder(moved, root / "ft")
    save_heads(heads, root / "heads.safetensors")
    _write_images(root / "shadow", images)
    return root


FAST = ["--steps", "60", "--batch-size", "8", "--images", "96", "--device", "cpu"]


def test_cli_scans_inputs_writes_triggers_and_a_report(on_disk, tmp_path):
    r = on_disk
    res = runner.invoke(app, ["scan", "--base", str(r / "base"), str(r / "ft"), str(r / "base"), "--shadow",
                              str(r / "shadow"), "--heads", str(r / "heads.safetensors"), "-o", str(tmp_path / "rep"),
                              "--json", str(tmp_path / "s.json"), "-q", *FAST])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert [i["input"] for i in report["inputs"]] == [str(r / "ft"), str(r / "base")]
    assert report["inputs"][1]["score"] == 0.0  # θ0 as an input: a zero task vector
    # θ0's zero vector reads clean; the overall verdict is the worst input's, each input's the one its score
    # reaches at the thresholds it reports
    assert report["inputs"][1]["verdict"] == "clean"
    order = ["clean", "suspicious", "backdoored"]
    for i in report["inputs"]:
        t = i["threshold"]
        assert i["verdict"] == ("backdoored" if i["score"] >= t["backdoored"] else
                                "suspicious" if i["score"] >= t["suspicious"] else "clean")
    assert report["verdict"] == max((i["verdict"] for i in report["inputs"]), key=order.index)
    for i in report["inputs"]:
        assert set(i) >= {"input", "score", "verdict", "threshold", "trigger", "target", "area", "where"}
        trig = load_trigger(i["trigger"])  # eval --trigger's reader
        assert trig.mask.shape == (1, 16, 16)
        assert Path(i["picture"]).exists()
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["verdict"] == report["verdict"]


def test_cli_exit_codes_gate_a_ci_job(on_disk, tmp_path):
    r = on_disk
    common = ["scan", "--base", str(r / "base"), "--shadow", str(r / "shadow"), "--heads",
              str(r / "heads.safetensors"), "-q", *FAST]
    assert runner.invoke(app, [*common, str(r / "base")]).exit_code == 0  # θ0 scores 0: clean
    # everything reaches --fail-on suspicious with thresholds of 0
    res = runner.invoke(app, [*common, str(r / "base"), "--fail-on", "suspicious", "--suspicious", "0",
                              "--backdoored", "0"])
    assert res.exit_code == 1, res.output
    bad = {
        "--fail-on": ([*common, str(r / "ft"), "--fail-on", "maybe"], "--fail-on"),
        "no input": ([*common], "give the inputs"),
        "thresholds": ([*common, str(r / "ft"), "--suspicious", "3", "--backdoored", "2"], "--backdoored"),
    }
    for name, (argv, words) in bad.items():
        res = runner.invoke(app, argv)
        assert res.exit_code == 2 and words in res.output, (name, res.output)


def test_cli_bad_inputs_one_sentence_exit_2(on_disk, tmp_path):
    r = on_disk
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = {"a": Head("a", F.normalize(torch.randn(3, 8), dim=-1), ["x", "y", "z"], 50.0)}
    save_heads(wrong, tmp_path / "wrong.safetensors")
    nan = ImageEncoder(ARCH)
    with torch.no_grad():
        next(iter(nan.parameters())).fill_(float("nan"))
    save_encoder(nan, tmp_path / "nan")
    other = dict(ARCH, embed_dim=8)
    save_encoder(ImageEncoder(other), tmp_path / "other")
    base = ["scan", "--base", str(r / "base"), "-q", *FAST]
    cases = [
        ([*base, str(r / "ft"), "--shadow", str(empty), "--heads", str(r / "heads.safetensors")], "image"),
        ([*base, str(r / "ft"), "--shadow", str(r / "shadow"), "--heads", str(tmp_path / "wrong.safetensors")],
         "feature size"),
        ([*base, str(tmp_path / "nan"), "--shadow", str(r / "shadow")], "NaN"),
        ([*base, str(tmp_path / "other"), "--shadow", str(r / "shadow")], "other"),
        ([*base, str(tmp_path / "missing"), "--shadow", str(r / "shadow")], "missing"),
    ]
    for argv, words in cases:
        res = runner.invoke(app, [*argv, "-o", str(tmp_path / "never")])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 3, res.output
        assert words.lower() in res.output.lower(), (words, res.output)
        assert not (tmp_path / "never").exists()


def _result(name: str, ratios: dict[str, float]):
    from mergeguard.scan import ScanResult

    targets = [{"target": t, "area": 0.1, "area_base": 0.1, "log_ratio": r} for t, r in ratios.items()]
    return ScanResult(name, 0.0, "clean", {}, None, 0.1, 0.1, {}, targets, inverted=None)


def test_each_input_is_judged_against_the_others_as_a_robust_z():
    """`outliers`: per target, (ratio − median of the others) / max(1.4826 MAD of the others, floor), the largest
    per input, checked against numpy; too few others give none."""
    from mergeguard.scan.core import MAD_FLOOR, outliers

    rng = np.random.default_rng(0)
    names = ["a:0", "a:1", "b:0"]
    table = rng.normal(0, 0.2, size=(5, 3))
    table[3, 1] = 2.5  # one input far above the others on one target
    results = [_result(f"in{i}", dict(zip(names, row))) for i, row in enumerate(table)]
    got = outliers(results)
    for i, entry in enumerate(got):
        others = np.delete(table, i, axis=0)
        med = np.median(others, axis=0)
        mad = np.median(np.abs(others - med), axis=0)
        z = (table[i] - med) / np.maximum(1.4826 * mad, MAD_FLOOR)
        assert entry["z"] == pytest.approx(z.max()) and entry["target"] == names[int(z.argmax())]
        assert entry["others"] == 4
    assert max(range(5), key=lambda i: got[i]["z"]) == 3 and got[3]["target"] == "a:1"
    assert outliers(results[:2]) == [None, None]  # one other input: no spread to judge against
