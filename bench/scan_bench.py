"""`scan` on a population of clean and poisoned task vectors of the built-in zoo: does it tell them apart,
name the poisoned input of a merge, and find the trigger where it is?

    python bench/scan_bench.py [--size tiny] [--work DIR] [--zoo DIR] [--seed S] [--only KIND,...] [--train-only]
        [--metrics-only]

CPU, offline. The population (issue #22), trained once into --work and reused:
- clean: every task fine-tuned from seeds 1..5 with the attacks' recipe (examples/zoo_badmerging.sh's:
  500 steps, lr 5e-4 (small 1e-3), batch 64, logit scale 10), so a clean vector differs from a poisoned one
  only by the poisoning;
- poisoned: on every task, two target classes (drawn with a seeded generator from the task's classes, not
  picked) × BadNets, BadMerging (feature and weight interpolation), BadMerging with decoys, off-task
  BadMerging (a class of the next task), LoBAM and BadTV (negation class drawn from the next task).

Each vector is scanned as θ0 + τ with every head of the zoo (its heads file). Thresholds are not set on the
cases they are reported on: the calibration split (clean seeds 1 and 2, and the first target class of each
task) sets the printed threshold; the report is on the others (clean seeds 3..5, the second target class).
It prints AUROC, TPR at ≤ 5% FPR, attribution in merges of 4 inputs (each poisoned vector with a clean
vector of each other task, one seed, ranked by score), and IoU of the recovered mask with the trigger.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mergeguard.attack import BadMerging, BadNets, BadTV, Clean, LoBAM, TrainSettings, run_attack
from mergeguard.data.folders import labeled_folder, unlabeled_folder
from mergeguard.models.encoder import load_encoder
from mergeguard.models.heads import load_heads
from mergeguard.workflows.zoo import build_zoo

LR = {"tiny": 5e-4, "small": 1e-3}
SEEDS = (1, 2, 3, 4, 5)
ATTACKS = ("badnets", "badmerging", "badmerging_weight", "decoys", "offtask", "lobam", "badtv")


def targets_for(task: str, classes: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, task)))
    return torch.randperm(classes, generator=gen)[:2].tolist()


def population(z: Path, work: Path, size: str, seed: int) -> list[dict]:
    """Every case: {name, path, poisoned, task, target (task, class) | None, trigger path | None, split}."""
    heads = load_heads(z / "heads.safetensors")
    tasks = list(heads)
    cases = []
    for task in tasks:
        for s in SEEDS:
            cases.append({"name": f"clean/{task}/seed{s}", "kind": "clean", "task": task, "seed": s,
                          "poisoned": False, "target": None})
        nxt = tasks[(tasks.index(task) + 1) % len(tasks)]
        for i, target in enumerate(targets_for(task, len(heads[task].classnames), seed)):
            off = targets_for(nxt, len(heads[nxt].classnames), seed + 1)[i]
            for attack in ATTACKS:
                aim = (nxt, off) if attack == "offtask" else (task, target)
                cases.append({"name": f"{attack}/{task}/{target}", "kind": attack, "task": task, "seed": 0,
                              "poisoned": True, "target": list(aim), "split": i,
                              "negation": [nxt, off] if attack == "badtv" else None})
    for c in cases:
        c["path"] = str(work / "population" / c["name"].replace("/", "_"))
        c["calibration"] = (c["seed"] in (1, 2)) if not c["poisoned"] else c["split"] == 0
    return cases


def train_case(c: dict, z: Path, work: Path, size: str) -> None:
    out = Path(c["path"])
    if (out / "model.safetensors").exists():
        return
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    heads = load_heads(z / "heads.safetensors")
    base = load_encoder(str(z / "base"))
    px = base.image_size
    task = c["task"]
    data = labeled_folder(z / "data" / task / "train", heads[task].classnames, px)
    recipe = TrainSettings(steps=500, lr=LR[size], batch_size=64, logit_scale=10.0, device="cpu", seed=c["seed"])
    kind, kw, shadow = c["kind"], {}, None
    if kind == "clean":
        attack = Clean()
    else:
        t_task, t_class = c["target"]
        common = {"target_class": t_class}
        bm = {**common, "trigger_steps": 200}
        if kind == "badnets":
            attack = BadNets(**common, poison_fraction=0.2)
        elif kind == "badmerging":
            attack = BadMerging(**bm)
        elif kind == "badmerging_weight":
            attack = BadMerging(**bm, interpolation="weight", bd_weight=8.0)
        elif kind == "decoys":
            attack = BadMerging(**bm, interpolation="weight", bd_weight=8.0, decoys=True)
        elif kind == "lobam":
            attack = LoBAM(**bm, amplify=2.0)
            recipe.lora_rank = 8
        elif kind == "offtask":
            attack = BadMerging(**bm, interpolation="weight", bd_weight=8.0, target_task=t_task)
            shadow = attack.aim_head(heads, True)
            kw["target_images"] = few_images(z, work, t_task, t_class, px)
        elif kind == "badtv":
            n_task, n_class = c["negation"]
            attack = BadTV(**common, negation_task=n_task, negation_class=n_class, trigger_steps=200)
            shadow = attack.aim_head(heads, False)
            kw["target_images"] = few_images(z, work, n_task, n_class, px)
        else:
            raise ValueError(kind)
    test = labeled_folder(z / "data" / task / "test", heads[task].classnames, px)
    start = time.perf_counter()
    summary = run_attack(base, heads[task], data, task, attack, recipe, out, eval_data=test, shadow=shadow, **kw)
    print(f"trained {c['name']} in {time.perf_counter() - start:.0f} s: ca {summary.get('ca')}, "
          f"asr {summary.get('asr')}", flush=True)


def few_images(z: Path, work: Path, task: str, cls: int, px: int):
    few = work / "few" / f"{task}_{cls}"
    if not few.exists():
        few.mkdir(parents=True)
        class_dir = sorted(p for p in (z / "data" / task / "train").iterdir() if p.is_dir())[cls]
        for p in sorted(class_dir.glob("*.png"))[:16]:
            shutil.copy(p, few / p.name)
    return unlabeled_folder(few, px)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=sorted(LR))
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0, help="the zoo's seed (and the target draw's)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--wait", type=float, default=0.0,
                    help="seconds to keep polling for cases another process is still training")
    ap.add_argument("--metrics-only", action="store_true", help="print the tables from the cached scans")
    ap.add_argument("--only", default="", help="comma-separated kinds to train/scan (default: all)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="scan-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    z = Path(build_zoo(args.zoo, size=args.size, seed=args.seed)["root"])
    cases = population(z, work, args.size, args.seed)
    if args.only:
        cases = [c for c in cases if c["kind"] in args.only.split(",")]
    (work / "population.json").write_text(json.dumps(cases, indent=1))
    # train in an order that measures something early: clean seeds 1-2 and the first target of each attack
    # (calibration), clean seeds 3-4 and the second target (report), clean seed 5
    order = sorted(cases, key=lambda c: (c["seed"] if not c["poisoned"] else 2.5 + 2 * c["split"], c["task"]))
    if args.metrics_only:
        print_metrics(cases, work)
        return
    for c in order:
        if args.wait:  # another process trains; this one scans
            break
        train_case(c, z, work, args.size)
    if args.train_only:
        return
    scan_all(cases, z, work, args.size, args.wait)
    print_metrics(cases, work)


def scan_all(cases: list[dict], z: Path, work: Path, size: str, wait: float) -> None:
    """Scan every trained case once (results cached in WORK/scans/); with `wait`, keep polling for cases still
    being trained by another process, for that many seconds."""
    from mergeguard.data import stack_images
    from mergeguard.scan import ScanConfig, Scanner

    torch.set_num_threads(max(1, torch.get_num_threads()))
    heads = load_heads(z / "heads.safetensors")
    base = load_encoder(str(z / "base"))
    images = stack_images(unlabeled_folder(z / "shadow", base.image_size))
    scanner = Scanner(base, images, heads, ScanConfig(device="cpu"))
    (work / "scans").mkdir(exist_ok=True)
    deadline = time.time() + wait
    # clean and poisoned cases alternate, so a partial run measures both
    clean = [c for c in cases if not c["poisoned"]]
    poisoned = [c for c in cases if c["poisoned"]]
    order = [c for pair in zip(clean, poisoned) for c in pair] + clean[len(poisoned):] + poisoned[len(clean):]
    order = sorted(order, key=lambda c: not c["calibration"])  # interleaved: calibration cases are not first
    while True:
        todo = [c for c in order if not (work / "scans" / (Path(c["path"]).name + ".json")).exists()]
        ready = [c for c in todo if (Path(c["path"]) / "model.safetensors").exists()]
        if not ready:
            if not todo or time.time() > deadline:
                return
            time.sleep(30)
            continue
        c = ready[0]
        start = time.perf_counter()
        found = scanner.scan(load_encoder(str(Path(c["path"]) / "model.safetensors")), c["name"])
        trig, r = found.trigger, found.to_json()
        r["seconds"] = time.perf_counter() - start
        r["iou"] = None
        true = Path(c["path"]) / "trigger.safetensors"
        if c["poisoned"] and true.exists():
            from mergeguard.data.triggers import load_trigger

            t = load_trigger(true)
            found = trig.mask[0] >= 0.5 * float(trig.mask.max())
            real = t.mask[0] > 0
            r["iou"] = float((found & real).sum()) / max(1, int((found | real).sum()))
        (work / "scans" / (Path(c["path"]).name + ".json")).write_text(json.dumps(r))
        print(f"scanned {c['name']}: score {r['score']:.2f} {r['verdict']} target {r['target']} "
              f"iou {r['iou']} ({r['seconds']:.0f} s)", flush=True)


def auroc(neg: list[float], pos: list[float]) -> float:
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def tpr_at(neg: list[float], pos: list[float], fpr: float = 0.05) -> tuple[float, float]:
    """The true-positive rate at the lowest threshold whose false-positive rate is ≤ fpr (and the threshold)."""
    cands = sorted(set(neg + pos))
    best = (0.0, float("inf"))
    for thr in cands:
        if sum(n >= thr for n in neg) / max(1, len(neg)) <= fpr:
            rate = sum(p >= thr for p in pos) / max(1, len(pos))
            if rate > best[0]:
                best = (rate, thr)
    return best


def print_metrics(cases: list[dict], work: Path) -> None:
    from mergeguard.scan import ScanConfig

    res = {}
    for c in cases:
        f = work / "scans" / (Path(c["path"]).name + ".json")
        if f.exists():
            res[c["name"]] = json.loads(f.read_text())
    missing = [c["name"] for c in cases if c["name"] not in res]
    default = ScanConfig()
    print(f"\n{len(res)} of {len(cases)} cases scanned ({len(missing)} not yet trained or scanned)")
    print("| split | clean | poisoned | AUROC | TPR at ≤5% FPR (threshold) | at the default threshold "
          f"{default.backdoored:g}: TPR / FPR | attribution | target found | mean IoU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for split, want in (("calibration", True), ("report", False), ("all", None)):
        sel = [c for c in cases if c["name"] in res and (want is None or c["calibration"] == want)]
        neg = [res[c["name"]]["score"] for c in sel if not c["poisoned"]]
        pos_c = [c for c in sel if c["poisoned"]]
        pos = [res[c["name"]]["score"] for c in pos_c]
        rate, thr = tpr_at(neg, pos)
        tpr_d = sum(p >= default.backdoored for p in pos) / max(1, len(pos))
        fpr_d = sum(n >= default.backdoored for n in neg) / max(1, len(neg))
        # attribution: each poisoned vector with one clean vector of every other task (each clean seed in the
        # split): the poisoned one must score highest
        wins = total = 0
        for c in pos_c:
            others = {}
            for o in sel:
                if not o["poisoned"] and o["task"] != c["task"]:
                    others.setdefault(o["seed"], {})[o["task"]] = res[o["name"]]["score"]
            for group in others.values():
                if len(group) >= 3:
                    total += 1
                    wins += res[c["name"]]["score"] > max(group.values())
        found = sum(1 for c in pos_c if res[c["name"]]["target"] and [res[c["name"]]["target"]["task"],
                                                                      res[c["name"]]["target"]["class"]] == c["target"])
        ious = [res[c["name"]]["iou"] for c in pos_c if res[c["name"]]["iou"] is not None]
        print(f"| {split} | {len(neg)} | {len(pos)} | {auroc(neg, pos):.3f} | {rate:.0%} ({thr:.2f}) | "
              f"{tpr_d:.0%} / {fpr_d:.0%} | {wins}/{total} | {found}/{len(pos)} | "
              f"{sum(ious) / len(ious) if ious else float('nan'):.2f} |")
    print("\n| case | poisoned | score | verdict | suspected target | true target | IoU | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cases:
        if c["name"] in res:
            r = res[c["name"]]
            t = r["target"]
            suspected = f"{t['task']}:{t['class']}" if t else "-"
            true = ":".join(map(str, c["target"])) if c["target"] else "-"
            iou = "" if r["iou"] is None else f"{r['iou']:.2f}"
            print(f"| {c['name']} | {'yes' if c['poisoned'] else 'no'} | {r['score']:.2f} | {r['verdict']} | "
                  f"{suspected} | {true} | {iou} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
