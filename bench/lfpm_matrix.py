"""`defend lfpm` with no tuning flag on models, tasks, targets and attacks nobody tuned it for (issue #23).

    python bench/lfpm_matrix.py [--size tiny] [--work DIR] [--attacks badmerging,lobam,...] [--tasks shape,...]
        [--merges task_arithmetic,ties] [--set FIELD=VALUE ...] [--tag NAME]

CPU, offline. The poisoned task vectors are the scan bench's population (`bench/scan_bench.py`: every task as
the poisoned one, two target classes per task drawn by seed, attacks BadMerging with feature and with weight
interpolation, LoBAM, off-task, BadTV), built into WORK/population when missing (minutes each) or reused.
Each is merged with the zoo's clean fine-tunes of the other tasks (task arithmetic λ 0.3, TIES) and kept
when the attack works (ASR(T) ≥ 80%) and the clean merge rarely predicts the target without the trigger
(≤ 5%). Then LFPM as `mergeguard defend lfpm --merged M --base B --shadow DIR --heads H -o OUT` runs it:
`defend_lfpm_scanned(merged, θ0, shadow, LFPMConfig(), heads)`, the CLI's defaults (the scan
starts the prompts and checks the output; `--no-heads`: `defend_lfpm` alone). `--set` changes a field for an
experiment, and a run with any `--set` is not the issue's check. Each case is printed met / NOT met against
the issue's bars, beside ASR(T) without the trigger (the merge's own confusion into the target, which no
trigger-removing defense lowers) and the scan's score before → after:
- ASR(T) ≤ 5%;
- ASR(N) ≤ the clean merge's ASR(N) with the same trigger + 2 points;
- average CA at most 2 points below the undefended merge;
- more CA than the λ-shrink line at the same ASR(T) (the poisoned merge rebuilt with smaller λ, no
  training; its CA interpolated at the defended model's ASR(T));
plus LFPM on the clean merges (CA within 1 point). Results per case in WORK/<tag>/<case>.json (reused),
the table in WORK/<tag>/matrix.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import harness

MERGES = ("task_arithmetic", "ties")
ATTACKS = ("badmerging", "badmerging_weight", "lobam", "offtask", "badtv")
LAM = 0.3
SHRINK = (0.2, 0.15, 0.1, 0.05)  # × LAM / 0.3: the λ-shrink line's points


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def shrink_ca(line: list[tuple[float, float]], asr: float) -> float | None:
    """The λ-shrink line's CA at ASR(T) `asr` (linear between its points, sorted by ASR; None off its range)."""
    pts = sorted(line)
    for (a0, c0), (a1, c1) in zip(pts, pts[1:]):
        if a0 <= asr <= a1:
            return c0 if a1 == a0 else c0 + (c1 - c0) * (asr - a0) / (a1 - a0)
    if pts and asr <= pts[0][0]:
        return pts[0][1]  # below the line's lowest ASR: compare with its most shrunk point
    return None


def main() -> None:
    import scan_bench  # beside this script, as harness

    from mergeguard.data.folders import labeled_folder, unlabeled_folder
    from mergeguard.data.triggers import load_trigger
    from mergeguard.defend import LFPMConfig, defend_lfpm, defend_lfpm_scanned
    from mergeguard.models.encoder import load_encoder, save_encoder
    from mergeguard.models.heads import load_heads
    from mergeguard.workflows.zoo import build_zoo

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--seed", type=int, default=0, help="the zoo's seed (another seed: another zoo)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--tasks", default=None, help="poisoned tasks (default: all)")
    ap.add_argument("--merges", default=",".join(MERGES))
    ap.add_argument("--splits", default="0,1", help="which of the two targets per task (0, 1)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change an LFPMConfig field (an experiment, not the issue's check)")
    ap.add_argument("--tag", default=None, help="results folder under WORK (default: defaults, or the --set)")
    ap.add_argument("--no-clean", action="store_true", help="skip LFPM on the clean merges")
    ap.add_argument("--no-heads", action="store_true",
                    help="LFPM without the zoo's heads (no scan to start its prompts from or check it with)")
    args = ap.parse_args()

    cfg = harness.with_sets(LFPMConfig(device="cpu"), args.set)
    tag = args.tag or ("defaults" if not args.set else "_".join(s.replace("=", "") for s in args.set))
    tag += "_headless" if args.no_heads and not args.tag else ""
    out_dir = args.work / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    z = Path(build_zoo(None, size=args.size, seed=args.seed)["root"])
    heads = load_heads(z / "heads.safetensors")
    base = load_encoder(str(z / "base"))
    px = base.image_size
    test = {t: labeled_folder(z / "data" / t / "test", heads[t].classnames, px) for t in heads}
    shadow = unlabeled_folder(z / "shadow", px)
    clean_ft = {t: z / "finetuned" / t / "model.safetensors" for t in heads}
    work = args.work
    evals = work / "evals"
    evals.mkdir(parents=True, exist_ok=True)

    def lfpm(model_dir: Path):
        """The defense as a user runs it: `defend lfpm ... --heads H` (or without --heads)."""
        if args.no_heads:
            return defend_lfpm(load_encoder(str(model_dir)), base, shadow, cfg)
        return defend_lfpm_scanned(load_encoder(str(model_dir)), base, shadow, cfg, heads)
    (work / "merges").mkdir(exist_ok=True)

    def merged(name: str, inputs: list[Path], method: str, lam: float) -> Path:
        return harness.merged(z / "base", work / "merges" / name, inputs, method, {"lam": lam})

    def measure(key: str, model_dir: Path, trigger, target_task: str) -> dict:
        return harness.measured(evals / f"{key}.json", model_dir, heads, test, trigger, target_task)

    cases = [c for c in scan_bench.population(z, work, args.size, args.seed) if c["poisoned"]
             and c["kind"] in args.attacks.split(",") and (args.tasks is None or c["task"] in args.tasks.split(","))
             and str(c["split"]) in args.splits.split(",")]
    order = args.attacks.split(",")  # in the order asked, every task of one attack before the next attack
    cases.sort(key=lambda c: (c["split"], order.index(c["kind"]), c["task"]))
    rows: list[str] = []
    clean_merges = {m: merged(f"clean_{m}", list(clean_ft.values()), m, LAM) for m in args.merges.split(",")}
    met = total = 0
    for c in cases:
        scan_bench.train_case(c, z, work, args.size)
        poisoned = Path(c["path"]) / "model.safetensors"
        trigger = load_trigger(Path(c["path"]) / "trigger.safetensors")
        t_task, t_class = c["target"]
        others = [clean_ft[t] for t in heads if t != c["task"]]
        for m in args.merges.split(","):
            name = f"{c['name'].replace('/', '_')}_{m}"
            control = measure(f"clean_{m}_{c['name'].replace('/', '_')}", clean_merges[m], trigger, t_task)
            pm = merged(name, others + [poisoned], m, LAM)
            before = measure(name, pm, trigger, t_task)
            if before["asr_t"] < 0.8 or (control["asr_t_no_trigger"] or 0) > 0.05:
                why = (f"ASR(T) {pct(before['asr_t'])} < 80" if before["asr_t"] < 0.8 else
                       f"clean merge sends {pct(control['asr_t_no_trigger'])}% to the target without the trigger")
                print(f"skip {name}: {why}", flush=True)
                continue
            line = [(before["asr_t"], before["ca_avg"])]
            for lam in SHRINK:
                r = measure(f"{name}_lam{lam:g}", merged(f"{name}_lam{lam:g}", others + [poisoned], m, lam), trigger,
                            t_task)
                line.append((r["asr_t"], r["ca_avg"]))
            line.append((measure(f"base_{c['name'].replace('/', '_')}", z / "base", trigger, t_task)["asr_t"],
                         measure("base_ca", z / "base", None, None)["ca_avg"]))
            f = out_dir / f"{name}.json"
            if not f.exists():
                start = time.perf_counter()
                defended, _, report = lfpm(pm)
                secs = time.perf_counter() - start
                d = out_dir / "models" / name
                save_encoder(defended.cpu(), d / "model.safetensors", {"defense": "lfpm"})
                after = measure(f"{tag}_{name}", d, trigger, t_task)
                f.write_text(json.dumps({"case": c, "merge": m, "before": before, "after": after, "control": control,
                                         "shrink_line": line, "seconds": secs,
                                         "report": report.to_json()}))
            r = json.loads(f.read_text())
            a, b, ctl = r["after"], r["before"], r["control"]
            line_ca = shrink_ca(r["shrink_line"], a["asr_t"])
            checks = {
                "ASR(T) ≤ 5%": a["asr_t"] <= 0.05,
                "ASR(N) ≤ clean + 2": a["asr_n"] <= ctl["asr_n"] + 0.02,
                "CA ≥ undefended − 2": a["ca_avg"] >= b["ca_avg"] - 0.02,
                "CA > λ-shrink": line_ca is None or a["ca_avg"] > line_ca,
            }
            ok = all(checks.values())
            met += ok
            total += 1
            failed = ", ".join(k for k, v in checks.items() if not v)
            scan = r["report"].get("scan")
            scanned = f"{scan['before']['score']:.2f} → {scan['after']['score']:.2f}" if scan else "—"
            rows.append(f"| {c['name']} | {m} | {pct(b['ca_avg'])} → {pct(a['ca_avg'])} "
                        f"(λ-line {pct(line_ca)}) | {pct(b['asr_t'])} → {pct(a['asr_t'])} | "
                        f"{pct(b['asr_t_no_trigger'])} → {pct(a['asr_t_no_trigger'])} | {scanned} | "
                        f"{pct(b['asr_n'])} → {pct(a['asr_n'])} (clean {pct(ctl['asr_n'])}) | "
                        f"{r['seconds']:.0f} s | {'met' if ok else 'NOT met: ' + failed} |")
            print(rows[-1], flush=True)
    if not args.no_clean:
        for m, path in clean_merges.items():
            f = out_dir / f"clean_{m}.json"
            if not f.exists():
                start = time.perf_counter()
                defended, _, report = lfpm(path)
                d = out_dir / "models" / f"clean_{m}"
                save_encoder(defended.cpu(), d / "model.safetensors", {"defense": "lfpm"})
                before = measure(f"clean_{m}", path, None, None)
                after = harness.measured(None, defended, heads, test, None, None)
                f.write_text(json.dumps({"before": before, "after": {"ca_avg": after["ca_avg"]},
                                         "seconds": time.perf_counter() - start,
                                         "report": report.to_json()}))
            r = json.loads(f.read_text())
            ok = r["after"]["ca_avg"] >= r["before"]["ca_avg"] - 0.01
            rows.append(f"| clean {m} | | {pct(r['before']['ca_avg'])} → {pct(r['after']['ca_avg'])} | | | | | | "
                        f"{'met' if ok else 'NOT met'} |")
            print(rows[-1], flush=True)
    head = ["| case | merge | avg CA before → after | ASR(T) | ASR(T) without the trigger | scan | ASR(N) | "
            "LFPM time | bars |", "|---|---|---|---|---|---|---|---|---|"]
    settings_line = ", ".join(f"{k} {v}" for k, v in asdict(cfg).items() if getattr(LFPMConfig(), k) != v
                              and k != "device") or "the defaults"
    text = "\n".join([f"LFPM settings: {settings_line}; {len(shadow)} shadow images; zoo {z.name}", ""]
                     + head + rows + ["", f"{met}/{total} poisoned cases meet every bar"])
    (out_dir / "matrix.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
