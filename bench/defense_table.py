"""The defense table on the built-in zoo (CPU, offline): LFPM on every merge, beside the free baseline.

    python bench/defense_table.py [--size tiny|small] [--work DIR] [--beta B] [--epochs E]
        [--fresh-prompt-every F] [--set FIELD=VALUE ...]

Runs `mergeguard demo` (zoo → BadMerging on the size's target task, `shape` on tiny and `colour` on small →
task-arithmetic and TIES merges → LFPM → IBVS) into WORK/demo, unless it is already there, then adds what
the demo does not (`--set FIELD=VALUE` changes a field of the demo's settings, `DemoSettings` in
src/mergeguard/workflows/demo.py, e.g. `--set attack.interpolation=feature --set train.steps=400`; the demo and every
row built on its attack then go into folders named after the change, and LoBAM keeps the size's own settings):
- LFPM on the *clean* merge and on the poisoned TIES merge (the demo's LFPM settings; `--beta B`, `--epochs E`
  and `--fresh-prompt-every F` change them for every LFPM row, the demo's poisoned merge included, which is
  then defended again);
- the λ-shrink line: the poisoned merge rebuilt with smaller λ (no training), the baseline LFPM must beat;
- LoBAM: the target task poisoned through LoRA (rank 8, k 2), merged by task arithmetic, then LFPM (its own trigger;
  the clean merge with that trigger as its control). `--no-lobam` skips it (about 4 minutes on tiny).
Prints one markdown table (CA averaged over the 4 tasks; ASR(T) on the target task, ASR(N) on the others, all
with the attacker's trigger; ASR(T)'s count on the clean images, the floor that no defense removing the
trigger's effect goes below, and ASR(N)'s, the other tasks' own confusion into the target index) and
writes it to WORK/table.md and WORK/table.json; then each bar of the defenses issue as met / NOT met
(WORK/checks.txt). About 10 minutes on 2 idle cores (tiny), 17 (small; building its zoo adds 1.5).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import harness
from harness import parse_set, with_sets

from mergeguard.attack import LoBAM, TrainSettings, run_attack
from mergeguard.cli import run_command
from mergeguard.data.folders import labeled_folder, unlabeled_folder
from mergeguard.data.triggers import load_trigger
from mergeguard.defend import defend_lfpm_scanned
from mergeguard.eval import evaluate
from mergeguard.models.encoder import load_encoder, save_encoder
from mergeguard.models.heads import load_heads
from mergeguard.workflows.demo import MARKER, SETTINGS, run_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=sorted(SETTINGS))
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--lams", default="0.2,0.15,0.1", help="λ values of the shrink baseline")
    ap.add_argument("--no-lobam", action="store_true", help="skip the LoBAM rows")
    ap.add_argument("--beta", type=float, default=None,
                    help="LFPM's β for every LFPM row, the demo's poisoned merge included (default: LFPM's)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="LFPM's epochs for every LFPM row, the demo's poisoned merge included (default: LFPM's)")
    ap.add_argument("--fresh-prompt-every", type=int, default=None,
                    help="LFPM's --fresh-prompt-every for every LFPM row (default: LFPM's)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a field of the demo's settings (DemoSettings), e.g. attack.interpolation=feature")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mergeguard-table-"))
    own = SETTINGS[args.size]
    sets = dict(parse_set(own, item) for item in args.set)
    s = with_sets(own, args.set)
    tag = "".join(f"_{k}{v}" for k, v in sets.items())  # each attack's rows in their own folders
    demo_dir = work / f"demo{tag}"
    if (demo_dir / MARKER).exists() and json.loads((demo_dir / MARKER).read_text()).get("rows"):
        demo = json.loads((demo_dir / MARKER).read_text())
    else:
        demo = run_demo(demo_dir, run_command, size=args.size, device="cpu", say=print, settings=s)
    target = s.target_task
    z = Path(demo["zoo"])
    heads = load_heads(z / "heads.safetensors")
    size = load_encoder(str(z / "base")).image_size
    test = {t: labeled_folder(z / "data" / t / "test", heads[t].classnames, size) for t in heads}
    trigger = load_trigger(demo_dir / "attack" / "trigger.safetensors")
    base = load_encoder(str(z / "base"))
    shadow = unlabeled_folder(z / "shadow", size)

    def measure(model, trig=trigger) -> dict:
        return evaluate(model, heads, test, trigger=trig, target_task=target, device="cpu")

    rows: dict[str, dict] = {"pre-trained θ0 (control)": measure(base)}
    rows["clean merge TA (control)"] = measure(load_encoder(str(demo_dir / "clean_merge")))
    lfpm_cfg = replace(s.lfpm, device="cpu")
    changed = {k: v for k, v in (("beta", args.beta), ("epochs", args.epochs),
                                 ("fresh_prompt_every", args.fresh_prompt_every)) if v is not None}
    lfpm_cfg = replace(lfpm_cfg, **changed)
    suffix = "".join(f"_{k}{v:g}" for k, v in changed.items())  # each setting's LFPM outputs in their own folders

    def merged(out: Path, inputs: list[Path], method: str, params: dict) -> Path:
        return harness.merged(z / "base", out, inputs, method, params)

    def lfpm(model_dir: Path, out: Path) -> Path:
        """LFPM (the demo's settings, with the zoo's heads as the demo) on the model in `model_dir`, into `out`,
        unless already there."""
        if not (out / "model.safetensors").exists():
            defended, _, _ = defend_lfpm_scanned(load_encoder(str(model_dir)), base, shadow, lfpm_cfg, heads)
            save_encoder(defended.cpu(), out / "model.safetensors", {"defense": "lfpm"})
        return out

    for name, folder in (("clean merge TA", "clean_merge"), ("poisoned TIES", "poisoned_ties")):
        out = lfpm(demo_dir / folder, work / f"lfpm_{folder}{tag}{suffix}")
        if folder == "poisoned_ties":  # TIES's own confusion, the floor of the TIES rows
            clean_ties = merged(work / "clean_ties", [z / "finetuned" / t / "model.safetensors" for t in heads],
                                "ties", {})
            rows["clean merge TIES (control)"] = measure(load_encoder(str(clean_ties)))
            rows["poisoned TIES"] = measure(load_encoder(str(demo_dir / "poisoned_ties")))
        rows[f"{name} + LFPM"] = measure(load_encoder(str(out)))
    defended_ta = demo_dir / "lfpm" if not changed else lfpm(demo_dir / "poisoned_merge",
                                                              work / f"lfpm_poisoned_merge{tag}{suffix}")
    for name, folder in (("poisoned TA λ 0.3", demo_dir / "poisoned_merge"), ("poisoned TA + LFPM", defended_ta),
                         ("poisoned TA + IBVS", demo_dir / "ibvs")):  # measured again: the demo rows lack newer counts
        rows[name] = measure(load_encoder(str(folder)))
    inputs = [z / "finetuned" / t / "model.safetensors" for t in heads if t != target]
    inputs.append(demo_dir / "attack" / "model.safetensors")
    for lam in (float(v) for v in args.lams.split(",")):
        out = merged(work / f"shrink_{lam:g}{tag}", inputs, "task_arithmetic", {"lam": lam})
        rows[f"λ-shrink: poisoned TA λ {lam:g}"] = measure(load_encoder(str(out)))
    if not args.no_lobam:
        lobam_dir = work / "lobam"
        if not (lobam_dir / "model.safetensors").exists():
            attack = LoBAM(target_class=s.attack.target_class, trigger_steps=own.attack.trigger_steps, amplify=2.0)
            train = TrainSettings(steps=own.train.steps, lr=own.train.lr, batch_size=s.train.batch_size,
                                  logit_scale=s.train.logit_scale, lora_rank=8, device="cpu")
            run_attack(base, heads[target], labeled_folder(z / "data" / target / "train", heads[target].classnames,
                                                           size),
                       target, attack, train, lobam_dir, provenance={"command": "bench/defense_table.py"})
        lobam_trigger = load_trigger(lobam_dir / "trigger.safetensors")
        lobam_merge = merged(work / "lobam_merge", inputs[:-1] + [lobam_dir / "model.safetensors"],
                             "task_arithmetic", {"lam": s.lam})
        out = lfpm(lobam_merge, work / f"lfpm_lobam{suffix}")
        rows["clean merge TA, LoBAM's trigger (control)"] = measure(load_encoder(str(demo_dir / "clean_merge")),
                                                                    lobam_trigger)
        rows[f"LoBAM TA λ {s.lam:g}"] = measure(load_encoder(str(lobam_merge)), lobam_trigger)
        rows["LoBAM TA + LFPM"] = measure(load_encoder(str(out)), lobam_trigger)

    lines = ["| model | avg CA | ASR(T) | ASR(T) without the trigger | ASR(N) | ASR(N) without the trigger |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {pct(r['ca_avg'])} | {pct(r['asr_t'])} | {pct(r.get('asr_t_no_trigger'))} | {pct(r['asr_n'])} "
              f"| {pct(r.get('asr_n_no_trigger'))} |" for k, r in rows.items()]
    table = "\n".join(lines)
    print(f"LFPM: {lfpm_cfg.epochs} epochs, K {lfpm_cfg.path_points}, β {lfpm_cfg.beta:g}, lr {lfpm_cfg.lr:g}, "
          f"{lfpm_cfg.prompts} prompts, {len(shadow)} shadow images")
    print(table)
    (work / "table.md").write_text(table + "\n")
    keys = ("ca_avg", "asr_t", "asr_t_no_trigger", "asr_n", "asr_n_no_trigger")
    (work / "table.json").write_text(json.dumps({k: {m: r.get(m) for m in keys} for k, r in rows.items()}, indent=2))
    checks = issue_checks(rows, s.lam)
    print("\nThe issue's bars (met / NOT met):")
    for line in checks:
        print(f"- {line}")
    (work / "checks.txt").write_text("\n".join(checks) + "\n")
    print(f"work dir: {work}")


def pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def share(row: dict, metric: str = "asr_t") -> str:
    """The trigger's own share of ASR(T) (or ASR(N)): what it adds over the same model's count without it."""
    if row.get(f"{metric}_no_trigger") is None:
        return "-"
    return f"{round(100 * (row[metric] - row[f'{metric}_no_trigger']), 6):.1f} points"


def issue_checks(rows: dict[str, dict], lam: float) -> list[str]:
    """Each bar of the defenses issue, evaluated on the table's rows (points are percentage points)."""
    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    clean = rows["clean merge TA (control)"]
    out = []
    merges = [("task arithmetic", "poisoned TA λ 0.3", "poisoned TA + LFPM", clean),
              ("TIES", "poisoned TIES", "poisoned TIES + LFPM", rows["clean merge TIES (control)"])]
    if "LoBAM TA + LFPM" in rows:
        merges.append(("LoBAM", f"LoBAM TA λ {lam:g}", "LoBAM TA + LFPM",
                       rows["clean merge TA, LoBAM's trigger (control)"]))
    for name, before_key, after_key, control in merges:
        before, after = rows[before_key], rows[after_key]
        if before["asr_t"] < 0.9:
            out.append(f"{name}: the bars below are for a merge with ASR(T) ≥ 90% before; this one has "
                       f"{before['asr_t']:.1%} (the attack does not survive it), so they do not test the defense")
        drop = round(100 * (before["ca_avg"] - after["ca_avg"]), 6)  # 0.697 - 0.717 is not exactly -0.02
        out.append(f"{name}: ASR(T) {before['asr_t']:.1%} → {after['asr_t']:.1%} ≤ 5%: {mark(after['asr_t'] <= 0.05)} "
                   f"(the same merge without the trigger: {pct(after.get('asr_t_no_trigger'))}, so the trigger's "
                   f"share is {share(after)}; the clean merge of the same method with the trigger: "
                   f"{control['asr_t']:.1%}, share {share(control)})")
        out.append(f"{name}: ASR(N) {after['asr_n']:.1%} ≤ the clean merge's {control['asr_n']:.1%} + 2 points: "
                   f"{mark(round(after['asr_n'] - control['asr_n'], 6) <= 0.02)}; not above the undefended "
                   f"{before['asr_n']:.1%}: {mark(after['asr_n'] <= before['asr_n'])} (the trigger's share of ASR(N): "
                   f"{share(before, 'asr_n')} before, {share(after, 'asr_n')} after)")
        out.append(f"{name}: CA {before['ca_avg']:.1%} → {after['ca_avg']:.1%} ({-drop:+.1f} points) loses ≤ 3 points: "
                   f"{mark(drop <= 3)}")
    clean_lfpm = rows["clean merge TA + LFPM"]
    moved = round(100 * (clean_lfpm["ca_avg"] - clean["ca_avg"]), 6)
    out.append(f"clean merge: CA {clean['ca_avg']:.1%} → {clean_lfpm['ca_avg']:.1%} ({moved:+.1f} points) within "
               f"2 points: {mark(abs(moved) <= 2)}; ASR(N) {clean['asr_n']:.1%} → {clean_lfpm['asr_n']:.1%}: "
               f"{mark(clean_lfpm['asr_n'] <= clean['asr_n'])} (the trigger's share of ASR(N): {share(clean, 'asr_n')} "
               f"before, {share(clean_lfpm, 'asr_n')} after)")
    lfpm = rows["poisoned TA + LFPM"]
    shrink = [r for k, r in rows.items() if k.startswith("λ-shrink") and r["asr_t"] <= lfpm["asr_t"]]
    if shrink:
        best = max(r["ca_avg"] for r in shrink)
        out.append(f"λ-shrink at LFPM's ASR(T) or lower keeps at most {best:.1%} CA, LFPM {lfpm['ca_avg']:.1%}: "
                   f"{mark(lfpm['ca_avg'] > best)}")
    else:
        lowest = min((r for k, r in rows.items() if k.startswith("λ-shrink")), key=lambda r: r["asr_t"])
        out.append(f"λ-shrink: no λ tried reaches LFPM's ASR(T) {lfpm['asr_t']:.1%} (the lowest: "
                   f"{lowest['asr_t']:.1%} at CA {lowest['ca_avg']:.1%}; LFPM's CA {lfpm['ca_avg']:.1%}): met")
    ibvs = rows["poisoned TA + IBVS"]
    out.append(f"IBVS beside LFPM: CA {ibvs['ca_avg']:.1%}, ASR(T) {ibvs['asr_t']:.1%} "
               f"(LFPM {lfpm['ca_avg']:.1%}, {lfpm['asr_t']:.1%})")
    return out


if __name__ == "__main__":
    main()
