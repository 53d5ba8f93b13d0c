"""The scan and `defend lfpm --heads` sized for CLIP ViT-B/32 merged on the usual 8 tasks (758 classes): image
passes per stage, counted; seconds and memory projected for this CPU and for one H100.

    python bench/scale.py [--count-only] [--time-batch 4] [--shadow 10000]

CPU, offline, random weights: at this scale the shapes and the pass counts are what is measured.
1. **Counted**: every stage runs for real with the shipped defaults on an encoder that counts the images each
   forward pass takes (with autograd on: a forward and a backward; off: a forward), with heads of the 8 tasks'
   class counts (SUN397 397, Cars 196, DTD 47, RESISC45 45, GTSRB 43, EuroSAT 10, SVHN 10, MNIST 10) and
   `--shadow` shadow images. The pass counts do not depend on the encoder's size, so a 16-px, one-layer encoder
   runs the stages in seconds: θ0's scan (then cached), the scan of one input, `defend lfpm --heads` end to end
   (its scan of the merge, LFPM, its scan of the output).
2. **Per image** on an open_clip ViT-B-32 tower at 224 px: FLOPs of a forward, of a forward and a backward to the
   input (the scan's inversion) and to the weights (LFPM), counted with `torch.utils.flop_counter`; seconds per
   image on this CPU (a few batches of `--time-batch`); bytes autograd keeps per image (saved tensors, fp32;
   half in bf16).
3. **Projected**: passes × seconds per image (this CPU); passes × FLOPs / (a third of the H100's 989 TFLOP/s
   dense bf16), the floor a GPU run is compared with; the largest batch whose activations fit an 80 GB card.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from mergeguard.defend import LFPMConfig
from mergeguard.models.arch import arch_from_name
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head
from mergeguard.scan import ScanConfig, Scanner

CLASSES = {"sun397": 397, "cars": 196, "dtd": 47, "resisc45": 45, "gtsrb": 43, "eurosat": 10, "svhn": 10,
           "mnist": 10}
H100_BF16 = 989e12  # dense bf16 FLOP/s (SXM)
UTIL = 1 / 3
CARD_BYTES = 80e9
MICRO = {"family": "open_clip", "name": "micro", "embed_dim": 16, "quick_gelu": False, "mean": [0.5] * 3,
         "std": [0.25] * 3, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                           "head_width": 16}}


class Counting(ImageEncoder):
    """An encoder that counts the images of each forward pass: `passes["grad"]` with autograd on (a forward and
    a backward follow), `passes["no_grad"]` without."""

    passes: Counter = Counter()

    def forward(self, images, prompts=None):
        Counting.passes["grad" if torch.is_grad_enabled() else "no_grad"] += images.shape[0]
        return super().forward(images, prompts)


def heads_for(dim: int) -> dict[str, Head]:
    g = torch.Generator().manual_seed(0)
    return {t: Head(t, F.normalize(torch.randn(n, dim, generator=g), dim=-1), [f"{t}{i}" for i in range(n)], 100.0)
            for t, n in CLASSES.items()}


def _scan_passes(base: Counting, merged: Counting, images: torch.Tensor, heads: dict, steps: int) -> tuple:
    """(θ0's inversion, one input's) image passes of a scan with `steps` inversion steps."""
    Counting.passes = Counter()
    scanner = Scanner(base, images, heads, ScanConfig(device="cpu", cache=False, steps=steps))
    scanner.scan(merged, "first")  # θ0's inversion happens on the first scan
    first = Counter(Counting.passes)
    Counting.passes = Counter()
    scanner.scan(merged, "second")
    return first - Counting.passes, Counter(Counting.passes)


def _lfpm_passes(base: Counting, merged: Counting, images: torch.Tensor, epochs: int) -> Counter:
    from mergeguard.defend import defend_lfpm

    Counting.passes = Counter()
    defend_lfpm(merged, base, images, LFPMConfig(device="cpu", epochs=epochs))
    return Counter(Counting.passes)


def _linear(at: dict[int, Counter], n: int) -> Counter:
    """The passes at `n` from those counted at two smaller values (a loop whose every step costs the same)."""
    (a, ca), (b, cb) = sorted(at.items())
    return Counter({k: ca[k] + (cb[k] - ca[k]) * (n - a) // (b - a) for k in set(ca) | set(cb)})


def counted(shadow: int) -> dict[str, Counter]:
    """Each stage with the shipped defaults, its image passes counted on a micro encoder. A scan's passes are
    a fixed part (held-out checks) plus the same number per inversion step, and LFPM's the same per epoch, so each
    is counted at two small step (epoch) counts and the two points give the defaults' count; a third count checks
    the line (printed)."""
    torch.manual_seed(0)
    base = Counting(MICRO).eval()
    merged = Counting(MICRO).eval()
    merged.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
    heads = heads_for(MICRO["embed_dim"])
    images = torch.rand(shadow, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps, epochs = ScanConfig().steps, LFPMConfig().epochs
    scans = {k: _scan_passes(base, merged, images, heads, k) for k in (1, 2, 3)}
    theta0 = _linear({k: v[0] for k, v in scans.items() if k < 3}, steps)
    single = _linear({k: v[1] for k, v in scans.items() if k < 3}, steps)
    check = _linear({k: v[1] for k, v in scans.items() if k < 3}, 3) == scans[3][1]
    from torch.utils.data import TensorDataset

    lfpm = {e: _lfpm_passes(base, merged, TensorDataset(images, torch.full((shadow,), -1)), e) for e in (1, 2)}
    training = _linear(lfpm, epochs)
    print(f"scan passes linear in the steps (3 steps counted = 1 and 2 extended): {check}")
    return {
        f"θ0's scan, {steps} steps (once per θ0, shadow set and heads; then cached)": theta0,
        f"scan of one input, {steps} steps (θ0's cached)": single,
        f"LFPM's training, {epochs} epochs over {shadow:,} images": training,
    }


END_TO_END = "defend lfpm --heads end to end (scan of the merge, LFPM's training, scan of its output; θ0's cached)"


def per_image(batch: int) -> dict[str, float]:
    """ViT-B-32 at 224 px: FLOPs per image of a forward, a forward + backward to the input, a forward + backward
    to the weights; CPU seconds per image of each; autograd's saved bytes per image (fp32)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    enc = ImageEncoder(arch_from_name("ViT-B-32")).eval()
    out: dict[str, float] = {}

    def run(mode: str, x: torch.Tensor) -> None:
        for p in enc.parameters():
            p.requires_grad_(mode == "weights")
        x = x.clone().requires_grad_(mode == "input")
        with torch.set_grad_enabled(mode != "forward"):
            y = enc(x)
            if mode != "forward":
                y.sum().backward()

    one = torch.rand(1, 3, 224, 224)
    for mode in ("forward", "input", "weights"):
        counter = FlopCounterMode(display=False)
        with counter:
            run(mode, one)
        out[f"flops_{mode}"] = float(counter.get_total_flops())
        xs = torch.rand(batch, 3, 224, 224)
        run(mode, xs)  # warm-up
        start = time.perf_counter()
        run(mode, xs)
        out[f"seconds_{mode}"] = (time.perf_counter() - start) / batch
    def saved_bytes(batch: int) -> int:
        saved: dict[int, int] = {}  # storage -> bytes: a saved view (an expanded weight) costs its storage once

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = torch.rand(batch, 3, 224, 224, requires_grad=True)
            for p in enc.parameters():
                p.requires_grad_(False)
            enc(x).sum().backward()
        return sum(saved.values())

    # what grows with the batch (the weights autograd also keeps are the same at any batch)
    out["saved_bytes_per_image"] = (saved_bytes(3) - saved_bytes(1)) / 2
    out["parameters"] = float(sum(p.numel() for p in enc.parameters()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count-only", action="store_true", help="the pass counts, no ViT-B-32 timing")
    ap.add_argument("--time-batch", type=int, default=4)
    ap.add_argument("--shadow", type=int, default=10000)
    ap.add_argument("--counts", type=Path, default=None, help="keep the pass counts in this JSON file and reuse them")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.counts is not None and args.counts.exists():  # counted by an earlier run with the same code
        stages = {k: Counter(v) for k, v in json.loads(args.counts.read_text()).items()}
    else:
        stages = counted(args.shadow)
        if args.counts is not None:
            args.counts.write_text(json.dumps(stages))
    print(f"counted in {time.perf_counter() - start:.0f} s (micro encoder, {sum(CLASSES.values())} targets, "
          f"{args.shadow} shadow images)\n")
    lines = ["| stage | passes with grad | passes without | ViT-B-32 FLOP | this CPU (projected) | one H100 at 1/3 "
             "of bf16 peak |", "|---|---|---|---|---|---|"]
    if args.count_only:
        for name, c in stages.items():
            lines.append(f"| {name} | {c['grad']:,} | {c['no_grad']:,} | | | |")
        print("\n".join(lines))
        return
    img = per_image(args.time_batch)
    cost = {}
    for name, c in stages.items():
        # the scan's passes take the gradient to the input; LFPM's to its anti-backdoor vector (the weights)
        to = "weights" if "LFPM" in name else "input"
        cost[name] = (c, c["grad"] * img[f"flops_{to}"] + c["no_grad"] * img["flops_forward"],
                      c["grad"] * img[f"seconds_{to}"] + c["no_grad"] * img["seconds_forward"])
    s1 = next(v for k, v in cost.items() if k.startswith("scan of one"))
    t1 = next(v for k, v in cost.items() if "LFPM" in k)
    cost[END_TO_END] = (s1[0] + s1[0] + t1[0], 2 * s1[1] + t1[1], 2 * s1[2] + t1[2])
    for name, (c, flops, cpu) in cost.items():
        gpu = flops / (H100_BF16 * UTIL)
        lines.append(f"| {name} | {c['grad']:,} | {c['no_grad']:,} | {flops / 1e15:.1f} P | {cpu / 3600:.0f} h | "
                     f"{gpu:.0f} s |")
    print("\n".join(lines))
    per = img["saved_bytes_per_image"] / 2  # bf16
    weights = img["parameters"] * (2 + 4 * 3)  # bf16 weights; LFPM's fp32 vector and Adam's two moments
    print(f"\nViT-B-32 per image: forward {img['flops_forward'] / 1e9:.1f} GFLOP, + backward to the input "
          f"{img['flops_input'] / 1e9:.1f}, to the weights {img['flops_weights'] / 1e9:.1f}; this CPU "
          f"{1 / img['seconds_forward']:.2f} / {1 / img['seconds_input']:.2f} / {1 / img['seconds_weights']:.2f} "
          f"images/s; autograd keeps {img['saved_bytes_per_image'] / 2**20:.1f} MiB per image in fp32 "
          f"({per / 2**20:.1f} MiB in bf16).")
    print(f"80 GB card: about {int((CARD_BYTES - weights) / per):,} images with autograd at once in bf16 (the "
          f"scan's default forward holds 64 targets x 16 images = 1,024, {1024 * per / 1e9:.1f} GB; LFPM's about "
          f"2 x 128 a step, {256 * per / 1e9:.1f} GB, plus {weights / 1e9:.1f} GB of weights and optimiser).")


if __name__ == "__main__":
    main()
