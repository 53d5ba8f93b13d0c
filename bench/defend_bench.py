"""Time and peak memory of `defend lfpm`.

    python bench/defend_bench.py --scale zoo                 # the tiny zoo's sizes, CPU (minutes)
    python bench/defend_bench.py --scale vit-b-32 --device cuda  # issue target: < 5 min on one H100
    python bench/defend_bench.py --scale vit-b-32 --images 32 --batch-size 16 --epochs 1 --path-points 2 \
        --mine-warmup 2 --device cpu      # a CPU smoke run of the real-scale path (minutes)

vit-b-32: an open_clip ViT-B-32 image tower with random weights as θ0, θm = θ0 plus seeded
noise, procedural shadow images at 224 px (10,000 by default), 5 epochs, K = 4, batch 128.
Prints one table row: seconds, images/s, peak memory (GPU when on CUDA, else process RSS).
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

from mergeguard.data import procedural
from mergeguard.defend import LFPMConfig, defend_lfpm
from mergeguard.models.arch import arch_from_name
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.zoo import SIZES, zoo_arch


def shadow_images(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, n, 256):
        attrs = procedural.sample_attributes(min(256, n - start), gen)
        chunks.append(procedural.render(attrs, size, gen))
    return torch.cat(chunks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["zoo", "vit-b-32"], default="zoo")
    parser.add_argument("--images", type=int, default=None,
                        help="shadow images (zoo: as many as the tiny zoo has; vit-b-32: 10000)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--path-points", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mine-warmup", type=int, default=LFPMConfig.mine_warmup,
                        help="stage I steps per prompt before training (each a forward/backward of one batch)")
    parser.add_argument("--prompts", type=int, default=LFPMConfig.prompts)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.scale == "zoo":
        arch, size, n = zoo_arch(SIZES["tiny"]), 32, args.images or SIZES["tiny"].shadow_images
    else:
        arch, size, n = arch_from_name("ViT-B-32"), 224, args.images or 10_000
    base = ImageEncoder(arch).eval()
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for p in merged.parameters():
            p.add_(0.01 * p.std().clamp_min(1e-3) * torch.randn_like(p))
    images = shadow_images(n, size, seed=1)
    shadow = TensorDataset(images, torch.full((n,), -1))
    cfg = LFPMConfig(epochs=args.epochs, batch_size=args.batch_size, path_points=args.path_points,
                     mine_warmup=args.mine_warmup, prompts=args.prompts, device=args.device, lr=1e-3)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _, _, report = defend_lfpm(merged, base, shadow, cfg)
    peak = report.peak_gpu_memory_bytes
    memory = f"{peak / 2**30:.2f} GiB GPU" if peak else \
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
    table = Table(title=f"defend lfpm, {args.scale}, {n} images, {args.epochs} epochs, K={args.path_points}, "
                        f"{args.prompts} prompts × {args.mine_warmup} warm-up mining steps")
    for col in ("device", "steps", "seconds", "images/s", "peak memory"):
        table.add_column(col, justify="right")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    table.add_row(device, str(report.steps), f"{report.seconds:.1f}", f"{report.images_per_second:.3g}",
                  memory)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
