"""Data parallelism: `torchrun` with 2 CPU processes (gloo) gives the same task vector as 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from mergeguard.checkpoint import open_checkpoint


def _finetune(zoo: Path, out: Path, procs: int, kind: str) -> None:
    args = ["--base", str(zoo / "base"), "--data", f"train={zoo / 'data/count/train'}",
            "--heads", str(zoo / "heads.safetensors"), "--task", "count", "-o", str(out), "--steps", "6",
            "--batch-size", "16", "--lr", "1e-3", "--logit-scale", "10", "--device", "cpu", "-q"]
    command = ["finetune", *args] if kind == "clean" else ["attack", kind, *args, "--target-class", "1",
                                                           "--trigger-steps", "2"]
    launcher = [sys.executable, "-m", "mergeguard"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
        "-m", "mergeguard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *command], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_equal_one(tiny_zoo, tmp_path):
    zoo = Path(tiny_zoo["root"])
    for kind in ("badmerging",):  # its loss slices per-sample randomness and the batch by rank
        _finetune(zoo, tmp_path / f"{kind}1", 1, kind)
        _finetune(zoo, tmp_path / f"{kind}2", 2, kind)
        one = open_checkpoint(tmp_path / f"{kind}1" / "task_vector.safetensors")
        two = open_checkpoint(tmp_path / f"{kind}2" / "task_vector.safetensors")
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
            # against the size of a step (lr 1e-3 × 6 steps)
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=f"{kind} {k}")
