"""The tiny zoo: layout, determinism, acceptance numbers, and that every command reads it as real data."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergeguard.cli import app
from mergeguard.errors import MergeguardError
from mergeguard.models import zoo
from mergeguard.workflows import zoo as zoo_workflow


def test_layout(tiny_zoo):
    root = Path(tiny_zoo["root"])
    assert (root / "base" / "model.safetensors").exists() and (root / "heads.safetensors").exists()
    for task, classes in tiny_zoo["tasks"].items():
        assert (root / "finetuned" / task / "model.safetensors").exists()
        for split in ("train", "test"):
            assert sorted(p.name for p in (root / "data" / task / split).iterdir()) == sorted(classes)
    assert len(list((root / "shadow").glob("*.png"))) == zoo.SIZES["tiny"].shadow_images
    assert json.loads((root / "zoo.json").read_text())["acceptance"] == tiny_zoo["acceptance"]


def test_acceptance_numbers(tiny_zoo):
    """Fine-tunes learn their task, the pre-trained model is clearly worse, and a task-arithmetic
    merge (λ 0.3) of the clean fine-tunes keeps a good part of the gain."""
    acc = tiny_zoo["acceptance"]
    for task, ca in acc["finetuned"].items():
        assert ca >= zoo_workflow.ACCEPT_FINETUNED, (task, ca)
    assert acc["pretrained_avg"] <= acc["finetuned_avg"] - 0.25
    assert acc["merged_avg"] >= acc["pretrained_avg"] + 0.1


def test_eval_on_the_written_folders_matches_the_recorded_numbers(tiny_zoo, tmp_path):
    root = Path(tiny_zoo["root"])
    task = "colour"
    result = CliRunner().invoke(app, [
        "eval", str(root / "finetuned" / task), "--heads", str(root / "heads.safetensors"),
        "--task", f"{task}={root / 'data' / task / 'test'}", "--device", "cpu", "--json", str(tmp_path / "r.json"),
        "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tasks"][task]["ca"] == tiny_zoo["acceptance"]["finetuned"][task]


def test_same_seed_same_tensors():
    spec = dataclasses.replace(zoo.SIZES["tiny"], pretrain_images=64, pretrain_steps=3)
    a = zoo_workflow.pretrain(spec, seed=5, progress=None).tower_state_dict()
    b = zoo_workflow.pretrain(spec, seed=5, progress=None).tower_state_dict()
    c = zoo_workflow.pretrain(spec, seed=6, progress=None).tower_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_own_group_takes_a_class_out_of_its_look_alike_pair():
    from mergeguard.data import procedural

    groups = procedural.coarse_groups((("colour", 3),))
    yellow = groups["colour"][3]
    assert [c for c, g in enumerate(groups["colour"]) if g == yellow] == [3]  # yellow alone
    assert [c for c, g in enumerate(groups["colour"]) if g == groups["colour"][0]] == [0]  # red, its partner, alone
    for name, g in procedural.COARSE.items():  # every other pair as it was
        pairs = {tuple(c for c in range(len(g)) if g[c] == k) for k in set(g)}
        mine = {tuple(c for c in range(len(g)) if groups[name][c] == k) for k in set(groups[name])}
        assert pairs - {(0, 3)} <= mine if name == "colour" else pairs == mine
    assert procedural.coarse_groups() == procedural.COARSE
    with pytest.raises(ValueError, match="no class 6"):
        procedural.coarse_groups((("colour", 6),))
    # pre-training on those groups is another pre-training (the captions differ)
    spec = dataclasses.replace(zoo.SIZES["tiny"], pretrain_images=64, pretrain_steps=3)
    a = zoo_workflow.pretrain(spec, seed=5, progress=None).tower_state_dict()
    own = dataclasses.replace(spec, own_group=(("colour", 3),))
    b = zoo_workflow.pretrain(own, seed=5, progress=None).tower_state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_zoo_build_reuses_a_built_zoo(tiny_zoo):
    result = CliRunner().invoke(app, ["zoo", "build", "--out", tiny_zoo["root"], "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cached"] is True


def fake_zoo(folder, by: str, size: str = "tiny", seed: int = 0) -> dict:
    """What a finished build leaves in `folder` (every entry of a zoo, tiny stand-ins)."""
    folder.mkdir(exist_ok=True)
    for name in ("base", "data", "finetuned", "shadow"):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "data.png").write_text(by)
    (folder / "heads.safetensors").write_text(by)
    info = {"version": zoo.ZOO_VERSION, "size": size, "seed": seed, "by": by}
    (folder / "zoo.json").write_text(json.dumps(info))
    return info


def test_a_concurrent_build_does_not_delete_the_finished_zoo(tmp_path, monkeypatch):
    """Two processes building the same cache: the one that finishes second keeps the first one's
    copy (which the first may be reading) instead of deleting it and renaming its own into place."""
    root = tmp_path / "zoo"

    def build_while_another_process_finishes(tmp, spec, size, seed, progress):
        fake_zoo(root, "the other process")
        return fake_zoo(tmp, "this process")

    monkeypatch.setattr(zoo_workflow, "_build", build_while_another_process_finishes)
    info = zoo_workflow.build_zoo(root, size="tiny")
    assert info["by"] == "the other process" and info["cached"] is True
    assert (root / "data" / "data.png").read_text() == "the other process"
    assert not list(tmp_path.glob(".zoo.tmp-*"))  # our copy is cleaned up
    # with --force the new build replaces it, as before
    info = zoo_workflow.build_zoo(root, size="tiny", force=True)
    assert info["by"] == "this process" and json.loads((root / "zoo.json").read_text())["by"] == "this process"
    assert (root / "data" / "data.png").read_text() == "this process"


def test_force_rebuilds_a_zoo_never_someone_elses_folder(tmp_path, monkeypatch):
    """--force replaces a zoo; a folder that is not one is refused, and a zoo of another size or seed is
    not returned as the one asked for."""

    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.txt").write_text("mine")
    with pytest.raises(MergeguardError, match="is not a zoo"):
        zoo_workflow.build_zoo(mine, size="tiny", force=True)
    assert (mine / "thesis.txt").read_text() == "mine"
    # a zoo.json is not enough: `zoo build --json proj/zoo.json` writes one beside the user's files
    monkeypatch.setattr(zoo_workflow, "_build", lambda tmp, spec, size, seed, progress: fake_zoo(tmp, "built"))
    result = CliRunner().invoke(app, ["zoo", "build", "--out", str(tmp_path / "z"), "--json", str(mine / "zoo.json"),
                                      "-q"])
    assert result.exit_code == 0 and json.loads((mine / "zoo.json").read_text())["size"] == "tiny", result.output
    for force in (False, True):
        with pytest.raises(MergeguardError, match="is not a zoo"):
            zoo_workflow.build_zoo(mine, size="tiny", force=force)
    assert (mine / "thesis.txt").read_text() == "mine"
    # a report kept beside a zoo leaves it usable, but --force will not delete it with the zoo
    (tmp_path / "z" / "report.json").write_text("{}")
    assert zoo_workflow.build_zoo(tmp_path / "z", size="tiny")["cached"] is True
    with pytest.raises(MergeguardError, match=r"did not write \(report.json\)"):
        zoo_workflow.build_zoo(tmp_path / "z", size="tiny", force=True)
    (tmp_path / "z" / "report.json").unlink()
    # a folder missing an entry of a build is not one
    shutil.rmtree(tmp_path / "z" / "shadow")
    assert not zoo.is_zoo(tmp_path / "z")
    (tmp_path / "z" / "shadow").mkdir()
    # a zoo given as a relative path, even '.', is rebuilt in place
    monkeypatch.chdir(tmp_path / "z")
    assert zoo_workflow.build_zoo(".", size="tiny", force=True)["by"] == "built"
    assert json.loads((tmp_path / "z" / "zoo.json").read_text())["by"] == "built"
    fake_zoo(tmp_path / "other", "other", size="small", seed=5)
    other = tmp_path / "other"
    with pytest.raises(MergeguardError, match="holds the small zoo with seed 5"):
        zoo_workflow.build_zoo(other, size="tiny", seed=0)
