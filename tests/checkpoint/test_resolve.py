"""Resolving what the user typed: files, folders, shards, pickles and the Hub cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from mergeguard.checkpoint import open_checkpoint
from mergeguard.checkpoint.resolve import parse_hub_id
from mergeguard.errors import MergeguardError


def test_folder_with_one_file(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "weights.safetensors")
    assert open_checkpoint(tmp_path).keys() == ["a"]


def test_folder_prefers_model_safetensors(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "other.safetensors")
    assert open_checkpoint(tmp_path).keys() == ["a"]


def test_folder_with_several_files_and_no_index(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "y.safetensors")
    with pytest.raises(MergeguardError, match="no model.safetensors.index.json"):
        open_checkpoint(tmp_path)


def test_hand_made_shards_with_index(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "p1.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "p2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a": "p1.safetensors", "b": "p2.safetensors"}})
    )
    ckpt = open_checkpoint(tmp_path)
    assert sorted(ckpt.keys()) == ["a", "b"] and torch.equal(ckpt.get("b"), torch.zeros(3))
    (tmp_path / "p2.safetensors").unlink()
    with pytest.raises(MergeguardError, match="missing"):
        open_checkpoint(tmp_path)


def test_missing_and_empty(tmp_path):
    with pytest.raises(MergeguardError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeguardError, match="no .safetensors"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MergeguardError, match="not a .safetensors file"):
        open_checkpoint(tmp_path / "notes.txt")


def test_pickle_refused_without_flag_and_loaded_weights_only_with_it(tmp_path):
    torch.save({"a": torch.arange(3.0)}, tmp_path / "model.bin")
    with pytest.raises(MergeguardError, match="--allow-pickle"):
        open_checkpoint(tmp_path / "model.bin")
    with pytest.raises(MergeguardError, match="--allow-pickle"):
        open_checkpoint(tmp_path)  # a folder holding only a pickle
    assert torch.equal(open_checkpoint(tmp_path / "model.bin", allow_pickle=True).get("a"), torch.arange(3.0))


class Payload:  # an arbitrary object: weights_only loading must refuse it
    pass


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    torch.save({"a": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(MergeguardError, match="weights_only"):
        open_checkpoint(tmp_path / "evil.pt", allow_pickle=True)


def test_parse_hub_id():
    assert parse_hub_id("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", None)
    assert parse_hub_id("hf-hub:org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("just-a-name") is None


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_cache(root):
    """The layout huggingface_hub writes: refs/main names the commit, snapshots/<commit>/ holds files."""
    repo = root / "models--acme--tiny-vit"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file({"w": torch.arange(4.0)}, snap / "model.safetensors")
    (repo / "blobs").mkdir()


def _run(args, cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf")}
    return subprocess.run([sys.executable, "-m", "mergeguard", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_hub_repo_resolves_from_cache_offline(tmp_path):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache)
    out = tmp_path / "report.json"
    done = _run(["inspect", "acme/tiny-vit", f"acme/tiny-vit@{COMMIT}", "--json", str(out), "-q"], cache)
    assert done.returncode == 0, done.stderr
    files = json.loads(out.read_text())["files"]
    assert [f["parameters"] for f in files] == [4, 4]


def test_hub_repo_not_in_cache_offline_is_one_sentence(tmp_path):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache)
    done = _run(["inspect", "acme/absent-model"], cache)
    assert done.returncode == 2
    assert "not in the Hugging Face cache" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
    assert "Traceback" not in done.stderr


def test_hub_provenance_records_commit(tmp_path):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache)
    out = tmp_path / "tv.safetensors"
    save_file({"w": torch.arange(4.0) + 1}, tmp_path / "ft.safetensors")
    done = _run(["extract-tv", "acme/tiny-vit", str(tmp_path / "ft.safetensors"), "-o", str(out), "-q"], cache)
    assert done.returncode == 0, done.stderr
    prov = json.loads(open_checkpoint(out).metadata["mergeguard.provenance"])
    assert prov["inputs"][0]["commit"] == COMMIT and prov["inputs"][0]["hub"] == "acme/tiny-vit"
    assert torch.equal(open_checkpoint(out).get("w"), torch.ones(4))


def test_an_unreachable_hub_is_said_after_one_short_probe(monkeypatch, tmp_path):
    """Without a network the Hub client waits through timeouts and retries (about 30 s) before it gives up; one
    connection attempt with a short timeout decides instead, and a repo that is not cached is one sentence."""
    import socket

    from huggingface_hub import constants

    from mergeguard.checkpoint import resolve
    from mergeguard.errors import MergeguardError

    tried = []

    def refuse(address, timeout=None):
        tried.append((address, timeout))
        raise OSError("unreachable")

    for name in resolve._PROXIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    resolve.hub_reachable.cache_clear()
    try:
        assert resolve.hub_reachable() is False
        assert len(tried) == 1 and tried[0][1] <= 5
        with pytest.raises(MergeguardError, match="the Hub could not be reached"):
            resolve.open_checkpoint("someone/not-cached")
        assert len(tried) == 1  # asked once per process
        resolve.hub_reachable.cache_clear()
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
        assert resolve.hub_reachable() is True and len(tried) == 1  # a proxy's network is not dialled directly
    finally:
        resolve.hub_reachable.cache_clear()
