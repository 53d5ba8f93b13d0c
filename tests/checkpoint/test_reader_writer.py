"""Streaming writer and lazy reader, checked against the safetensors library itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergeguard.checkpoint import CheckpointWriter, PlannedTensor, open_checkpoint, parse_size
from mergeguard.errors import MergeguardError


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(33, 7, generator=g),
        "w16": torch.randn(5, 3, generator=g).half(),
        "wbf": torch.randn(9, generator=g).bfloat16(),
        "w64": torch.randn(2, 2, generator=g).double(),
        "ids": torch.arange(11),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _write(out, tensors, **kw):
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with CheckpointWriter(out, plan, {"note": "hi"}, **kw) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.commit()


def test_reader_matches_safetensors_library(tmp_path):
    tensors = _mixed()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"a": "b"})
    ckpt = open_checkpoint(tmp_path / "x.safetensors")
    assert ckpt.metadata == {"a": "b"}
    assert set(ckpt.keys()) == set(tensors)
    for k, v in tensors.items():
        got = ckpt.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k


def test_single_file_written_is_read_by_safetensors(tmp_path):
    tensors = _mixed()
    _write(tmp_path / "out.safetensors", tensors)
    loaded = load_file(tmp_path / "out.safetensors")
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.metadata()["note"] == "hi"


def test_sharded_round_trip(tmp_path):
    tensors = _mixed()
    _write(tmp_path / "out", tensors, shard_size=64)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    for name, shard in index["weight_map"].items():  # every shard is a valid file on its own
        with safe_open(tmp_path / "out" / shard, "pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])
    ckpt = open_checkpoint(tmp_path / "out")
    assert ckpt.keys() == list(tensors)
    for k, v in tensors.items():
        assert torch.equal(ckpt.get(k), v)


def test_unsharded_folder_has_one_file(tmp_path):
    _write(tmp_path / "out", _mixed())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]


def test_interrupted_write_leaves_nothing(tmp_path):
    tensors = _mixed()
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(tmp_path / "out", plan, shard_size=100) as w:
            w.write("w32", tensors["w32"])
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    tensors = {"a": torch.ones(3)}
    _write(tmp_path / "out", tensors)
    with pytest.raises(MergeguardError, match="already exists"):
        _write(tmp_path / "out", {"a": torch.zeros(3)})
    assert torch.equal(open_checkpoint(tmp_path / "out").get("a"), torch.ones(3))
    _write(tmp_path / "out", {"a": torch.zeros(3)}, overwrite=True)
    assert torch.equal(open_checkpoint(tmp_path / "out").get("a"), torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_single_file_output_cannot_be_sharded(tmp_path):
    with pytest.raises(MergeguardError, match="give a folder"):
        _write(tmp_path / "o.safetensors", _mixed(), shard_size=100)


def test_truncated_and_corrupt_files(tmp_path):
    save_file({"a": torch.randn(100)}, tmp_path / "ok.safetensors")
    raw = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-50])
    with pytest.raises(MergeguardError, match="truncated"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(raw[:5])
    with pytest.raises(MergeguardError, match="truncated"):
        open_checkpoint(tmp_path / "tiny.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(MergeguardError, match="corrupt"):
        open_checkpoint(tmp_path / "junk.safetensors")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1234", 1234), ("none", None), (None, None)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(MergeguardError, match="shard-size"):
        parse_size("five gigs")


def _raw_file(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_header_checks_match_the_safetensors_library(tmp_path):
    _raw_file(tmp_path / "gap.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8)
    with pytest.raises(MergeguardError, match="gap"):
        open_checkpoint(tmp_path / "gap.safetensors")
    _raw_file(tmp_path / "meta.safetensors", {"__metadata__": ["x"], "a": {"dtype": "F32", "shape": [1],
                                                                          "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(MergeguardError, match="__metadata__"):
        open_checkpoint(tmp_path / "meta.safetensors")
    _raw_file(tmp_path / "neg.safetensors", {"a": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}},
              b"\0" * 4)
    with pytest.raises(MergeguardError, match="corrupt"):
        open_checkpoint(tmp_path / "neg.safetensors")


def test_refuse_writing_over_an_input(tmp_path):
    from mergeguard.checkpoint.paths import refuse_writing_over
    from mergeguard.errors import MergeguardError

    model = tmp_path / "merged" / "model.safetensors"
    model.parent.mkdir()
    model.write_bytes(b"x")
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # the file, its folder, a folder holding it, a new file inside an input folder
    for out in (model, model.parent, tmp_path):
        with pytest.raises(MergeguardError, match="would replace the input"):
            refuse_writing_over(out, [model.parent, shadow])
    with pytest.raises(MergeguardError, match="would be written inside the input folder"):
        refuse_writing_over(shadow / "defended.safetensors", [model.parent, shadow])
    # a command that writes known names into OUT: only OUT/name counts
    refuse_writing_over(tmp_path, [model.parent, shadow], ("model.safetensors", "report.json"))
    with pytest.raises(MergeguardError, match="would replace the input"):
        refuse_writing_over(model.parent, [model.parent], ("model.safetensors", "report.json"))
    refuse_writing_over(tmp_path / "new", ["org/repo-on-the-hub", "open_clip:ViT-B-32@openai"])  # not paths here
