"""Every merge method on the built-in zoo: average clean accuracy, the time and peak memory of the merge, and
(with `--attack DIR`) whether a poisoned vector's backdoor survives it.

    python bench/merge_methods.py [--size tiny|small] [--seed 0] [--work DIR] [--methods M,...]
        [--attack DIR] [--lam M=VALUE ...]

CPU, offline. The zoo's clean fine-tunes of every task are merged with each method's defaults (λ as
declared: 0.3 for task arithmetic and TIES, 1 for the spectral methods, as their papers) by
`mergeguard merge $Z/base $Z/finetuned/*/model.safetensors -o OUT --method M`, each merge its own process
(wall time and the child's peak RSS from `os.wait4`), then evaluated on every task's test images. With
`--attack DIR` (an `attack` output folder whose task is in the zoo: e.g. `mergeguard demo`'s `attack/`), the
attacked task's clean fine-tune is replaced by DIR's model and each merge is evaluated with DIR's trigger:
ASR(T) on the attacked task, ASR(N) on the others. `--lam M=VALUE` changes one method's λ (a sensitivity
row, never a default). RegMean and AdaMerging get the unlabeled images they need from each task's training
folder (`data/<task>/train`, labels unread; the test images stay held out for the evaluation), with their
declared defaults. Merges are kept in WORK and reused. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

DATA_FREE = ("task_arithmetic", "ties", "dare_ties", "breadcrumbs", "iso_c", "iso_cts", "tsv_m")
WITH_DATA = ("regmean", "adamerging")


def data_flags(z: Path, method: str, tasks: list[str]) -> list[str]:
    """What a merge that needs images is given: each task's training images, unlabeled (and the heads)."""
    if method == "regmean":
        return [a for t in tasks for a in ("--inputs-per-task", f"{t}={z / 'data' / t / 'train'}")] + ["--device",
                                                                                                       "cpu"]
    if method == "adamerging":
        return ["--heads", str(z / "heads.safetensors"), "--device", "cpu",
                *(a for t in tasks for a in ("--shadow-per-task", f"{t}={z / 'data' / t / 'train'}"))]
    return []


def timed_merge(z: Path, inputs: list[Path], out: Path, method: str, lam: float | None, extra: list[str]) -> dict:
    """One `mergeguard merge` in its own process: wall seconds and peak RSS (MiB); reused when OUT exists."""
    record = out.with_suffix(".time.json")
    if record.exists() and out.exists():
        return json.loads(record.read_text())
    argv = [sys.executable, "-m", "mergeguard", "merge", str(z / "base"), *map(str, inputs), "-o", str(out),
            "--method", method, "--quiet", "--overwrite", *(["--lam", repr(lam)] if lam is not None else []), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"merge failed: {' '.join(argv)}")
    result = {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}
    record.write_text(json.dumps(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--seed", type=int, default=0, help="the zoo's seed (another seed: another zoo)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--methods", default=",".join(DATA_FREE + WITH_DATA))
    ap.add_argument("--attack", type=Path, default=None, help="an attack output folder: the security columns")
    ap.add_argument("--lam", action="append", default=[], metavar="METHOD=VALUE",
                    help="a sensitivity row: METHOD merged with this λ as well")
    args = ap.parse_args()

    from mergeguard.data.folders import labeled_folder
    from mergeguard.data.triggers import load_trigger
    from mergeguard.models.heads import load_heads
    from mergeguard.workflows.zoo import build_zoo

    work = args.work or Path(tempfile.mkdtemp(prefix="merge-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    z = Path(build_zoo(None, size=args.size, seed=args.seed)["root"])
    heads = load_heads(z / "heads.safetensors")
    size = json.loads((z / "zoo.json").read_text())["spec"]["image_size"]
    test = {t: labeled_folder(z / "data" / t / "test", heads[t].classnames, size) for t in heads}
    inputs = {t: z / "finetuned" / t / "model.safetensors" for t in heads}
    trigger, target = None, None
    if args.attack is not None:
        summary = json.loads((args.attack / "summary.json").read_text())
        target = summary["task"]
        inputs[target] = args.attack / "model.safetensors"
        trigger = load_trigger(args.attack / "trigger.safetensors")
    rows = [(m, None) for m in args.methods.split(",")]
    rows += [(m, float(v)) for m, _, v in (item.partition("=") for item in args.lam)]
    tag = f"{args.size}-seed{args.seed}" + ("-attacked" if trigger is not None else "")
    lines = ["| method | " + " | ".join(heads) + " | avg CA | " + ("ASR(T) | ASR(N) | " if trigger else "")
             + "merge time | peak RSS |", "|---" * (len(heads) + (6 if trigger else 4)) + "|"]
    for method, lam in rows:
        name = method + ("" if lam is None else f"_lam{lam:g}")
        out = work / tag / name
        cost = timed_merge(z, list(inputs.values()), out, method, lam, data_flags(z, method, list(inputs)))
        r = harness.measured(work / tag / f"{name}.eval.json", out, heads, test, trigger, target, keep=None)
        per_task = {t: e["ca"] for t, e in r["tasks"].items()}
        label = method + (" (defaults)" if lam is None and method in WITH_DATA else " (λ default)" if lam is None
                          else f" (λ {lam:g})")
        cells = [f"{100 * per_task[t]:.1f}" for t in heads] + [f"{100 * r['ca_avg']:.1f}"]
        if trigger is not None:
            cells += [f"{100 * r['asr_t']:.1f}", "—" if r["asr_n"] is None else f"{100 * r['asr_n']:.1f}"]
        cells += [f"{cost['seconds']:.1f} s", f"{cost['peak_rss_mib']:.0f} MiB"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    print(f"\nzoo {args.size}, seed {args.seed}" + (f"; poisoned input: {args.attack} (target task {target})"
                                                  if trigger is not None else "; clean inputs") + f"; work {work}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
