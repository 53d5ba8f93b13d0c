"""`mergeguard lock` and `mergeguard gate`: pins checked against hashlib's own sha256, a release written only when
every gate passes (its model checked against task arithmetic in plain torch), a changed byte refused, one sentence
for every mistake in a policy, a rerun that redoes no step, and a poisoned input stopped at the scan gate."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ENCODER_CLASSES, encoder_family
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergeguard.cli import app

runner = CliRunner()
CLASSES = ENCODER_CLASSES
FAST_SCAN = {"steps": 20, "batch_size": 8, "images": 48}


def _png(path: Path, x: torch.Tensor) -> None:
    Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """θ0 and two fine-tunes of a 16-px encoder (as folders), heads for two tasks, shadow and test images."""
    root = encoder_family(tmp_path_factory.mktemp("gate"), moved=0.02)
    g = torch.Generator().manual_seed(2)
    (root / "shadow").mkdir()
    for i in range(48):
        _png(root / "shadow" / f"{i}.png", torch.rand(3, 16, 16, generator=g))
    for task, names in CLASSES.items():
        for name in names:
            folder = root / "test" / task / name
            folder.mkdir(parents=True)
            for i in range(4):
                _png(folder / f"{i}.png", torch.rand(3, 16, 16, generator=g))
    return root


@pytest.fixture
def project(world, tmp_path) -> Path:
    """A copy of the world as a user's project folder, with a lock file written by `mergeguard lock`."""
    root = tmp_path / "project"
    shutil.copytree(world, root)
    res = runner.invoke(app, ["lock", "--base", str(root / "base"), str(root / "ft0"), str(root / "ft1"), "-o",
                              str(root / "mergeguard.lock.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    return root


def _policy(root: Path, **changes) -> Path:
    policy = {"lock": "mergeguard.lock.yaml", "shadow": "shadow", "heads": "heads.safetensors", "device": "cpu",
              "merge": {"method": "task_arithmetic", "lam": 0.4},
              "scan_inputs": {"fail_on": "backdoored", **FAST_SCAN},
              "scan_result": {"fail_on": "backdoored", **FAST_SCAN},
              "eval": {"tasks": {"a": "test/a", "b": "test/b"}, "min_ca": 0.0, "max_asr": 1.0},
              "release": "release"}
    policy.update(changes)
    path = root / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lock_pins_every_file_read_with_its_sha256(project):
    lock = yaml.safe_load((project / "mergeguard.lock.yaml").read_text())
    assert lock["mergeguard_lock"] == 1
    pins = [lock["base"], *lock["inputs"]]
    assert [p["spec"] for p in pins] == ["base", "ft0", "ft1"]  # relative to the lock file's folder
    for p in pins:
        folder = project / p["spec"]
        read = {f.name for f in folder.iterdir() if f.suffix in (".safetensors", ".json")}
        assert set(p["files"]) == read and "model.safetensors" in read
        assert p["files"] == {name: _sha256(folder / name) for name in read}
        assert "hub" not in p


def test_a_passing_gate_writes_the_release_and_a_rerun_redoes_no_step(project):
    policy = _policy(project)
    res = runner.invoke(app, ["gate", str(policy), "--json", str(project / "gate.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((project / "gate.json").read_text())
    assert report["passed"] and report["failed_step"] is None
    assert [s["step"] for s in report["steps"]] == ["scan_inputs", "merge", "scan_result", "eval"]
    assert not any(s["reused"] for s in report["steps"])
    release = project / "release"
    assert {"model.safetensors", "README.md", "report.json", "report.md"} <= {p.name for p in release.iterdir()}
    # the released model is task arithmetic of the pinned inputs, computed here in plain torch
    theta0 = load_file(project / "base" / "model.safetensors")
    fts = [load_file(project / f"ft{i}" / "model.safetensors") for i in range(2)]
    got = load_file(release / "model.safetensors")
    for k, v in theta0.items():
        if v.is_floating_point():
            want = v + 0.4 * sum(ft[k] - v for ft in fts)
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    card = (release / "README.md").read_text()
    lock = yaml.safe_load((project / "mergeguard.lock.yaml").read_text())
    for p in [lock["base"], *lock["inputs"]]:
        assert p["spec"] in card and p["files"]["model.safetensors"][:16] in card
    for c in report["checks"]:
        assert c["passed"] and c["what"] in card
    assert {c["step"] for c in report["checks"]} == {"scan_inputs", "scan_result", "eval"}
    assert len([c for c in report["checks"] if c["step"] == "scan_inputs"]) == 2  # one per input

    # the same policy and inputs again: every step reused, none run (the progress log says which)
    res = runner.invoke(app, ["gate", str(policy), "--overwrite", "--json", str(project / "again.json")])
    assert res.exit_code == 0, res.output
    again = json.loads((project / "again.json").read_text())
    assert all(s["reused"] for s in again["steps"])
    steps_said = [line for line in res.output.splitlines() if line.startswith("gate [")]
    assert len(steps_said) == 4 and all(": reused" in line for line in steps_said), res.output
    assert "inverting triggers" not in res.output and "merging" not in res.output
    assert again["checks"] == report["checks"]

    # a changed setting reruns the steps from the first one it changes: the scans of the inputs are kept
    _policy(project, merge={"method": "task_arithmetic", "lam": 0.3})
    res = runner.invoke(app, ["gate", str(policy), "--overwrite", "--json", str(project / "third.json")])
    assert res.exit_code == 0, res.output
    third = json.loads((project / "third.json").read_text())
    assert [s["reused"] for s in third["steps"]] == [True, False, False, False]


def test_the_defend_step_runs_lfpm_on_the_merge_and_its_output_is_released(project):
    policy = _policy(project, defend={"epochs": 1, "batch_size": 16, "force": True, "scan": FAST_SCAN})
    res = runner.invoke(app, ["gate", str(policy), "--json", str(project / "gate.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((project / "gate.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["scan_inputs", "merge", "defend", "scan_result", "eval"]
    defend = next(s for s in report["steps"] if s["step"] == "defend")["commands"][0]
    assert "--epochs 1" in defend and "--force" in defend and "--scan-steps 20" in defend and "--heads" in defend
    defended = project / ".mergeguard-gate" / "defend" / "model"
    lfpm = json.loads((defended / "report.json").read_text())
    assert lfpm["steps"] > 0  # it trained (--force), so the released model is LFPM's, not the merge
    got, want = load_file(project / "release" / "model.safetensors"), load_file(defended / "model.safetensors")
    merged = load_file(project / ".mergeguard-gate" / "merge" / "model" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert any(not torch.equal(got[k], merged[k]) for k in got)


def test_a_merge_that_needs_images_takes_them_from_the_policy(project):
    policy = _policy(project, merge={"method": "adamerging", "steps": 3, "shadow_per_task": {"a": "test/a",
                                                                                            "b": "test/b"}},
                     scan_inputs=False, scan_result=False)
    res = runner.invoke(app, ["gate", str(policy), "--json", str(project / "gate.json")])
    assert res.exit_code == 0, res.output
    command = json.loads((project / "gate.json").read_text())["steps"][0]["commands"][0]
    assert "--method adamerging" in command and "--steps 3" in command and "--heads" in command
    assert f"--shadow-per-task a={project / 'test' / 'a'}" in command
    card = (project / ".mergeguard-gate" / "merge" / "model" / "README.md").read_text()
    assert "What AdaMerging learned" in card


def test_a_failed_gate_exits_1_and_writes_no_release(project):
    policy = _policy(project, eval={"tasks": {"a": "test/a", "b": "test/b"}, "min_ca": {"average": 0.0, "a": 1.0}})
    res = runner.invoke(app, ["gate", str(policy), "--json", str(project / "gate.json")])
    assert res.exit_code == 1, res.output
    report = json.loads((project / "gate.json").read_text())
    assert not report["passed"] and report["failed_step"] == "eval" and report["release"] is None
    failed = [c for c in report["checks"] if not c["passed"]]
    assert [c["what"] for c in failed] == ["CA a"] and failed[0]["value"] < 1.0 and failed[0]["limit"] == 1.0
    assert "gate failed: eval: CA a" in res.output
    assert not (project / "release").exists()
    summary = (project / ".mergeguard-gate" / "report.md").read_text()
    assert "FAILED at eval" in summary and "**FAIL**" in summary


def test_a_changed_byte_in_a_pinned_file_is_refused(project):
    target = project / "ft1" / "model.safetensors"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01  # one bit of a weight; same size, and the old time put back
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = runner.invoke(app, ["gate", str(_policy(project))])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip() and not line.startswith("gate:")]
    assert len(lines) == 1 and "does not match its pin" in lines[0] and "model.safetensors" in lines[0], res.output
    assert "ft1" in lines[0]
    assert not (project / "release").exists()
    assert not (project / ".mergeguard-gate" / "scan_inputs").exists()  # nothing ran

    (project / "ft0" / "extra.json").write_text("{}")  # a file the loaders may read, added after the lock
    target.write_bytes(bytes(data))
    res = runner.invoke(app, ["gate", str(_policy(project))])
    assert res.exit_code == 2 and "not pinned" in res.output, res.output


BAD_POLICIES = {
    "unknown key": ({"merg": {}}, "unknown key 'merg'", "Did you mean 'merge'?"),
    "missing path": ({"shadow": "nope"}, "shadow: nope does not exist", ""),
    "a file for a folder": ({"shadow": "heads.safetensors"}, "shadow: heads.safetensors is a file", ""),
    "threshold": ({"eval": {"tasks": {"a": "test/a"}, "max_asr": 5}}, "eval.max_asr must be a fraction", ""),
    "method": ({"merge": {"method": "ties_merging"}}, "unknown merge method 'ties_merging'", "Did you mean 'ties'?"),
    "merge parameter": ({"merge": {"method": "ties", "density": 0.0}}, "merge.density for ties must be in (0, 1]",
                        ""),
    "merge key": ({"merge": {"method": "ties", "densty": 0.2}}, "unknown key 'merge.densty'", "'density'"),
    "defend setting": ({"defend": {"epochs": 0}}, "defend.epochs must be at least 1", ""),
    "nested setting": ({"defend": {"scan": {"steps": 0}}}, "defend.scan.steps must be at least 1", ""),
    "scan key": ({"scan_inputs": {"stepz": 3}}, "unknown key 'scan_inputs.stepz'", "'steps'"),
    "fail_on": ({"scan_result": {"fail_on": "maybe"}}, "scan_result.fail_on must be suspicious or backdoored", ""),
    "min_ca task": ({"eval": {"tasks": {"a": "test/a"}, "min_ca": {"c": 0.5}}}, "eval.min_ca.c names no task", ""),
    "no tasks": ({"eval": {"min_ca": 0.5}}, "eval.tasks must name at least one task", ""),
    "wrong kind": ({"defend": {"epochs": "ten"}}, "defend.epochs must be a whole number (got 'ten')", ""),
    "wrong kind, nested": ({"defend": {"scan": {"lr": "fast"}}}, "defend.scan.lr must be a number (got 'fast')", ""),
    "missing lock": ({"lock": None}, "'lock' is missing", ""),
    "images for another method": ({"merge": {"method": "ties", "shadow_per_task": {"a": "shadow"}}},
                                  "merge.shadow_per_task is for adamerging, not ties", ""),
    "regmean without images": ({"merge": {"method": "regmean"}}, "merge.inputs_per_task must name", ""),
    "not a lock": ({"lock": "heads.safetensors"}, "the lock file", "is not text"),
}


@pytest.mark.parametrize("name", list(BAD_POLICIES))
def test_each_mistake_in_a_policy_is_one_sentence_and_exit_2(project, name):
    change, words, hint = BAD_POLICIES[name]
    policy = _policy(project)
    data = yaml.safe_load(policy.read_text())
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None}
    policy.write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["gate", str(policy)])
    assert res.exit_code == 2, (name, res.output)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and hint in lines[0], (name, res.output)
    assert str(policy) in lines[0] or name in ("not a lock",)
    assert not (project / "release").exists() and not (project / ".mergeguard-gate").exists()


def test_policy_that_is_not_yaml_and_lock_refusals(project, tmp_path):
    bad = project / "bad.yaml"
    bad.write_text("merge: [unclosed\n")
    res = runner.invoke(app, ["gate", str(bad)])
    assert res.exit_code == 2 and "is not valid YAML" in res.output
    res = runner.invoke(app, ["lock", "--base", str(project / "base"), str(project / "ft0"), "-o",
                              str(project / "mergeguard.lock.yaml")])
    assert res.exit_code == 2 and "pass --overwrite" in res.output  # a lock is replaced only on purpose
    res = runner.invoke(app, ["lock", "--base", str(project / "base"), str(project / "nope"), "-o",
                              str(tmp_path / "deep" / "l.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output and not (tmp_path / "deep").exists()
    res = runner.invoke(app, ["lock", "--base", str(project / "base"), str(project / "ft0"), "-o",
                              str(tmp_path / "deep" / "l.yaml"), "-q"])
    assert res.exit_code == 0 and (tmp_path / "deep" / "l.yaml").exists()  # missing folders are made


def test_a_poisoned_input_stops_the_release_at_the_scan_gate(tiny_zoo, tmp_path):
    """A BadNets fine-tune of the tiny zoo's shape task, scanned with the shipped settings: the gate fails at the
    inputs' scan, names it, runs nothing after, and writes no release."""
    z = Path(tiny_zoo["root"])
    res = runner.invoke(app, [
        "attack", "badnets", "--base", str(z / "base"), "--data", f"train={z}/data/shape/train", "--heads",
        str(z / "heads.safetensors"), "--task", "shape", "-o", str(tmp_path / "badnets"), "--target-class", "3",
        "--steps", "150", "--batch-size", "64", "--lr", "1e-3", "--warmup", "10", "--logit-scale", "10",
        "--poison-fraction", "0.2", "--trigger-area", "0.01", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["lock", "--base", str(z / "base"), str(z / "finetuned" / "colour"),
                              str(tmp_path / "badnets"), "-o", str(tmp_path / "mergeguard.lock.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    policy = {"lock": "mergeguard.lock.yaml", "shadow": str(z / "shadow"), "heads": str(z / "heads.safetensors"),
              "device": "cpu", "merge": {"method": "task_arithmetic", "lam": 0.3},
              "scan_inputs": {"fail_on": "backdoored"}, "scan_result": {"fail_on": "backdoored"},
              "eval": {"tasks": {"shape": str(z / "data" / "shape" / "test")}, "min_ca": 0.0}}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    res = runner.invoke(app, ["gate", str(tmp_path / "policy.yaml"), "--json", str(tmp_path / "gate.json")])
    assert res.exit_code == 1, res.output
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["failed_step"] == "scan_inputs" and [s["step"] for s in report["steps"]] == ["scan_inputs"]
    verdicts = {c["what"].split(":")[0]: c["passed"] for c in report["checks"]}
    assert verdicts == {"badnets": False, str(z / "finetuned" / "colour"): True}, report["checks"]
    assert "gate failed: scan_inputs: badnets" in res.output
    assert not (tmp_path / "release").exists()


def test_a_hub_input_is_pinned_to_its_commit_and_checked_there(tmp_path, monkeypatch):
    """A Hub repo (a fake Hugging Face cache, offline) is pinned to the commit its branch named; when the branch
    moves on, the gate still reads the pinned commit, and a byte changed in that commit's file is refused."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from mergeguard.checkpoint import resolve
    from mergeguard.errors import MergeguardError
    from mergeguard.workflows.lock import make_lock, verify

    old, new = "0" * 39 + "1", "f" * 39 + "2"
    repo = tmp_path / "hub" / "models--acme--tiny-vit"
    for commit, value in ((old, 0.0), (new, 5.0)):
        (repo / "snapshots" / commit).mkdir(parents=True)
        save_file({"w": torch.arange(4.0) + value}, repo / "snapshots" / commit / "model.safetensors")
        (repo / "snapshots" / commit / "config.json").write_text(json.dumps({"v": value}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(old)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(resolve, "hub_reachable", lambda timeout=3.0: False)
    save_file({"w": torch.ones(4)}, tmp_path / "ft.safetensors")

    lock = make_lock("acme/tiny-vit", [str(tmp_path / "ft.safetensors")], tmp_path / "mergeguard.lock.yaml")
    snap = repo / "snapshots" / old
    assert (lock.base.hub, lock.base.revision, lock.base.commit) == ("acme/tiny-vit", "main", old)
    assert lock.base.files == {n: _sha256(snap / n) for n in ("model.safetensors", "config.json")}
    assert lock.inputs[0].spec == "ft.safetensors" and lock.inputs[0].hub is None
    (repo / "refs" / "main").write_text(new)  # the branch moves on: the pin still reads the old commit
    assert verify(lock.base, tmp_path, "the lock") == f"acme/tiny-vit@{old}"
    data = bytearray((snap / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (snap / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(MergeguardError, match="model.safetensors does not match its pin in the lock"):
        verify(lock.base, tmp_path, "the lock")


def test_an_interrupted_gate_writes_nothing_and_the_rerun_redoes_only_the_unfinished_step(project, monkeypatch):
    import mergeguard.merge

    def interrupted(*args, **kwargs):  # Ctrl-C inside the merge step's command
        raise KeyboardInterrupt

    policy = _policy(project)
    monkeypatch.setattr(mergeguard.merge, "merge_checkpoints", interrupted)
    res = runner.invoke(app, ["gate", str(policy)])
    assert res.exit_code == 130 and "interrupted" in res.output, res.output
    assert not (project / "release").exists()
    monkeypatch.undo()
    res = runner.invoke(app, ["gate", str(policy), "--json", str(project / "gate.json")])
    assert res.exit_code == 0, res.output
    steps = json.loads((project / "gate.json").read_text())["steps"]
    assert [(s["step"], s["reused"]) for s in steps] == [("scan_inputs", True), ("merge", False),
                                                         ("scan_result", False), ("eval", False)]


def test_the_example_policy_and_the_guides_policy_are_valid(family, tmp_path):
    """examples/gate-policy.yaml and docs/gate.md's policy, in a folder holding what they name, load as policies;
    the guide's policy names every key a policy may have."""
    import re

    from mergeguard.workflows.gate import TOP_KEYS, load_policy
    from mergeguard.workflows.lock import make_lock

    repo = Path(__file__).resolve().parents[1]
    guide = re.search(r"## The policy.*?```yaml\n(.*?)```", (repo / "docs" / "gate.md").read_text(), re.S).group(1)
    for name, text in (("example", (repo / "examples" / "gate-policy.yaml").read_text()), ("guide", guide)):
        root = tmp_path / name
        root.mkdir()
        raw = yaml.safe_load(text)
        lock = make_lock(str(family["base_path"]), [str(p) for p in family["paths"]], root / raw["lock"])
        (root / raw["lock"]).write_text(lock.to_yaml())
        for key in ("shadow",):
            (root / raw[key]).mkdir(parents=True)
        for folder in raw["eval"]["tasks"].values():
            (root / folder).mkdir(parents=True)
        for file in [raw["heads"], *raw["eval"]["triggers"]]:
            (root / file).parent.mkdir(parents=True, exist_ok=True)
            (root / file).write_bytes(b"")
        (root / "policy.yaml").write_text(text)
        policy = load_policy(root / "policy.yaml")
        assert policy.merge[:2] == ["--method", raw["merge"]["method"]] and policy.defend is not None, name
        if name == "guide":
            assert set(raw) == set(TOP_KEYS)


def test_listed_triggers_are_gated_and_recovered_ones_reported_unless_asked(project):
    from mergeguard.data.triggers import patch_trigger

    patch_trigger(16, area=0.06, target_class=1, target_task="a").save(project / "red.safetensors")
    suspicious_all = {**FAST_SCAN, "fail_on": "backdoored", "suspicious": 0.0, "backdoored": 50.0}
    tasks = {"a": "test/a", "b": "test/b"}
    policy = _policy(project, scan_inputs=suspicious_all,
                     eval={"tasks": tasks, "triggers": ["red.safetensors"], "max_asr": 1.0})
    res = runner.invoke(app, ["gate", str(policy), "--json", str(project / "gate.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((project / "gate.json").read_text())
    asr = [c for c in report["checks"] if c["what"].startswith("ASR")]
    listed = [c for c in asr if "red.safetensors" in c["what"]]
    recovered = [c for c in asr if "recovered from" in c["what"]]
    assert len(listed) == 2 and all(c["gated"] and c["limit"] == 1.0 for c in listed)
    assert {c["what"].split(" recovered from ")[1].split(" ")[0] for c in recovered} == {"ft0", "ft1"}
    assert all(not c["gated"] and c["limit"] == "reported" and c["passed"] for c in recovered)
    by_eval = json.loads((project / ".mergeguard-gate" / "eval" / "trigger-0.json").read_text())
    assert listed[0]["value"] == round(by_eval["asr_t"], 4) and listed[1]["value"] == round(by_eval["asr_n"], 4)

    # the same numbers judged: a limit of 0 on the recovered triggers fails the gate at eval, eval reused
    policy = _policy(project, scan_inputs=suspicious_all,
                     eval={"tasks": tasks, "triggers": ["red.safetensors"], "max_asr": 1.0, "max_asr_recovered": 0.0})
    res = runner.invoke(app, ["gate", str(policy), "--overwrite", "--json", str(project / "again.json")])
    assert res.exit_code == 1, res.output
    again = json.loads((project / "again.json").read_text())
    assert again["failed_step"] == "eval" and all(s["reused"] for s in again["steps"])
    failed = [c for c in again["checks"] if not c["passed"]]
    assert failed and all("recovered from" in c["what"] and c["value"] > 0.0 for c in failed)


def test_defend_lfpm_fail_on_exits_1_when_the_defended_model_still_scans_that_and_writes_its_outputs(project,
                                                                                                    tmp_path):
    r = project
    common = ["defend", "lfpm", "--merged", str(r / "ft0"), "--base", str(r / "base"), "--shadow", str(r / "shadow"),
              "--heads", str(r / "heads.safetensors"), "--epochs", "1", "--batch-size", "16", "--scan-steps", "20",
              "--scan-images", "48", "--scan-batch-size", "8", "--device", "cpu", "-q",
              "--scan-suspicious", "0", "--scan-backdoored", "50"]  # every scan reads suspicious, none backdoored
    res = runner.invoke(app, [*common, "-o", str(tmp_path / "a"), "--fail-on", "suspicious"])
    assert res.exit_code == 1, res.output
    assert "still scans suspicious" in res.output and (tmp_path / "a" / "model.safetensors").exists()
    res = runner.invoke(app, [*common, "-o", str(tmp_path / "b"), "--fail-on", "backdoored"])
    assert res.exit_code == 0, res.output
    no_heads = [a for a in common if a not in ("--heads", str(r / "heads.safetensors"))]
    res = runner.invoke(app, [*no_heads, "-o", str(tmp_path / "c"), "--fail-on", "suspicious"])
    assert res.exit_code == 2 and "give --heads" in res.output and not (tmp_path / "c").exists()
