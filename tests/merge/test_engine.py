"""The streaming engine end to end on real files, against in-memory plain-torch merges."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeguard.checkpoint import open_checkpoint
from mergeguard.errors import MergeguardError
from mergeguard.merge import merge_checkpoints
from mergeguard.taskvec import extract_task_vector


def _open(family):
    return open_checkpoint(family["base_path"]), [open_checkpoint(p) for p in family["paths"]]


def test_task_arithmetic_of_finetuned_files(family, tmp_path):
    base, inputs = _open(family)
    result = merge_checkpoints(base, inputs, "task_arithmetic", {"lam": 0.4}, out=tmp_path / "m",
                               weights=[1.0, 2.0, 0.5])
    out = load_file(tmp_path / "m" / "model.safetensors")
    b = family["base"]
    for k, v in b.items():
        if v.is_floating_point():
            expected = v + 0.4 * sum(w * (ft[k] - v) for w, ft in zip([1.0, 2.0, 0.5], family["fts"]))
            torch.testing.assert_close(out[k], expected)
        else:
            assert torch.equal(out[k], v)  # integer buffers are copied from the base, never averaged
    assert result.copied == 1 and result.merged == len(b) - 1
    assert (tmp_path / "m" / "README.md").read_text().startswith("# Merged model (task_arithmetic)")


def test_task_vector_inputs_give_the_same_merge(family, tmp_path):
    base, inputs = _open(family)
    tvs = []
    for i, ft in enumerate(inputs):
        extract_task_vector(base, ft, tmp_path / f"tv{i}.safetensors")
        tvs.append(open_checkpoint(tmp_path / f"tv{i}.safetensors"))
    assert all(tv.is_task_vector for tv in tvs)
    merge_checkpoints(base, inputs, "ties", {}, out=tmp_path / "a.safetensors")
    merge_checkpoints(base, tvs, "ties", {}, out=tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_ties_over_the_whole_vector_matches_in_memory_reference(family, tmp_path):
    base, inputs = _open(family)
    merge_checkpoints(base, inputs, "ties", {"trim_scope": "vector", "density": 0.3, "normalize": "sum", "lam": 1.0},
                      out=tmp_path / "m")
    out = load_file(tmp_path / "m" / "model.safetensors")
    b = family["base"]
    names = [k for k, v in b.items() if v.is_floating_point()]
    # reference: concatenate each task vector whole, trim by one global top-k, then elect and sum
    flat = torch.stack([torch.cat([(ft[k] - b[k]).reshape(-1) for k in names]) for ft in family["fts"]])
    k_keep = int(0.3 * flat.shape[1])
    trimmed = torch.stack([row * (row.abs() >= row.abs().topk(k_keep).values[-1]) for row in flat])
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    merged = (trimmed * (trimmed.sign() == sign)).sum(0)
    offset = 0
    for k in names:
        n = b[k].numel()
        torch.testing.assert_close(out[k], b[k] + merged[offset:offset + n].view_as(b[k]))
        offset += n


def test_bf16_inputs_and_dtype_option(tmp_path, family):
    b16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in family["base"].items()}
    f16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in family["fts"][0].items()}
    save_file(b16, tmp_path / "b16.safetensors")
    save_file(f16, tmp_path / "f16.safetensors")
    base, ft = open_checkpoint(tmp_path / "b16.safetensors"), open_checkpoint(tmp_path / "f16.safetensors")
    merge_checkpoints(base, [ft], "task_arithmetic", {}, out=tmp_path / "auto.safetensors")
    merge_checkpoints(base, [ft], "task_arithmetic", {}, out=tmp_path / "f32.safetensors", dtype="float32")
    auto, f32 = load_file(tmp_path / "auto.safetensors"), load_file(tmp_path / "f32.safetensors")
    w = "head.weight"
    expected = b16[w].float() + 0.3 * (f16[w].float() - b16[w].float())
    assert auto[w].dtype == torch.bfloat16 and f32[w].dtype == torch.float32
    torch.testing.assert_close(f32[w], expected)
    assert torch.equal(auto[w], expected.bfloat16())
    assert f32["position_ids"].dtype == torch.int64


def test_sharded_output_equals_single_file(family, tmp_path):
    base, inputs = _open(family)
    merge_checkpoints(base, inputs, "dare_ties", {}, out=tmp_path / "one.safetensors", seed=5)
    merge_checkpoints(base, inputs, "dare_ties", {}, out=tmp_path / "sharded", seed=5, shard_size=3000)
    sharded = open_checkpoint(tmp_path / "sharded")
    assert len(sharded.files) > 1
    one = load_file(tmp_path / "one.safetensors")
    for k, v in one.items():
        assert torch.equal(sharded.get(k), v)


def test_metadata_records_inputs_and_parameters(family, tmp_path):
    base, inputs = _open(family)
    merge_checkpoints(base, inputs, "ties", {"density": 0.5}, out=tmp_path / "m", seed=9)
    meta = open_checkpoint(tmp_path / "m").metadata
    prov = json.loads(meta["mergeguard.provenance"])
    assert meta["mergeguard.kind"] == "model" and prov["method"] == "ties" and prov["seed"] == 9
    assert prov["params"]["density"] == 0.5
    digests = [r["sha256"] for r in prov["inputs"]]
    files = [family["base_path"], *family["paths"]]
    assert digests == [{f.name: hashlib.sha256(f.read_bytes()).hexdigest()} for f in files]


def test_architecture_description_is_inherited_from_the_base(family, tmp_path):
    save_file(family["base"], tmp_path / "arch_base.safetensors", metadata={"mergeguard.arch": '{"model": "x"}'})
    base = open_checkpoint(tmp_path / "arch_base.safetensors")
    merge_checkpoints(base, [open_checkpoint(family["paths"][0])], "average", {}, out=tmp_path / "m.safetensors")
    assert open_checkpoint(tmp_path / "m.safetensors").metadata["mergeguard.arch"] == '{"model": "x"}'


def test_missing_tensor_is_an_error_unless_allowed(family, tmp_path):
    partial = {k: v for k, v in family["fts"][1].items() if k != "head.weight"}
    save_file(partial, tmp_path / "partial.safetensors")
    base = open_checkpoint(family["base_path"])
    inputs = [open_checkpoint(family["paths"][0]), open_checkpoint(tmp_path / "partial.safetensors")]
    with pytest.raises(MergeguardError, match="lacks tensor 'head.weight'.*--allow-missing"):
        merge_checkpoints(base, inputs, "task_arithmetic", {}, out=tmp_path / "m")
    assert not (tmp_path / "m").exists()
    result = merge_checkpoints(base, inputs, "average", {}, out=tmp_path / "m", allow_missing=True)
    assert result.skipped == {str(tmp_path / "partial.safetensors"): 1}
    out = load_file(tmp_path / "m" / "model.safetensors")
    torch.testing.assert_close(out["head.weight"], family["fts"][0]["head.weight"])  # only input 0 had it
    ref = (family["fts"][0]["embed.weight"] + family["fts"][1]["embed.weight"]) / 2
    torch.testing.assert_close(out["embed.weight"], ref)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_or_inf_in_an_input_names_the_tensor(family, tmp_path, bad):
    ft = dict(family["fts"][2])
    ft["blocks.resblocks.1.mlp.bias"] = ft["blocks.resblocks.1.mlp.bias"].clone()
    ft["blocks.resblocks.1.mlp.bias"][3] = float(bad)
    save_file(ft, tmp_path / "bad.safetensors")
    base, inputs = _open(family)
    with pytest.raises(MergeguardError, match=r"'blocks.resblocks.1.mlp.bias' of .*bad.safetensors contains NaN"):
        merge_checkpoints(base, [*inputs, open_checkpoint(tmp_path / "bad.safetensors")], "ties", {},
                          out=tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad.safetensors", "base.safetensors",
                                                                  "ft0.safetensors", "ft1.safetensors",
                                                                  "ft2.safetensors"])


def test_shape_and_dtype_mismatches_name_the_tensor(family, tmp_path):
    base = open_checkpoint(family["base_path"])
    wrong_shape = dict(family["fts"][0], **{"head.weight": torch.zeros(5, 16)})
    save_file(wrong_shape, tmp_path / "shape.safetensors")
    with pytest.raises(MergeguardError, match=r"'head.weight' has shape \[5, 16\] in input .* but \[4, 16\]"):
        merge_checkpoints(base, [open_checkpoint(tmp_path / "shape.safetensors")], "ties", {}, out=tmp_path / "m")
    wrong_dtype = dict(family["fts"][0], **{"head.weight": family["fts"][0]["head.weight"].half()})
    save_file(wrong_dtype, tmp_path / "dtype.safetensors")
    with pytest.raises(MergeguardError, match=r"'head.weight' is float16 in input .* but float32 in the base"):
        merge_checkpoints(base, [open_checkpoint(tmp_path / "dtype.safetensors")], "ties", {}, out=tmp_path / "m")


def test_argument_checks(family, tmp_path):
    base, inputs = _open(family)
    with pytest.raises(MergeguardError, match="--weight was given 1 times for 3 inputs"):
        merge_checkpoints(base, inputs, "ties", {}, out=tmp_path / "m", weights=[1.0])
    with pytest.raises(MergeguardError, match="needs a reference"):
        merge_checkpoints(base, inputs, "lata", {}, out=tmp_path / "m")
    with pytest.raises(MergeguardError, match="--dtype"):
        merge_checkpoints(base, inputs, "ties", {}, out=tmp_path / "m", dtype="int8")


def test_lata_through_the_engine_downweights_reference_aligned_layers(family, tmp_path):
    base, inputs = _open(family)
    b, ft0 = family["base"], family["fts"][0]
    # the reference shares input 0's update in layer 0 only
    ref = {k: v.clone() for k, v in b.items()}
    for k in ("blocks.resblocks.0.attn.weight", "blocks.resblocks.0.mlp.weight", "blocks.resblocks.0.mlp.bias"):
        ref[k] = ft0[k].clone()
    save_file(ref, tmp_path / "ref.safetensors")
    result = merge_checkpoints(base, inputs[:1], "lata", {"mode": "mask", "keep": 0.5, "lam": 1.0},
                               out=tmp_path / "m", reference=open_checkpoint(tmp_path / "ref.safetensors"))
    out = load_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(out["blocks.resblocks.0.attn.weight"], b["blocks.resblocks.0.attn.weight"])  # masked
    torch.testing.assert_close(out["blocks.resblocks.1.attn.weight"], ft0["blocks.resblocks.1.attn.weight"])
    torch.testing.assert_close(out["head.weight"], ft0["head.weight"])  # not in a layer: weight 1
    cos = result.report["layer_cosines"][str(family["paths"][0])]
    assert cos["blocks.resblocks.0"] == pytest.approx(1.0) and abs(cos["blocks.resblocks.1"]) < 1e-6
