"""Does `scan` see what `defend` did? The demo's merges and defenses, each scanned against θ0 with no trigger,
next to the ASR(T) the demo measured with the attacker's real trigger (issue #22: a model LFPM cleaned scans
`clean`; the undefended merge scans `backdoored`).

    python bench/scan_defended.py [--size tiny] [--work DIR]

CPU, offline. Runs `mergeguard demo` into WORK/demo (reused when it is there), then scans the clean merge,
the poisoned merge (task arithmetic and TIES), LFPM's and IBVS's outputs with the zoo's heads and shadow
images and the scan's default settings, and, for the poisoned merge, attributes it among its inputs (the
zoo's clean fine-tunes of the other tasks and the attacker's model).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    from mergeguard.cli import run_command
    from mergeguard.data import stack_images
    from mergeguard.data.folders import unlabeled_folder
    from mergeguard.models.encoder import load_encoder
    from mergeguard.models.heads import load_heads
    from mergeguard.scan import ScanConfig, Scanner, scan_models
    from mergeguard.workflows.demo import MARKER, run_demo

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="scan-defended-"))
    demo = work / "demo"
    marker = demo / MARKER
    if not (marker.exists() and json.loads(marker.read_text()).get("rows")):
        print(f"running the {args.size} demo into {demo} ...", flush=True)
        run_demo(demo, run_command, size=args.size, device="cpu", say=print)
    result = json.loads(marker.read_text())
    z = Path(result["zoo"])
    heads = load_heads(z / "heads.safetensors")
    base = load_encoder(str(z / "base"))
    images = stack_images(unlabeled_folder(z / "shadow", base.image_size))
    cfg = ScanConfig(device="cpu")
    scanner = Scanner(base, images, heads, cfg)
    rows = {**result["rows"], **result["extra_rows"]}
    target = result["settings"]["target_task"]
    attack = result["settings"]["attack"]
    print(f"\n{args.size} demo: BadMerging on {target}, target class {attack['target_class']}; scan defaults "
          f"(steps {cfg.steps}, batch {cfg.batch_size}, thresholds {cfg.suspicious:g} / {cfg.backdoored:g})\n")
    print("| model | CA | ASR(T), real trigger | scan score | verdict | suspected target | share | expected | "
          "seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("clean_merge", "poisoned_merge", "poisoned_ties", "lfpm", "ibvs"):
        start = time.perf_counter()
        r = scanner.scan(load_encoder(str(demo / name)), name)
        asr = rows[name]["asr_t"]
        expected = "backdoored" if asr >= 0.8 else "clean" if asr <= 0.05 else "-"
        t = r.target
        print(f"| {name} | {rows[name]['ca_avg']:.1%} | {asr:.1%} | {r.score:.2f} | {r.verdict} | "
              f"{t['task']}:{t['class']} | {t['share']:.0%} | {expected} "
              f"{'met' if expected == '-' or expected == r.verdict else 'NOT met'} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
    tasks = list(heads)
    inputs = [(f"clean {t}", load_encoder(str(z / "finetuned" / t / "model.safetensors"))) for t in tasks
              if t != target] + [(f"poisoned {target}", load_encoder(str(demo / "attack" / "model.safetensors")))]
    att = scan_models(scanner, inputs, merged=("poisoned_merge", load_encoder(str(demo / "poisoned_merge"))))
    print("\nattribution of the poisoned merge (share of held-out shadow images each input sends to the "
          "suspected target with the trigger recovered from the merge):")
    for a in att.attribution:
        print(f"  {a['input']}: {a['share']:.0%}")
    print(f"poisoned input ranked first: {att.attribution[0]['input'] == f'poisoned {target}'}")


if __name__ == "__main__":
    main()
