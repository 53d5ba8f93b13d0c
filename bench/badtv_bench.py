"""BadTV on the built-in zoo: does its backdoor work added, subtracted and in an analogy, and do the
controls stay quiet? Prints one row per case with met / NOT met against issue #24's bars.

    python bench/badtv_bench.py [--size tiny] [--seed 0] [--attack-seed 0] [--work DIR] [--zoo DIR] [--no-lfpm]
        [--task shape --target-class 3 --negation-task colour --negation-class 1]

CPU, offline. The attack recipe is examples/zoo_badmerging.sh's (500 steps, lr 5e-4, batch 64, logit scale
10, 200 trigger steps): `shape` poisoned with target class 3 ("cross", which the clean merge rarely predicts),
the negation backdoor aimed at class 1 of `colour` with 16 of its training images. Trained models are kept
in --work, so a second run only measures. The small zoo: `--size small` (its own target: `shape` class 1).
The task, both targets and the zoo's seed are flags, so the bars can be checked on cases nobody tuned for; the
analogy rows use the two tasks that are neither the attacked nor the control one. The defense rows run
`defend lfpm` as a user does (its defaults, with the zoo's heads: `defend_lfpm_scanned`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mergeguard.attack import BadMerging, BadTV, Clean, TrainSettings, run_attack
from mergeguard.checkpoint import open_checkpoint
from mergeguard.data.folders import labeled_folder, unlabeled_folder
from mergeguard.data.triggers import load_trigger
from mergeguard.eval import evaluate
from mergeguard.merge.engine import merge_checkpoints
from mergeguard.models.encoder import load_encoder
from mergeguard.models.heads import load_heads
from mergeguard.workflows.zoo import build_zoo

TARGET = {"tiny": 3, "small": 1}  # `shape`'s target class when --target-class is not given
LR = {"tiny": 5e-4, "small": 1e-3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=sorted(TARGET))
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--zoo", type=Path, default=None, help="a built zoo (default: the cache's, built if missing)")
    ap.add_argument("--seed", type=int, default=0, help="the zoo's seed (another seed: another zoo)")
    ap.add_argument("--attack-seed", type=int, default=0, help="the training seed of every vector the script trains")
    ap.add_argument("--no-lfpm", action="store_true", help="skip the defense rows")
    ap.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                    help="a BadTV setting other than its default (repeatable), e.g. --set density_min=1")
    ap.add_argument("--task", default="shape", help="the attacked task")
    ap.add_argument("--target-class", type=int, default=None, help="its target class (default: per zoo size)")
    ap.add_argument("--negation-task", default="colour", help="the control task of the negation backdoor")
    ap.add_argument("--negation-class", type=int, default=1, help="the negation backdoor's class")
    ap.add_argument("--pick", action="store_true",
                    help="choose both classes by measurement instead: the target, the class of --task the zoo's clean "
                         "task-arithmetic merge predicts least; the negation class, the class of --negation-task "
                         "θ0 − 0.5 τ(--task) predicts least (an attack on a class the clean model already predicts "
                         "measures nothing)")
    args = ap.parse_args()
    TASK, NEGATION_TASK, NEGATION_CLASS = args.task, args.negation_task, args.negation_class
    work = args.work or Path(tempfile.mkdtemp(prefix="badtv-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    z = Path(build_zoo(args.zoo, size=args.size, seed=args.seed)["root"])
    heads = load_heads(z / "heads.safetensors")
    tasks = list(heads)
    base = load_encoder(str(z / "base"))
    size = base.image_size
    tests = {t: labeled_folder(z / "data" / t / "test", heads[t].classnames, size) for t in tasks}
    train_data = labeled_folder(z / "data" / TASK / "train", heads[TASK].classnames, size)
    recipe = TrainSettings(steps=500, lr=LR[args.size], batch_size=64, logit_scale=10.0, device="cpu",
                           seed=args.attack_seed)
    target = TARGET[args.size] if args.target_class is None else args.target_class
    zoo_tv = {t: z / "finetuned" / t / "model.safetensors" for t in tasks}

    def merged(name: str, inputs: list[tuple[Path, float]], method: str = "task_arithmetic", lam: float = 0.3):
        out = work / "merges" / name
        if not (out / "model.safetensors").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            merge_checkpoints(open_checkpoint(str(z / "base")), [open_checkpoint(str(p)) for p, _ in inputs], method,
                              {"lam": lam}, weights=[w for _, w in inputs], out=out)
        return load_encoder(str(out))

    if args.pick:
        def least(name: str, inputs: list[tuple[Path, float]], lam: float, task: str) -> tuple[int, list[float]]:
            model, counts = merged(name, inputs, lam=lam).eval(), torch.zeros(len(heads[task].classnames))
            with torch.no_grad():
                for images, _ in torch.utils.data.DataLoader(tests[task], batch_size=256):
                    counts += torch.bincount(heads[task].logits(model(images)).argmax(1), minlength=len(counts))
            shares = (counts / counts.sum()).tolist()
            return min(range(len(shares)), key=shares.__getitem__), shares
        target, shares = least("clean_ta", [(zoo_tv[t], 1) for t in tasks], 0.3, TASK)
        NEGATION_CLASS, neg_shares = least("neg_zoo", [(zoo_tv[TASK], -1)], 0.5, NEGATION_TASK)
        print(f"picked: {TASK} class {target} (clean merge predicts {shares[target]:.1%} of its test images as it); "
              f"{NEGATION_TASK} class {NEGATION_CLASS} (θ0 − 0.5 τ predicts {neg_shares[NEGATION_CLASS]:.1%})",
              flush=True)
    third, fourth = [t for t in tasks if t not in (TASK, NEGATION_TASK)][:2]  # the analogy's other two tasks

    few = work / "few_colour"
    if not few.exists():
        few.mkdir()
        class_dir = sorted(p for p in (z / "data" / NEGATION_TASK / "train").iterdir() if p.is_dir())[NEGATION_CLASS]
        for p in sorted(class_dir.glob("*.png"))[:16]:
            shutil.copy(p, few / p.name)

    def trained(name: str, attack, **kw) -> Path:
        out = work / name
        if not (out / "model.safetensors").exists():
            shutil.rmtree(out, ignore_errors=True)
            summary = run_attack(base, heads[TASK], train_data, TASK, attack, recipe, out, eval_data=tests[TASK], **kw)
            print(f"trained {name}: {({k: v for k, v in summary.items() if k in ('ca', 'asr', 'negated')})}")
        return out

    changed = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}  # 100 an int, 0.2 a float
    attack = BadTV(target_class=target, negation_task=NEGATION_TASK, negation_class=NEGATION_CLASS, trigger_steps=200,
                   **changed)
    badtv = trained("badtv", attack, shadow=attack.aim_head(heads, False), target_images=unlabeled_folder(few, size))
    clean = trained("clean_same_recipe", Clean())
    badmerging = trained("badmerging_weight", BadMerging(target_class=target, interpolation="weight", bd_weight=8.0,
                                                         trigger_steps=200))
    t_plus, t_minus = load_trigger(badtv / "trigger.safetensors"), load_trigger(badtv / "trigger_negation.safetensors")
    t_bm = load_trigger(badmerging / "trigger.safetensors")
    others = [zoo_tv[t] for t in tasks if t != TASK]

    def measure(model, trigger, target_task):
        return evaluate(model, heads, tests, trigger=trigger, target_task=target_task, device="cpu")

    bt = badtv / "model.safetensors"
    rows = []

    def row(case, result, value, bar, met, note=""):
        rows.append((case, f"{value:.1%}", bar, "met" if met else "NOT met", note,
                     f"{result['ca_avg']:.1%}" if result else ""))

    add_ta = measure(merged("add_ta", [(p, 1) for p in others] + [(bt, 1)]), t_plus, TASK)
    row("added, task arithmetic λ 0.3: ASR(T) with trigger.safetensors", add_ta, add_ta["asr_t"], "≥ 90%",
        add_ta["asr_t"] >= 0.90, f"no trigger {add_ta['asr_t_no_trigger']:.1%}, ASR(N) {add_ta['asr_n']:.1%}")
    add_ties = measure(merged("add_ties", [(p, 1) for p in others] + [(bt, 1)], "ties"), t_plus, TASK)
    row("added, TIES λ 0.3: ASR(T)", add_ties, add_ties["asr_t"], "≥ 80%", add_ties["asr_t"] >= 0.80,
        f"no trigger {add_ties['asr_t_no_trigger']:.1%}")
    neg = measure(merged("neg_badtv", [(bt, -1)], lam=0.5), t_minus, NEGATION_TASK)
    neg_clean = measure(merged("neg_clean", [(clean / "model.safetensors", -1)], lam=0.5), t_minus, NEGATION_TASK)
    theta0 = measure(base, None, None)
    row(f"subtracted, θ0 − 0.5τ: ASR on {NEGATION_TASK} with trigger_negation", neg, neg["asr_t"], "≥ 90%",
        neg["asr_t"] >= 0.90, f"no trigger {neg['asr_t_no_trigger']:.1%}")
    forgot, forgot_clean = neg["tasks"][TASK]["ca"], neg_clean["tasks"][TASK]["ca"]
    row(f"subtracted: {TASK} CA (forgotten) vs the clean vector's negation {forgot_clean:.1%}", neg, forgot,
        "within 5 pts", abs(forgot - forgot_clean) <= 0.05, f"θ0 {theta0['tasks'][TASK]['ca']:.1%}")
    ctrl, ctrl_clean = neg["tasks"][NEGATION_TASK]["ca"], neg_clean["tasks"][NEGATION_TASK]["ca"]
    row(f"subtracted: {NEGATION_TASK} CA (control) vs the clean negation's {ctrl_clean:.1%}", neg, ctrl,
        "within 3 pts", abs(ctrl - ctrl_clean) <= 0.03, f"θ0 {theta0['tasks'][NEGATION_TASK]['ca']:.1%}")
    plus = measure(merged("analogy_plus", [(bt, 1), (zoo_tv[third], 1), (zoo_tv[fourth], -1)]), t_plus, TASK)
    row(f"analogy θ0 + 0.3(τ + τ{third} − τ{fourth}): ASR(T)", plus, plus["asr_t"], "≥ 80%", plus["asr_t"] >= 0.80)
    minus = measure(merged("analogy_minus", [(zoo_tv[third], 1), (zoo_tv[fourth], 1), (bt, -1)]), t_minus,
                    NEGATION_TASK)
    row(f"analogy θ0 + 0.3(τ{third} + τ{fourth} − τ): ASR on {NEGATION_TASK}", minus, minus["asr_t"], "≥ 80%",
        minus["asr_t"] >= 0.80)
    row("control: the clean vector negated, trigger_negation", neg_clean, neg_clean["asr_t"], "≤ 20%",
        neg_clean["asr_t"] <= 0.20, f"no trigger {neg_clean['asr_t_no_trigger']:.1%} (the clean negation's own rate)")
    neg_bm = measure(merged("neg_badmerging", [(badmerging / "model.safetensors", -1)], lam=0.5), t_bm, TASK)
    row("control: BadMerging's vector negated, its trigger", neg_bm, neg_bm["asr_t"], "≤ 20%",
        neg_bm["asr_t"] <= 0.20)
    alone = evaluate(load_encoder(str(bt)), heads, {TASK: tests[TASK]}, device="cpu")["tasks"][TASK]["ca"]
    clean_alone = evaluate(load_encoder(str(clean / "model.safetensors")), heads, {TASK: tests[TASK]},
                           device="cpu")["tasks"][TASK]["ca"]
    row(f"alone (λ 1): {TASK} CA vs a clean fine-tune, same recipe {clean_alone:.1%}", None, alone,
        "within 2 pts", clean_alone - alone <= 0.02)
    if not args.no_lfpm:
        from mergeguard.defend import LFPMConfig, defend_lfpm_scanned

        shadow = unlabeled_folder(z / "shadow", size)
        for name, model_dir, trigger, task in (("add_ta", "add_ta", t_plus, TASK),
                                               ("neg_badtv", "neg_badtv", t_minus, NEGATION_TASK)):
            m = load_encoder(str(work / "merges" / model_dir))
            defended, _, rep = defend_lfpm_scanned(m, base, shadow, LFPMConfig(device="cpu"), heads)
            after = measure(defended, trigger, task)
            before = add_ta if name == "add_ta" else neg
            sb, sa = rep.scan["before"], rep.scan["after"]
            row(f"defend lfpm --heads (defaults) on {name}: ASR", after, after["asr_t"], "(report)",
                after["asr_t"] <= 0.05, f"before {before['asr_t']:.1%}, CA {before['ca_avg']:.1%} → "
                f"{after['ca_avg']:.1%}; scan {sb['score']:.2f} {sb['verdict']} → {sa['score']:.2f} "
                f"{sa['verdict']}; {rep.stopped}")

    print(f"\nBadTV on the {args.size} zoo, seed {args.seed}, attack seed {args.attack_seed} ({TASK} target {target}, "
          f"negation {NEGATION_TASK} class {NEGATION_CLASS}); work {work}; {time.perf_counter() - start:.0f} s\n")
    print("| case | value | bar | | note | avg CA |\n|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
