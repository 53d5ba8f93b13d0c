"""Speed and peak memory of `attack badmerging` (both stages) at a given scale.

    python bench/attack_bench.py --scale vit-b-32 --device cuda      # the paper's model size on a GPU
    python bench/attack_bench.py --scale zoo                         # the tiny zoo's sizes, CPU

vit-b-32: an open_clip ViT-B-32 image tower with random weights as θ0 (no weights can be
downloaded here), a 10-class head of random unit rows, procedural images at 224 px, the paper's
batch 128. Runs stage 1 (trigger optimisation) and stage 2 (feature-interpolation fine-tune)
through the same code as `mergeguard attack badmerging` and prints one table row per stage:
steps, seconds, images/s (forward images per second, clean + triggered), peak memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

from mergeguard.attack import BadMerging, TrainSettings, finetune
from mergeguard.attack.badmerging import optimize_trigger
from mergeguard.data import procedural
from mergeguard.models.arch import arch_from_name
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head
from mergeguard.models.zoo import SIZES, zoo_arch
from mergeguard.progress import NullProgress
from mergeguard.trainer import resolve_device


def images_and_labels(n: int, size: int, classes: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, n, 256):
        attrs = procedural.sample_attributes(min(256, n - start), gen)
        chunks.append(procedural.render(attrs, size, gen))
    images = torch.cat(chunks)
    return TensorDataset(images, torch.randint(classes, (n,), generator=gen))


def peak(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["zoo", "vit-b-32"], default="zoo")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--trigger-steps", type=int, default=30)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    torch.manual_seed(0)
    arch, size = (zoo_arch(SIZES["tiny"]), 32) if args.scale == "zoo" else (arch_from_name("ViT-B-32"), 224)
    base = ImageEncoder(arch).eval()
    classes = 10
    weight = F.normalize(torch.randn(classes, arch["embed_dim"]), dim=-1)
    head = Head("bench", weight, [f"class {i}" for i in range(classes)], 100.0)
    data = images_and_labels(args.images, size, classes, seed=1)
    attack = BadMerging(trigger_steps=args.trigger_steps, target_class=1)
    cfg = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=1e-5, device=args.device)
    dev = resolve_device(args.device)
    rows = []

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trigger = optimize_trigger(base.to(dev), head, data, attack, cfg, "bench", NullProgress())
    sync()
    t1 = time.perf_counter()
    rows.append(("stage 1: trigger", attack.trigger_steps, t1 - t0, attack.trigger_steps * cfg.batch_size / (t1 - t0),
                 peak(dev)))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    finetune(base, head, data, "bench", cfg, attack, trigger=trigger)
    sync()
    t1 = time.perf_counter()
    # each step runs the model on the clean and the triggered batch (and θ0 on the triggered one)
    rows.append(("stage 2: poisoned fine-tune", cfg.steps, t1 - t0, 2 * cfg.steps * cfg.batch_size / (t1 - t0),
                 peak(dev)))

    device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    table = Table(title=f"attack badmerging, {args.scale}, batch {cfg.batch_size}, {device}")
    for col in ("stage", "steps", "seconds", "images/s", "peak memory"):
        table.add_column(col, justify="right")
    for name, steps, seconds, ips, mem in rows:
        table.add_row(name, str(steps), f"{seconds:.1f}", f"{ips:.4g}", mem)
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
