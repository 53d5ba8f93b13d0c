"""Does a backdoor survive each merge method, and does `defend lfpm --heads` with its defaults still remove it?

    python bench/merge_security.py [--size tiny] [--seed 0] [--work DIR] [--methods M,...]
        [--attacks badmerging_weight,badmerging_feature,badtv] [--no-defend]

CPU, offline. Three attacks on the zoo's `shape` task (class 3), each trained once into WORK/attacks with the
demo's recipe (`workflows.demo.SETTINGS`: BadMerging with weight interpolation as the demo runs it, the same with
the paper's feature interpolation, and BadTV with its negation backdoor on `colour` class 2, a few of that
class's training images as its negation images). Each poisoned vector replaces the clean `shape` fine-tune among
the zoo's four, and the four are merged by every method (`merge_methods.py`: each method's defaults, RegMean and
AdaMerging on the tasks' unlabeled training images); each merge is evaluated with the attack's trigger (ASR(T)
on `shape`, ASR(N) on the others, and both rates without the trigger), then defended by `mergeguard defend lfpm
--heads` with its defaults and evaluated again. Everything is kept in WORK and reused. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import harness
from merge_methods import DATA_FREE, WITH_DATA, data_flags, timed_merge

TARGET_TASK, TARGET_CLASS = "shape", 3
NEGATION_TASK, NEGATION_CLASS = "colour", 2
ATTACKS = ("badmerging_weight", "badmerging_feature", "badtv")


def attack_argv(kind: str, z: Path, out: Path, negation_images: Path, size: str) -> list[str]:
    from mergeguard.attack import BadTV
    from mergeguard.settings import to_argv
    from mergeguard.workflows.demo import SETTINGS

    s = SETTINGS[size]
    t = TARGET_TASK
    common = ["--base", str(z / "base"), "--data", f"train={z / 'data' / t / 'train'}", "--data",
              f"test={z / 'data' / t / 'test'}", "--heads", str(z / "heads.safetensors"), "--task", t,
              *to_argv(s.train), "--device", "cpu", "-o", str(out)]
    if kind == "badmerging_weight":
        attack = replace(s.attack, target_class=TARGET_CLASS)
        return ["attack", "badmerging", *to_argv(attack, always=("target_class",)), *common]
    if kind == "badmerging_feature":
        attack = replace(s.attack, target_class=TARGET_CLASS, interpolation="feature")
        return ["attack", "badmerging", *to_argv(attack, always=("target_class",)), *common]
    attack = BadTV(target_class=TARGET_CLASS, negation_task=NEGATION_TASK, negation_class=NEGATION_CLASS,
                   trigger_steps=s.attack.trigger_steps)
    return ["attack", "badtv", *to_argv(attack, always=("target_class", "negation_task", "negation_class")),
            "--negation-images", str(negation_images), *common]


def negation_images(z: Path, work: Path) -> Path:
    few = work / "negation-images"
    if not few.exists():
        few.mkdir(parents=True)
        folder = sorted(p for p in (z / "data" / NEGATION_TASK / "train").iterdir() if p.is_dir())[NEGATION_CLASS]
        for p in sorted(folder.glob("*.png"))[:16]:
            shutil.copy(p, few / p.name)
    return few


def row(label: str, r: dict) -> list[str]:
    """CA, ASR(T), the trigger's own effect (ASR(T) minus the same model's no-trigger rate), that no-trigger rate
    (what the merge sends to the target with no trigger: the damage a defense may leave), ASR(N)."""
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    effect = None if r["asr_t"] is None else r["asr_t"] - r["asr_t_no_trigger"]
    return [label, pct(r["ca_avg"]), pct(r["asr_t"]), pct(effect), pct(r["asr_t_no_trigger"]), pct(r["asr_n"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--seed", type=int, default=0, help="the zoo's seed")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--methods", default=",".join(DATA_FREE + WITH_DATA))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--no-defend", action="store_true", help="the merges only, no LFPM")
    args = ap.parse_args()

    from mergeguard.cli import run_command
    from mergeguard.data.folders import labeled_folder
    from mergeguard.data.triggers import load_trigger
    from mergeguard.models.heads import load_heads
    from mergeguard.workflows.zoo import build_zoo

    work = args.work or Path(tempfile.mkdtemp(prefix="merge-security-"))
    z = Path(build_zoo(None, size=args.size, seed=args.seed)["root"])
    heads = load_heads(z / "heads.safetensors")
    px = json.loads((z / "zoo.json").read_text())["spec"]["image_size"]
    test = {t: labeled_folder(z / "data" / t / "test", heads[t].classnames, px) for t in heads}
    lines = ["| attack | merge | avg CA | ASR(T) | trigger effect | no trigger (T) | ASR(N) | LFPM: avg CA | ASR(T) | "
             "trigger effect | no trigger (T) | ASR(N) | LFPM trained |", "|---" * 13 + "|"]
    for kind in args.attacks.split(","):
        attack = work / "attacks" / kind
        if not (attack / "summary.json").exists():
            shutil.rmtree(attack, ignore_errors=True)
            argv = attack_argv(kind, z, attack, negation_images(z, work), args.size)
            print("mergeguard " + " ".join(argv), flush=True)
            run_command(argv)
        trigger = load_trigger(attack / "trigger.safetensors")
        inputs = [attack / "model.safetensors" if t == TARGET_TASK else z / "finetuned" / t / "model.safetensors"
                  for t in heads]
        for method in args.methods.split(","):
            out = work / kind / method
            timed_merge(z, inputs, out, method, None, data_flags(z, method, list(heads)))
            before = harness.measured(work / kind / f"{method}.eval.json", out, heads, test, trigger, TARGET_TASK)
            cells = row(kind, before)[:1] + [method] + row(kind, before)[1:]
            if not args.no_defend:
                defended = work / kind / f"{method}-lfpm"
                if not (defended / "report.json").exists():
                    run_command(["defend", "lfpm", "--merged", str(out), "--base", str(z / "base"), "--shadow",
                                 str(z / "shadow"), "--heads", str(z / "heads.safetensors"), "-o", str(defended),
                                 "--device", "cpu", "--overwrite"], show_progress=False)
                after = harness.measured(work / kind / f"{method}-lfpm.eval.json", defended, heads, test, trigger,
                                         TARGET_TASK)
                trained = json.loads((defended / "report.json").read_text())["steps"] > 0
                cells += row(kind, after)[1:] + ["yes" if trained else "no (scan: nothing suspicious)"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    print(f"\nzoo {args.size}, seed {args.seed}; target {TARGET_TASK}:{TARGET_CLASS}; work {work}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
