"""The README's quick start, run as written by bash in a fresh folder, offline, on the tiny zoo: its Hub ids
resolve from a Hugging Face cache laid out as `huggingface_hub` writes one (the zoo's θ0 and two of its clean
fine-tunes as `openai/clip-vit-base-patch32@main`, `someone/clip-vit-b32-cars@REV` and `...-dtd@REV`), its
folders are the zoo's. One line is replaced: `mergeguard heads` needs CLIP's text tower from the network, so
the zoo's heads for two tasks are written as `heads.safetensors` under the README's task names instead."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mergeguard.models.heads import load_heads, save_heads

REPO = Path(__file__).resolve().parents[1]
AS_TASKS = {"cars": "colour", "dtd": "shape"}  # the README's task name -> the zoo task that plays it


def quick_start() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _hub_repo(cache: Path, repo: str, revision: str, commit: str, model: Path) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(model, folder / "snapshots" / commit / "model.safetensors")
    (folder / "refs").mkdir()
    (folder / "refs" / revision).write_text(commit)


def test_the_readme_quick_start_runs_as_written_in_a_fresh_folder(tiny_zoo, tmp_path):
    z = Path(tiny_zoo["root"])
    script = quick_start()
    heads_lines = [line for line in script.splitlines() if line.startswith("mergeguard heads ")]
    assert len(heads_lines) == 1 and "--task cars=cars --task dtd=dtd -o heads.safetensors" in heads_lines[0]
    heads = load_heads(z / "heads.safetensors")
    folder = tmp_path / "fresh folder"  # a space in the path, as users have
    folder.mkdir()
    save_heads({name: type(heads[task])(name, heads[task].weight, heads[task].classnames, heads[task].scale)
                for name, task in AS_TASKS.items()}, tmp_path / "heads.safetensors")
    script = script.replace(heads_lines[0], f'cp "{tmp_path}/heads.safetensors" heads.safetensors')

    cache = tmp_path / "hub"
    _hub_repo(cache, "openai/clip-vit-base-patch32", "main", "a" * 40, z / "base" / "model.safetensors")
    for name, task in AS_TASKS.items():
        _hub_repo(cache, f"someone/clip-vit-b32-{name}", "REV", name[0] * 40,
                  z / "finetuned" / task / "model.safetensors")
    (folder / "unlabeled_images").symlink_to(z / "shadow")
    for name, task in AS_TASKS.items():
        (folder / "data" / name).mkdir(parents=True)
        (folder / "data" / name / "test").symlink_to(z / "data" / task / "test")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] and [s["step"] for s in report["steps"]] == [
        "scan_inputs", "merge", "defend", "scan_result", "eval"]
    assert {p.name for p in (folder / "release").iterdir()} >= {"model.safetensors", "README.md", "report.md"}
    lock = (folder / "mergeguard.lock.yaml").read_text()
    assert "commit: " + "c" * 40 in lock and "commit: " + "d" * 40 in lock and "commit: " + "a" * 40 in lock
