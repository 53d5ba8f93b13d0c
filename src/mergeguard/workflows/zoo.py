"""Building the tiny zoo (`mergeguard.models.zoo`): pre-training, rendering the task data, a clean
fine-tune per task through the trainer core, and the acceptance numbers (CA of the pre-trained model,
the fine-tunes and their task-arithmetic merge) recorded in zoo.json.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from mergeguard.checkpoint import open_checkpoint
from mergeguard.data import procedural
from mergeguard.errors import MergeguardError, did_you_mean
from mergeguard.eval import evaluate
from mergeguard.merge import merge_checkpoints
from mergeguard.models.encoder import ImageEncoder, load_encoder, save_encoder
from mergeguard.models.heads import Head, save_heads
from mergeguard.models.zoo import (
    LOGIT_SCALE,
    SIZES,
    TASKS,
    ZOO_ENTRIES,
    ZOO_VERSION,
    ZooSize,
    default_zoo_dir,
    folder_entries,
    holds_something_else,
    is_zoo,
    text_embeddings,
    text_head,
    zoo_arch,
)
from mergeguard.progress import NullProgress, ProgressSink
from mergeguard.trainer import TrainConfig, fit, seed_everything

ACCEPT_FINETUNED = 0.9  # each clean fine-tune's CA on its own task
FINETUNE_SCALE = 10.0
MERGE_LAMBDA = 0.3


def _quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to 8 bits, so the in-memory images equal the PNGs written to disk."""
    return torch.round(images * 255) / 255


def _write_pngs(images: torch.Tensor, labels: torch.Tensor | None, classes: list[str] | None, root: Path) -> None:
    from PIL import Image

    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, array in enumerate(arrays):
        folder = root / classes[int(labels[i])] if labels is not None and classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{i:05d}.png")


def pretrain(size: ZooSize, seed: int, progress: ProgressSink | None) -> ImageEncoder:
    """The zoo's 'pre-trained' encoder, CLIP-style: each image is matched to its caption among all
    captions, a caption being the normalised sum of one text embedding per attribute. Pre-training
    sees every attribute, mostly at a coarse grain (the attribute's term is the mean over its COARSE
    group) and only for a fraction `fine_fraction` of captions at the class itself, so the encoder
    knows the attributes without separating every class as well as a fine-tune does. A class in the
    size's `own_group` has a coarse group of its own: θ0 already tells it from its look-alike."""
    seed_everything(seed)
    encoder = ImageEncoder(zoo_arch(size))
    text = text_embeddings(size.embed_dim, seed)
    groups_of = procedural.coarse_groups(size.own_group)
    vocab = {}  # per attribute: its classes' embeddings, then its coarse groups' mean embeddings
    for task in TASKS:
        coarse = torch.tensor(groups_of[task])
        groups = [text[task][coarse == g].mean(0) for g in range(int(coarse.max()) + 1)]
        vocab[task] = torch.cat([text[task], torch.stack(groups)])
    gen = torch.Generator().manual_seed(seed)
    attrs = procedural.sample_attributes(size.pretrain_images, gen)
    images = _quantize(procedural.render(attrs, size.image_size, gen))
    coarse_labels = procedural.coarse_labels(attrs, groups_of)
    sizes = [len(vocab[t]) for t in TASKS]
    combos = torch.cartesian_prod(*[torch.arange(n) for n in sizes])
    captions = F.normalize(sum(vocab[t][combos[:, i]] for i, t in enumerate(TASKS)), dim=-1)
    pick = torch.Generator().manual_seed(seed + 1)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(images), (size.batch_size,), generator=pick)
        index = torch.zeros(len(idx), dtype=torch.long)
        for i, task in enumerate(TASKS):
            fine = torch.rand(len(idx), generator=pick) < size.fine_fraction
            word = torch.where(fine, attrs[task][idx], len(procedural.ATTRIBUTES[task]) + coarse_labels[task][idx])
            index = index * sizes[i] + word
        return F.cross_entropy(LOGIT_SCALE * encoder(images[idx]) @ captions.T, index)

    cfg = TrainConfig(steps=size.pretrain_steps, lr=size.pretrain_lr, warmup=size.pretrain_steps // 10,
                      weight_decay=0.05, seed=seed)
    fit(encoder.parameters(), loss_at, cfg, progress, "pre-training the zoo encoder")
    return encoder.eval()


def finetune(base: ImageEncoder, head: Head, images: torch.Tensor, labels: torch.Tensor, *,
             steps: int, lr: float, batch_size: int, seed: int, progress: ProgressSink | None = None,
             description: str = "fine-tuning") -> ImageEncoder:
    """A clean fine-tune of the whole image encoder with the task's head frozen."""
    import copy

    seed_everything(seed)
    model = copy.deepcopy(base).train()
    pick = torch.Generator().manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(images), (batch_size,), generator=pick)
        # a lower temperature than the head's scale keeps pushing the margins up after the argmax is
        # right, so the task vector still classifies when a merge scales it down (λ ≈ 0.3)
        return F.cross_entropy(FINETUNE_SCALE * model(images[idx]) @ head.weight.T, labels[idx])

    cfg = TrainConfig(steps=steps, lr=lr, warmup=max(1, steps // 10), weight_decay=0.1, seed=seed)
    fit(model.parameters(), loss_at, cfg, progress, description)
    return model.eval()


def _cached(root: Path) -> dict[str, Any]:
    """A finished zoo's zoo.json, as build_zoo returns it."""
    return {**json.loads((root / "zoo.json").read_text()), "root": str(root), "cached": True}


def build_zoo(out: str | Path | None = None, *, size: str = "tiny", seed: int = 0, force: bool = False,
              progress: ProgressSink | None = None) -> dict[str, Any]:
    """Build (or load from the cache) the zoo; returns zoo.json's content with its `root`."""
    if size not in SIZES:
        raise MergeguardError(f"unknown zoo size {size!r}; choose one of: {', '.join(SIZES)}."
                              + did_you_mean(size, SIZES))
    progress = progress or NullProgress()
    root = (Path(out) if out else default_zoo_dir(size, seed)).expanduser().resolve()
    if holds_something_else(root):  # --force rebuilds a zoo; it never deletes a folder of something else
        raise MergeguardError(f"{root} exists and is not a zoo; choose another --out.")
    # --force deletes a zoo, not what lies beside it
    if force and (extra := sorted(folder_entries(root) - ZOO_ENTRIES)):
        raise MergeguardError(f"{root} holds files a zoo build did not write ({', '.join(extra)}); move them before "
                              "--force, or choose another --out.")
    if is_zoo(root) and not force:
        cached = _cached(root)
        if (cached.get("size"), cached.get("seed")) != (size, seed):
            raise MergeguardError(f"{root} holds the {cached.get('size')} zoo with seed {cached.get('seed')}, not "
                                  f"the {size} one with seed {seed}; name another folder, or rebuild it "
                                  "(zoo build --force).")
        return cached
    start = time.perf_counter()
    spec = SIZES[size]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = _build(tmp, spec, size, seed, progress)
        info["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "zoo.json").write_text(json.dumps(info, indent=2))
        if is_zoo(root) and not force:
            # another process finished the same (deterministic) build meanwhile and may be reading it:
            # keep its copy rather than deleting it under that process's feet
            return _cached(root)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "root": str(root), "cached": False}


def _build(root: Path, spec: ZooSize, size: str, seed: int, progress: ProgressSink) -> dict[str, Any]:
    provenance = {"zoo": size, "seed": seed, "zoo_version": ZOO_VERSION}
    base = pretrain(spec, seed, progress)
    text = text_embeddings(spec.embed_dim, seed)
    save_encoder(base, root / "base" / "model.safetensors", {**provenance, "role": "base"})

    data: dict[str, tuple[torch.Tensor, ...]] = {}
    heads: dict[str, Head] = {}
    progress.stage("rendering task data", len(TASKS))
    for i, task in enumerate(TASKS):
        classes = procedural.ATTRIBUTES[task]
        x_train, y_train = procedural.task_dataset(task, spec.train_per_task, spec.image_size, seed * 1000 + 10 + i)
        x_test, y_test = procedural.task_dataset(task, spec.test_per_task, spec.image_size, seed * 1000 + 20 + i)
        x_train, x_test = _quantize(x_train), _quantize(x_test)
        _write_pngs(x_train, y_train, classes, root / "data" / task / "train")
        _write_pngs(x_test, y_test, classes, root / "data" / task / "test")
        data[task] = (x_train, y_train, x_test, y_test)
        heads[task] = text_head(task, text)
        progress.advance()
    save_heads(heads, root / "heads.safetensors", overwrite=True)
    gen = torch.Generator().manual_seed(seed * 1000 + 99)
    shadow = _quantize(procedural.render(procedural.sample_attributes(spec.shadow_images, gen), spec.image_size, gen))
    _write_pngs(shadow, None, None, root / "shadow")

    for i, task in enumerate(TASKS):
        x_train, y_train = data[task][:2]
        tuned = finetune(base, heads[task], x_train, y_train, steps=spec.finetune_steps, lr=spec.finetune_lr,
                         batch_size=spec.batch_size, seed=seed * 1000 + 30 + i, progress=progress,
                         description=f"fine-tuning {task}")
        save_encoder(tuned, root / "finetuned" / task / "model.safetensors",
                     {**provenance, "role": "finetuned", "task": task})

    acceptance = measure_acceptance(root, data, heads, progress)
    return {
        "version": ZOO_VERSION,
        "size": size,
        "seed": seed,
        "spec": asdict(spec),
        "tasks": {t: procedural.ATTRIBUTES[t] for t in TASKS},
        "merge_lambda": MERGE_LAMBDA,
        "acceptance": acceptance,
    }


def measure_acceptance(root: Path, data: dict, heads: dict[str, Head], progress: ProgressSink) -> dict[str, Any]:
    """CA of the pre-trained model, of each clean fine-tune on its task, and of the task-arithmetic
    merge (λ = MERGE_LAMBDA) of all clean fine-tunes, merged through the real merge engine."""
    tests = {t: TensorDataset(d[2], d[3]) for t, d in data.items()}
    base_ckpt = open_checkpoint(root / "base")
    merged_path = root / ".merge-check.safetensors"
    merge_checkpoints(base_ckpt, [open_checkpoint(root / "finetuned" / t) for t in TASKS], "task_arithmetic",
                      {"lam": MERGE_LAMBDA}, out=merged_path, overwrite=True)
    base_ca = evaluate(load_encoder(base_ckpt), heads, tests, device="cpu", progress=progress)
    merged_ca = evaluate(load_encoder(str(merged_path)), heads, tests, device="cpu", progress=progress)
    merged_path.unlink()
    finetuned = {}
    for t in TASKS:
        encoder = load_encoder(str(root / "finetuned" / t))
        finetuned[t] = evaluate(encoder, heads, {t: tests[t]}, device="cpu")["tasks"][t]["ca"]
    return {
        "pretrained": {t: base_ca["tasks"][t]["ca"] for t in TASKS},
        "finetuned": finetuned,
        "merged": {t: merged_ca["tasks"][t]["ca"] for t in TASKS},
        "pretrained_avg": base_ca["ca_avg"],
        "finetuned_avg": sum(finetuned.values()) / len(finetuned),
        "merged_avg": merged_ca["ca_avg"],
    }
