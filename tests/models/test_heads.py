"""Zero-shot heads through a CLIP text tower, heads files, class names, and `mergeguard heads`.

The text tower is a tiny randomly initialised open_clip CLIP with the real 49408-token vocabulary,
so open_clip's SimpleTokenizer (shipped with the package) works offline.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from mergeguard.checkpoint import CheckpointWriter, PlannedTensor
from mergeguard.checkpoint.provenance import ARCH_KEY
from mergeguard.cli import app
from mergeguard.errors import MergeguardError
from mergeguard.models.arch import OPENAI_MEAN, OPENAI_STD
from mergeguard.models.heads import (
    DEFAULT_TEMPLATES,
    Head,
    builtin_tasks,
    load_heads,
    load_text_model,
    resolve_classnames,
    save_heads,
    zero_shot_head,
)

VISION_CFG = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
EMBED_DIM = 32
ARCH = {
    "family": "open_clip",
    "name": "tiny-text-test",
    "embed_dim": EMBED_DIM,
    "vision_cfg": VISION_CFG,
    "text_cfg": TEXT_CFG,
    "quick_gelu": True,
    "mean": OPENAI_MEAN,
    "std": OPENAI_STD,
}
CLASSES = ["cat", "dog", "sea turtle"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}."]


@torch.no_grad()
def tiny_clip(seed: int = 0, logit_scale: float = 42.0):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(EMBED_DIM, VISION_CFG, TEXT_CFG, quick_gelu=True)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # biases and LayerNorm gains become informative too
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.logit_scale.fill_(math.log(logit_scale))  # neither CLIP's 1/0.07 nor the fallback 100
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=77)


def write_checkpoint(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with CheckpointWriter(path, plan, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.commit()


def save_full_clip(path, model, arch=ARCH):
    return write_checkpoint(path, model.state_dict(), {ARCH_KEY: json.dumps(arch)})


@torch.no_grad()
def reference_head(model, tokenizer, classnames, templates) -> torch.Tensor:
    """CLIP's recipe, one prompt at a time: embed, unit-normalise, average over templates, unit-normalise."""
    rows = []
    for name in classnames:
        total = torch.zeros(EMBED_DIM)
        for template in templates:
            e = model.encode_text(tokenizer([template.format(name)]))[0]
            total += e / e.norm()
        mean = total / len(templates)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


# -- zero-shot heads --------------------------------------------------------------------
def test_zero_shot_head_matches_hand_computation(tokenizer):
    model = tiny_clip(seed=0, logit_scale=42.0)
    head = zero_shot_head(model, tokenizer, "pets", CLASSES, TEMPLATES)
    assert head.task == "pets" and head.classnames == CLASSES
    assert head.weight.shape == (3, EMBED_DIM)
    torch.testing.assert_close(head.weight, reference_head(model, tokenizer, CLASSES, TEMPLATES),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(head.weight.norm(dim=-1), torch.ones(3))
    assert head.scale == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)
    assert head.scale == pytest.approx(42.0, rel=1e-5)


def test_zero_shot_head_depends_on_classes_and_templates(tokenizer):
    """Sensitivity: a head computed from one template or the unnormalised mean is a different matrix,
    so the comparison above checks CLIP's recipe, not just any text embedding."""
    model = tiny_clip(seed=0)
    head = zero_shot_head(model, tokenizer, "t", CLASSES, TEMPLATES)
    one = zero_shot_head(model, tokenizer, "t", CLASSES, TEMPLATES[:1])
    assert not torch.allclose(head.weight, one.weight, atol=1e-4)
    with torch.no_grad():
        raw = [model.encode_text(tokenizer([t.format(c) for t in TEMPLATES])).mean(0) for c in CLASSES]
    unnormalised_first = torch.nn.functional.normalize(torch.stack(raw), dim=-1)
    assert not torch.allclose(head.weight, unnormalised_first, atol=1e-5)
    # rows differ between classes
    assert not torch.allclose(head.weight[0], head.weight[1], atol=1e-4)


def test_head_logits():
    w = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    head = Head("t", w, list("abcd"), 25.0)
    f = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(head.logits(f), 25.0 * torch.einsum("bd,cd->bc", f, w))


# -- text model from a checkpoint -------------------------------------------------------
def test_load_text_model_from_full_checkpoint(tmp_path, tokenizer):
    model = tiny_clip(seed=1, logit_scale=30.0)
    path = save_full_clip(tmp_path / "clip.safetensors", model)
    expected = zero_shot_head(model, tokenizer, "t", CLASSES, TEMPLATES)

    for arch in (None, ARCH):  # from the metadata, or given
        loaded, tok = load_text_model(str(path), arch)
        assert not loaded.training
        head = zero_shot_head(loaded, tok, "t", CLASSES, TEMPLATES)
        torch.testing.assert_close(head.weight, expected.weight, rtol=0, atol=1e-6)
        assert head.scale == pytest.approx(expected.scale, rel=1e-6)
        assert head.scale == pytest.approx(30.0, rel=1e-5)

    # sensitivity: another model's weights give another head
    other = zero_shot_head(tiny_clip(seed=2), tokenizer, "t", CLASSES, TEMPLATES)
    assert not torch.allclose(other.weight, expected.weight, atol=1e-4)


def test_load_text_model_vision_only_checkpoint(tmp_path):
    model = tiny_clip(seed=1)
    path = write_checkpoint(tmp_path / "vision.safetensors", model.visual.state_dict(),
                            {ARCH_KEY: json.dumps(ARCH)})
    with pytest.raises(MergeguardError, match="text tower"):
        load_text_model(str(path), None)


def test_load_text_model_without_text_cfg(tmp_path):
    model = tiny_clip(seed=1)
    arch = {k: v for k, v in ARCH.items() if k != "text_cfg"}
    path = save_full_clip(tmp_path / "clip.safetensors", model, arch)
    with pytest.raises(MergeguardError, match="text tower"):
        load_text_model(str(path), None)


def test_load_text_model_missing_text_tensor(tmp_path):
    model = tiny_clip(seed=1)
    state = {k: v for k, v in model.state_dict().items() if k != "ln_final.weight"}
    path = write_checkpoint(tmp_path / "clip.safetensors", state, {ARCH_KEY: json.dumps(ARCH)})
    with pytest.raises(MergeguardError, match="ln_final.weight"):
        load_text_model(str(path), None)


# -- heads files ------------------------------------------------------------------------
def test_save_and_load_heads_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    heads = {
        "cars": Head("cars", torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1),
                     ["sedan", "coupe", "van"], 42.5),
        "dtd": Head("dtd", torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1),
                    ["a", "b", "c", "d", "e"], 100.0),
    }
    path = save_heads(heads, tmp_path / "heads.safetensors")
    assert path == tmp_path / "heads.safetensors"
    loaded = load_heads(path)
    assert list(loaded) == ["cars", "dtd"]
    for t, h in heads.items():
        assert loaded[t].task == t
        assert loaded[t].classnames == h.classnames
        assert loaded[t].scale == h.scale
        assert loaded[t].weight.dtype == torch.float32
        torch.testing.assert_close(loaded[t].weight, h.weight, rtol=0, atol=1e-6)


def test_save_heads_normalises_rows_and_refuses_to_overwrite(tmp_path):
    w = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    path = save_heads({"t": Head("t", w, ["x", "y"], 10.0)}, tmp_path / "h.safetensors")
    torch.testing.assert_close(load_heads(path)["t"].weight, torch.tensor([[0.6, 0.8], [0.0, -1.0]]))
    with pytest.raises(MergeguardError, match="already exists"):
        save_heads({"t": Head("t", w, ["x", "y"], 10.0)}, path)
    save_heads({"t": Head("t", -w, ["x", "y"], 10.0)}, path, overwrite=True)
    torch.testing.assert_close(load_heads(path)["t"].weight, torch.tensor([[-0.6, -0.8], [0.0, 1.0]]))


def test_load_heads_rejects_non_heads_files(tmp_path):
    plain = write_checkpoint(tmp_path / "plain.safetensors", {"t": torch.zeros(2, 4)})
    with pytest.raises(MergeguardError, match="not a heads file"):
        load_heads(plain)
    mismatch = write_checkpoint(tmp_path / "bad.safetensors", {"t": torch.zeros(2, 4)},
                                {"classnames": json.dumps({"t": ["a", "b", "c"]})})
    with pytest.raises(MergeguardError, match="2 rows but 3 class names"):
        load_heads(mismatch)


# -- class names ------------------------------------------------------------------------
@pytest.mark.parametrize("task,count", [("eurosat", 10), ("cifar100", 100)])
def test_resolve_shipped_task(task, count):
    names, templates = resolve_classnames(task)
    assert len(names) == count and len(set(names)) == count
    assert templates and all("{}" in t for t in templates)
    assert names == builtin_tasks()[task]["classnames"]


def test_resolve_folder_of_class_folders(tmp_path):
    for name in ("sea_turtle", "ant", "zebra"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("not a class")
    names, templates = resolve_classnames(str(tmp_path / "train"))
    assert names == ["ant", "sea turtle", "zebra"]
    assert templates == DEFAULT_TEMPLATES


def test_resolve_text_file(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("golden retriever\n\n  tabby cat  \nparrot\n")
    names, templates = resolve_classnames(str(f))
    assert names == ["golden retriever", "tabby cat", "parrot"]
    assert templates == DEFAULT_TEMPLATES


def test_resolve_errors(tmp_path):
    with pytest.raises(MergeguardError, match="neither a known task") as err:
        resolve_classnames("no-such-task-or-path")
    assert "eurosat" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeguardError, match="no class folders"):
        resolve_classnames(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(MergeguardError, match="no class names"):
        resolve_classnames(str(tmp_path / "blank.txt"))


# -- the command ------------------------------------------------------------------------
def test_heads_command(tmp_path, tokenizer):
    model = tiny_clip(seed=3, logit_scale=20.0)
    base = save_full_clip(tmp_path / "clip.safetensors", model)
    for name in ("red_car", "blue_car"):
        (tmp_path / "mine" / name).mkdir(parents=True)
    out = tmp_path / "not" / "yet" / "heads.safetensors"  # missing folders are created
    result = CliRunner().invoke(app, ["heads", "--base", str(base), "--task", "eurosat=eurosat",
                                      "--task", f"mine={tmp_path / 'mine'}", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    heads = load_heads(out)
    assert set(heads) == {"eurosat", "mine"}
    assert heads["eurosat"].weight.shape == (10, EMBED_DIM)
    assert heads["eurosat"].classnames == builtin_tasks()["eurosat"]["classnames"]
    assert heads["mine"].classnames == ["blue car", "red car"]
    assert heads["mine"].scale == pytest.approx(20.0, rel=1e-5)
    names, templates = resolve_classnames("eurosat")
    expected = reference_head(model, tokenizer, names, templates)
    torch.testing.assert_close(heads["eurosat"].weight, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(heads["mine"].weight,
                               reference_head(model, tokenizer, ["blue car", "red car"], DEFAULT_TEMPLATES),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "task_arg,expected",
    [("eurosat=eurosat", "text tower"), ("noequals", "NAME=SPEC"), ("x=nonsense-spec", "neither a known task")],
)
def test_heads_command_errors(tmp_path, task_arg, expected):
    """A vision-only base, or a bad --task: exit code 2, one sentence, no output file."""
    model = tiny_clip(seed=3)
    base = write_checkpoint(tmp_path / "vision.safetensors", model.visual.state_dict(),
                            {ARCH_KEY: json.dumps(ARCH)})
    out = tmp_path / "heads.safetensors"
    result = CliRunner().invoke(app, ["heads", "--base", str(base), "--task", task_arg, "-o", str(out), "-q"])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("weight_value, scale, message", [
    (float("nan"), 100.0, "holds NaN or Inf"),
    (0.5, float("nan"), "logit scale nan"),
    (0.5, -3.0, "logit scale -3.0"),
])
def test_a_damaged_heads_file_is_one_sentence(tmp_path, weight_value, scale, message):
    weight = torch.full((2, 4), 0.5)
    weight[0, 0] = weight_value
    path = save_heads({"cars": Head("cars", weight, ["sedan", "van"], scale)}, tmp_path / "h.safetensors")
    with pytest.raises(MergeguardError, match=message):
        load_heads(path)


def test_open_clip_text_tower_needs_a_pretrained_tag():
    """Without @TAG open_clip builds a random text tower; heads from it would be noise."""
    from mergeguard.models.heads import load_text_model

    with pytest.raises(MergeguardError, match="names no pretrained weights; add a tag, e.g. open_clip:ViT-B-32@openai"):
        load_text_model("open_clip:ViT-B-32", None)
