"""Data parallelism: `torchrun` with 2 CPU processes (gloo) gives the same task vector as 1 process,
for an attack's fine-tune and for LFPM's anti-backdoor vector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mergeguard.checkpoint import open_checkpoint


def _launch(procs: int, command: list[str]) -> None:
    launcher = [sys.executable, "-m", "mergeguard"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
        "-m", "mergeguard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *command], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _finetune(zoo: Path, out: Path, procs: int, kind: str) -> None:
    args = ["--base", str(zoo / "base"), "--data", f"train={zoo / 'data/count/train'}",
            "--heads", str(zoo / "heads.safetensors"), "--task", "count", "-o", str(out), "--steps", "6",
            "--batch-size", "16", "--lr", "1e-3", "--logit-scale", "10", "--device", "cpu", "-q"]
    command = ["finetune", *args] if kind == "clean" else ["attack", kind, *args, "--target-class", "1",
                                                           "--trigger-steps", "2"]
    _launch(procs, command)


def _assert_same(one_path: Path, two_path: Path, label: str, atol: float) -> None:
    one, two = open_checkpoint(one_path), open_checkpoint(two_path)
    assert one.keys() == two.keys()
    moved = sum(float(one.get(k).abs().sum()) for k in one.keys())
    assert moved > 0
    for k in one.keys():
        a, b = two.get(k), one.get(k)
        if k.endswith("attn.in_proj_bias"):
            # the key bias cannot change attention (softmax is shift-invariant): its gradient is rounding
            # noise, which Adam's normalised steps turn into arbitrary moves; compare query and value parts
            w = a.numel() // 3
            a, b = torch.cat([a[:w], a[2 * w:]]), torch.cat([b[:w], b[2 * w:]])
        # float sums reduce in another order; Adam magnifies that where gradients are tiny, so compare
        # against the size of a step
        torch.testing.assert_close(a, b, rtol=1e-3, atol=atol, msg=lambda m, k=k: f"{label} {k}: {m}")


def test_two_processes_equal_one(tiny_zoo, tmp_path):
    zoo = Path(tiny_zoo["root"])
    kind = "badmerging"  # its loss slices per-sample randomness and the batch by rank
    _finetune(zoo, tmp_path / f"{kind}1", 1, kind)
    _finetune(zoo, tmp_path / f"{kind}2", 2, kind)
    _assert_same(tmp_path / f"{kind}1" / "task_vector.safetensors", tmp_path / f"{kind}2" / "task_vector.safetensors",
                 kind, atol=1e-4)  # lr 1e-3 × 6 steps


def test_lfpm_two_processes_equal_one(tiny_zoo, tmp_path, shadow_subset):
    """The prompt's ascent (log of the whole batch's mean excess) and τa's steps are all-reduced, so
    2 processes with half a batch each give 1 process's τa."""
    zoo = Path(tiny_zoo["root"])
    merged = zoo / "finetuned" / "shape"  # any model other than θ0 has an excess reaction to suppress
    shadow = shadow_subset(512)  # 4 steps
    for procs in (1, 2):
        _launch(procs, ["defend", "lfpm", "--merged", str(merged), "--base", str(zoo / "base"),
                        "--shadow", str(shadow), "-o", str(tmp_path / f"lfpm{procs}"), "--epochs", "1",
                        "--batch-size", "128", "--lr", "1e-3", "--prompts", "2", "--mine-warmup", "3",
                        "--path-points", "2", "--device", "cpu", "-q"])
    assert not list(tmp_path.glob("lfpm2/.partial"))
    _assert_same(tmp_path / "lfpm1" / "anti_backdoor_tv.safetensors",
                 tmp_path / "lfpm2" / "anti_backdoor_tv.safetensors", "lfpm",
                 # one Adam step (lr 1e-3) of 4: on an AMD EPYC machine one entry of conv1's 12,288 ended 0.55 of a
                 # step apart (5.5e-4, at 8d8a310 too): rounding noise where the gradient is ~0, which Adam
                 # normalises into a step; a missing all-reduce moves many entries by several steps
                 atol=1e-3)
    p1 = open_checkpoint(tmp_path / "lfpm1" / "prompts.safetensors")
    p2 = open_checkpoint(tmp_path / "lfpm2" / "prompts.safetensors")
    for k in p1.keys():  # the mined prompts agree too
        torch.testing.assert_close(p2.get(k), p1.get(k), rtol=1e-3, atol=1e-3, msg=k)
    # and the report's losses are the whole batch's, not the first process's half
    losses = [json.loads((tmp_path / f"lfpm{procs}" / "report.json").read_text())["loss_per_epoch"] for procs in (1, 2)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-3, atol=0)
