"""LFPM through the CLI on the tiny zoo: outputs, τa's relation to the models, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from mergeguard.checkpoint import open_checkpoint
from mergeguard.cli import app


def test_defend_lfpm_writes_model_vector_and_report(tiny_zoo, tmp_path):
    z = Path(tiny_zoo["root"])
    runner = CliRunner()
    merged = tmp_path / "merged"
    inputs = [str(z / "finetuned" / t) for t in tiny_zoo["tasks"]]
    assert runner.invoke(app, ["merge", str(z / "base"), *inputs, "-o", str(merged), "-q"]).exit_code == 0
    out = tmp_path / "defended"
    result = runner.invoke(app, ["defend", "lfpm", "--merged", str(merged), "--base", str(z / "base"),
                                 "--shadow", str(z / "shadow"), "-o", str(out), "--epochs", "1", "--batch-size", "64",
                                 "--lr", "1e-3", "--device", "cpu", "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == len(list((z / "shadow").glob("*.png"))) // 64
    assert report["lambda_eff_start"] is not None and report["lambda_eff_end"] is not None
    assert report["tau_norm"] > 0 and len(report["loss_per_epoch"]) == 1
    defended = open_checkpoint(out / "model.safetensors")
    tau = open_checkpoint(out / "anti_backdoor_tv.safetensors")
    m = open_checkpoint(merged)
    assert tau.is_task_vector and "mergeguard.arch" in defended.metadata
    for k in tau.keys():
        torch.testing.assert_close(m.get(k) + tau.get(k), defended.get(k), rtol=0, atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "anti_backdoor_tv.safetensors", "model.safetensors",
                                                     "report.json"]
