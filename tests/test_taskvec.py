"""Task vectors: dense extraction, LoRA adapters against peft's own merge, and vector statistics."""

from __future__ import annotations

import json
import logging
import warnings

import peft
import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from mergeguard.checkpoint import open_checkpoint
from mergeguard.errors import MergeguardError
from mergeguard.taskvec import extract_task_vector, task_vector_stats


def test_dense_extraction_is_finetuned_minus_base(family, tmp_path):
    base, ft = open_checkpoint(family["base_path"]), open_checkpoint(family["paths"][0])
    result = extract_task_vector(base, ft, tmp_path / "tv.safetensors")
    tv = load_file(tmp_path / "tv.safetensors")
    b, f = family["base"], family["fts"][0]
    assert set(tv) == {k for k, v in b.items() if v.is_floating_point()}  # no integer buffers
    for k, v in tv.items():
        torch.testing.assert_close(v, f[k] - b[k])
    ckpt = open_checkpoint(tmp_path / "tv.safetensors")
    assert ckpt.is_task_vector and not ckpt.is_partial
    expected_norm = torch.cat([(f[k] - b[k]).reshape(-1) for k in tv]).norm().item()
    assert result.norm == pytest.approx(expected_norm, rel=1e-5)
    with pytest.raises(MergeguardError, match="already a task vector"):
        extract_task_vector(base, ckpt, tmp_path / "again.safetensors")


class Tiny(nn.Module):
    """Linear, conv, embedding and multi-head attention: every kind of LoRA target."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)})
                                    for _ in range(2))
        self.head = nn.Linear(8, 4)


def _with_peft_version(adapter_dir, version):
    """The adapter as a peft of `version` would have saved it (None: a config from before peft 0.18)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    if version is None:
        config.pop("peft_version", None)
    else:
        config["peft_version"] = version
    path.write_text(json.dumps(config))


def _peft_merged(base_state, adapter_dir):
    """What the installed peft's own loader gives for this adapter: from_pretrained, then merge_and_unload."""
    model = Tiny()
    model.load_state_dict(base_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note that it doubled an old adapter's out_proj
        loaded = PeftModel.from_pretrained(model, adapter_dir)
    return {k: v.detach() for k, v in loaded.merge_and_unload().state_dict().items()}


OUT_PROJ = {"blocks.0.attn.out_proj.weight", "blocks.1.attn.out_proj.weight"}
INSTALLED_PEFT = Version(peft.__version__)


# saved_by: the installed peft as it is, an old release, a dev build after the fix, and no version at all
@pytest.mark.parametrize("saved_by", ["installed", "0.21.0", "0.21.1.dev0", None])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_equals_peft_merge_and_unload(tmp_path, rslora, saved_by, caplog):
    if saved_by == "0.21.1.dev0" and INSTALLED_PEFT < Version("0.22.0"):
        pytest.skip("a peft before 0.22 applies every out_proj update twice, whatever saved the adapter")
    torch.manual_seed(0)
    model = Tiny()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base_state, tmp_path / "base.safetensors")
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights=False,
                        target_modules=["embed", "conv", "attn", "fc", "head"],
                        alpha_pattern={"head": 2})
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    if saved_by != "installed":
        _with_peft_version(tmp_path / "adapter", saved_by)
    merged = _peft_merged(base_state, tmp_path / "adapter")

    base, adapter = open_checkpoint(tmp_path / "base.safetensors"), open_checkpoint(tmp_path / "adapter")
    assert adapter.kind == "lora_adapter"
    with caplog.at_level(logging.WARNING, logger="mergeguard"):
        result = extract_task_vector(base, adapter, tmp_path / "tv.safetensors")
    assert result.source == "lora"
    tv = load_file(tmp_path / "tv.safetensors")
    assert open_checkpoint(tmp_path / "tv.safetensors").is_partial
    changed = {k for k in merged if not torch.equal(merged[k], base_state[k])}
    assert set(tv) == changed  # one dense update per LoRA-targeted weight, nothing else
    assert OUT_PROJ <= changed
    for k, v in merged.items():
        torch.testing.assert_close(base_state[k] + tv.get(k, torch.zeros_like(v)), v, rtol=1e-5, atol=1e-6)
    # the report says which rule was applied, to which modules, and why; the metadata carries it too
    rule = result.lora_rule
    assert set(rule["out_proj_modules"]) == OUT_PROJ
    old = saved_by is None or saved_by == "0.21.0" or (saved_by == "installed" and INSTALLED_PEFT < Version("0.22"))
    assert rule["out_proj_doubled"] is old
    assert rule["peft_version"] == (peft.__version__ if saved_by == "installed" else saved_by)
    provenance = json.loads(open_checkpoint(tmp_path / "tv.safetensors").metadata["mergeguard.provenance"])
    assert provenance["lora"] == rule
    warned = [r.getMessage() for r in caplog.records if "peft_version" in r.getMessage()]
    assert len(warned) == (saved_by is None)  # one line when the config cannot tell


def test_out_proj_rule_follows_the_saving_peft_not_the_installed_one(tmp_path):
    """The same adapter weights, said to be saved before and after peft 0.22: out_proj's update is exactly
    twice as large in the first, every other module the same."""
    torch.manual_seed(2)
    model = Tiny()
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors")
    get_peft_model(model, LoraConfig(r=2, target_modules=["attn", "fc"], init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter")
    tvs = {}
    for version in ("0.21.0", "0.22.0"):
        _with_peft_version(tmp_path / "adapter", version)
        extract_task_vector(open_checkpoint(tmp_path / "base.safetensors"), open_checkpoint(tmp_path / "adapter"),
                            tmp_path / f"{version}.safetensors")
        tvs[version] = load_file(tmp_path / f"{version}.safetensors")
    assert set(tvs["0.21.0"]) == set(tvs["0.22.0"])
    for k in tvs["0.22.0"]:
        factor = 2 if k in OUT_PROJ else 1
        torch.testing.assert_close(tvs["0.21.0"][k], factor * tvs["0.22.0"][k])
    _with_peft_version(tmp_path / "adapter", "not-a-version")
    with pytest.raises(MergeguardError, match="not a version number"):
        extract_task_vector(open_checkpoint(tmp_path / "base.safetensors"), open_checkpoint(tmp_path / "adapter"),
                            tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_lora_adapter_for_a_differently_prefixed_base(tmp_path):
    """An adapter trained on a wrapper (`tower.` prefix) still maps onto the bare base checkpoint."""
    torch.manual_seed(1)
    wrapper = nn.Module()
    wrapper.tower = Tiny()
    base_state = {k: v.detach().clone() for k, v in wrapper.tower.state_dict().items()}
    save_file(base_state, tmp_path / "base.safetensors")
    peft_model = get_peft_model(wrapper, LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().tower.state_dict()
    extract_task_vector(open_checkpoint(tmp_path / "base.safetensors"), open_checkpoint(tmp_path / "adapter"),
                        tmp_path / "tv.safetensors")
    tv = load_file(tmp_path / "tv.safetensors")
    assert sorted(tv) == ["blocks.0.fc.weight", "blocks.1.fc.weight"]
    for k, v in tv.items():
        torch.testing.assert_close(base_state[k] + v, merged[k], rtol=1e-5, atol=1e-6)


def test_adapter_for_another_model_is_one_sentence(tmp_path, family):
    torch.manual_seed(0)
    peft_model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(MergeguardError, match="matches no tensor of the base"):
        extract_task_vector(open_checkpoint(family["base_path"]), open_checkpoint(tmp_path / "adapter"),
                            tmp_path / "tv.safetensors")


def test_stats_match_plain_torch_and_flag_an_amplified_vector(family, tmp_path):
    b = family["base"]
    names = [k for k, v in b.items() if v.is_floating_point()]
    vecs = [torch.cat([(ft[k] - b[k]).reshape(-1) for k in names]) for ft in family["fts"]]
    # a fourth input amplified 3.5x, as LoBAM uploads
    amplified = {k: (b[k] + 3.5 * (family["fts"][0][k] - b[k])) if b[k].is_floating_point() else b[k] for k in b}
    save_file(amplified, tmp_path / "amp.safetensors")
    vecs.append(3.5 * vecs[0])
    ckpts = [open_checkpoint(p) for p in [*family["paths"], tmp_path / "amp.safetensors"]]
    stats = task_vector_stats(ckpts, open_checkpoint(family["base_path"]))
    for i, v in enumerate(vecs):
        assert stats.norms[i] == pytest.approx(v.norm().item(), rel=1e-5)
        for j, u in enumerate(vecs):
            cos = torch.nn.functional.cosine_similarity(v, u, dim=0).item()
            assert stats.cosine[i][j] == pytest.approx(cos, abs=1e-5)
            both = (v != 0) & (u != 0)
            conflict = ((v.sign() != u.sign()) & both).sum().item() / both.sum().item()
            assert stats.sign_conflict[i][j] == pytest.approx(conflict, abs=1e-9)
    assert stats.outliers == [str(tmp_path / "amp.safetensors")]


def test_stats_need_a_base_for_models(family):
    with pytest.raises(MergeguardError, match="pass --base"):
        task_vector_stats([open_checkpoint(p) for p in family["paths"]])


def test_fan_in_fan_out_flag_on_a_linear_layer_follows_peft(tmp_path):
    """PEFT ignores fan_in_fan_out on nn.Linear; so must we (the base's shape says the orientation)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6))
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base_state, tmp_path / "base.safetensors")
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0"], fan_in_fan_out=True,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().state_dict()
    extract_task_vector(open_checkpoint(tmp_path / "base.safetensors"), open_checkpoint(tmp_path / "adapter"),
                        tmp_path / "tv.safetensors")
    tv = load_file(tmp_path / "tv.safetensors")
    torch.testing.assert_close(base_state["0.weight"] + tv["0.weight"], merged["0.weight"], rtol=1e-5, atol=1e-6)
