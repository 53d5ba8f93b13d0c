"""The whole loop on the built-in zoo, offline: the story `mergeguard demo` tells.

zoo (pre-trained θ0, clean fine-tunes from the trainer core) → BadMerging poisons one task's
vector (`shape` on tiny, `colour` on small) → merge (task arithmetic and TIES) → eval (the backdoor
works) → `defend lfpm` → eval again; `defend ibvs` beside it. Every step is a library call whose CLI twin is
recorded in `commands`, so a user can rerun any one by hand: they name the zoo `$Z` and the demo's folder `$D`
(`variables`) and write into `$D/by-hand/`, each step reading the one before, so they run as printed, in order.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mergeguard.attack import BadMerging, TrainSettings
from mergeguard.defend import LFPMConfig
from mergeguard.errors import MergeguardError, did_you_mean
from mergeguard.progress import NullProgress, ProgressSink
from mergeguard.scan import ScanConfig
from mergeguard.settings import argv_text, float_text, to_argv

MARKER = "demo.json"
DEMO_ENTRIES = ("attack", "clean_merge", "poisoned_merge", "poisoned_ties", "lfpm", "ibvs")  # with MARKER
BY_HAND = "by-hand"  # where the printed commands write: never over what the demo wrote
FIGURE = "demo.png"  # CA and ASR(T) per model, before and after the defenses
FIGURE_NAMES = {"clean_merge": "clean", "poisoned_merge": "poisoned", "poisoned_ties": "TIES", "lfpm": "LFPM",
                "ibvs": "IBVS"}


def report_name(entry: str) -> str:
    """Where the demo keeps `eval --json` for one of its models: beside the model folder, not inside it
    (a report written into an input folder is refused, so the printed command could not be rerun)."""
    return f"{entry}.eval.json"


def is_demo_folder(out: Path) -> bool:
    """A folder an earlier demo wrote (finished or killed), which the next demo may clear: its marker and
    nothing but the demo's own outputs (and a killed writer's `.NAME.tmp-PID` folders)."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    own = set(DEMO_ENTRIES) | {MARKER, BY_HAND, FIGURE} | {report_name(n) for n in DEMO_ENTRIES}
    return isinstance(marker, dict) and ("status" in marker or "rows" in marker) and all(
        p.name in own or p.name.startswith(tuple(f".{n}.tmp-" for n in DEMO_ENTRIES)) for p in out.iterdir())


@dataclass
class DemoSettings:
    """The demo's choices: which task is attacked and defended, and each step's settings, nested as the
    library's own settings objects (one declaration each; the printed commands come from them)."""

    # the attacked task and class (`attack.target_class`): one the poisoned merges rarely predict without the
    # trigger, so ASR(T) measures the trigger and not the merge's confusion
    target_task: str = "shape"
    defender_task: str = "colour"  # IBVS: the task the defender has labeled data for
    lam: float = 0.3  # the task-arithmetic merges' λ
    # BadMerging's r-interpolation "weight": the backdoor and the task hold at θ0 + r τ (survives TIES, but the
    # vector grows about 3x and costs the other tasks accuracy in a merge); the paper's is "feature"
    attack: BadMerging = field(default_factory=lambda: BadMerging(
        target_class=3, bd_weight=8.0, interpolation="weight", trigger_steps=200))
    train: TrainSettings = field(default_factory=lambda: TrainSettings(  # the attack's fine-tune
        steps=500, lr=5e-4, batch_size=64, logit_scale=10.0))
    lfpm: LFPMConfig = field(default_factory=LFPMConfig)  # the defaults a user gets, on every zoo size
    # `defend lfpm --heads`'s scan (its defaults too; its device and seed are LFPM's, as in `defend lfpm`)
    scan: ScanConfig = field(default_factory=ScanConfig)
    ibvs: TrainSettings = field(default_factory=lambda: TrainSettings(  # IBVS's two fine-tunes
        steps=250, lr=5e-4, batch_size=64, logit_scale=10.0))

    def on(self, device: str) -> DemoSettings:
        """The same settings, every step on `device`."""
        return replace(self, train=replace(self.train, device=device), lfpm=replace(self.lfpm, device=device),
                       ibvs=replace(self.ibvs, device=device), scan=replace(self.scan, device=device))


SETTINGS = {
    "tiny": DemoSettings(),
    # small: every `shape` class has a look-alike (disc/ring, triangle/cross), and a poisoned merge moves
    # the boundary towards its target: 19-32% of non-target shapes go to it with no trigger at all. The small
    # zoo's pre-training gives colour's "yellow" a group of its own (zoo v3), so nothing is sent to it without
    # the trigger (docs/lfpm-log.md). LFPM runs with its defaults on every size (issue #23)
    "small": DemoSettings(
        target_task="colour", defender_task="shape",
        train=TrainSettings(steps=500, lr=1e-3, batch_size=64, logit_scale=10.0)),
}


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _var(name: str, root: Path, path: Path) -> str:
    """`path` under `root` as the printed commands write it: `$Z/data/shape/train`, or `$Z` for `root` itself
    (double-quoted where the path holds characters a shell would split or expand)."""
    text = f"${name}" if path == root else f"${name}/{path.relative_to(root).as_posix()}"
    return text if _q(path) == str(path) else f'"{text}"'


def run_demo(out: str | Path, *, size: str = "tiny", zoo: str | Path | None = None, device: str = "auto",
             progress: ProgressSink | None = None, say: Callable[[str], None] | None = None,
             settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the loop into `out`; returns {"rows": {name: eval result}, "commands": [...], ...}.
    `settings` replaces the size's own (`SETTINGS[size]`; the zoo is still the size's)."""
    from mergeguard.attack import run_attack
    from mergeguard.checkpoint.resolve import open_checkpoint
    from mergeguard.checkpoint.writer import staged_outputs
    from mergeguard.data.folders import labeled_folder, unlabeled_folder
    from mergeguard.data.pictures import bar_chart, first_images
    from mergeguard.data.triggers import load_trigger
    from mergeguard.defend import defend_ibvs, defend_lfpm_scanned, write_ibvs_outputs, write_lfpm_outputs
    from mergeguard.defend.settings import SCAN_FROM_LFPM, scan_settings_from
    from mergeguard.eval import evaluate
    from mergeguard.merge.engine import merge_checkpoints
    from mergeguard.models.encoder import load_encoder
    from mergeguard.models.heads import load_heads
    from mergeguard.models.zoo import holds_something_else
    from mergeguard.trainer import resolve_device
    from mergeguard.workflows.zoo import build_zoo

    if size not in SETTINGS:
        raise MergeguardError(f"unknown demo size {size!r}; choose one of: {', '.join(SETTINGS)}."
                              + did_you_mean(size, SETTINGS))
    progress = progress or NullProgress()
    say = say or (lambda _text: None)
    s = (settings or SETTINGS[size]).on(device)
    target, defender = s.target_task, s.defender_task
    out = Path(out)
    resolve_device(device)  # an unusable --device fails before an earlier demo's folder is cleared
    if zoo is not None and holds_something_else(Path(zoo)):
        raise MergeguardError(f"--zoo {zoo} is not a finished zoo; name a zoo folder, or a new one to build the zoo "
                              "into.")
    if out.exists() and any(out.iterdir()) and not is_demo_folder(out):  # the demo clears only its own folder
        raise MergeguardError(f"{out} is not empty and holds no earlier demo's outputs only; choose another --out.")
    if out.exists():
        shutil.rmtree(out)  # an earlier demo's outputs: the demo owns this folder
    out.mkdir(parents=True)
    (out / MARKER).write_text('{"status": "running"}\n')  # an interrupted demo's folder is reusable too
    start = time.perf_counter()
    commands: list[str] = []

    say(f"1. The zoo ({size}): a pre-trained encoder θ0 and one clean fine-tune per task.")
    info = build_zoo(zoo, size=size, progress=progress)
    z = Path(info["root"])
    hand = out / BY_HAND  # the printed commands' outputs, each the next one's input

    def zpath(path: Path) -> str:
        return _var("Z", z, path)

    def dpath(path: Path) -> str:  # what the demo wrote into OUT/NAME, the printed commands write into $D/by-hand/NAME
        return _var("D", out, hand / path.relative_to(out))

    commands.append(f"mergeguard zoo build --size {size}" + (f" --out {_var('Z', z, z)}" if zoo else ""))
    heads_file = z / "heads.safetensors"
    heads = load_heads(heads_file)
    tasks = list(heads)
    image_size = int(info["spec"]["image_size"])
    test = {t: labeled_folder(z / "data" / t / "test", heads[t].classnames, image_size) for t in tasks}
    base = load_encoder(str(z / "base"))
    clean = {t: z / "finetuned" / t / "model.safetensors" for t in tasks}
    say(f"   {z}: pre-trained CA {info['acceptance']['pretrained_avg']:.1%}, fine-tuned "
        f"{info['acceptance']['finetuned_avg']:.1%} (clean task vectors = fine-tune − θ0).")

    target_class = s.attack.target_class
    say(f"2. An attacker poisons the {target!r} task vector with BadMerging "
        f"(target class {target_class} {heads[target].classnames[target_class]!r}).")
    train = labeled_folder(z / "data" / target / "train", heads[target].classnames, image_size)
    attack_dir = out / "attack"
    summary = run_attack(base, heads[target], train, target, s.attack, s.train, attack_dir,
                         eval_data=test[target], provenance={"command": "mergeguard demo"}, progress=progress)
    commands.append(
        f"mergeguard attack {s.attack.name} --base {zpath(z / 'base')} "
        f"--data train={zpath(z / 'data' / target / 'train')} --data test={zpath(z / 'data' / target / 'test')} "
        f"--heads {zpath(heads_file)} --task {target} "
        f"{argv_text(to_argv(s.attack, always=('target_class',)) + to_argv(s.train))} -o {dpath(attack_dir)}")
    say(f"   the poisoned model alone: CA {summary['ca']:.1%} on {target}, ASR {summary['asr']:.1%}.")
    trigger = load_trigger(attack_dir / "trigger.safetensors")

    say("3. A user merges the downloaded task vectors (task arithmetic λ 0.3, and TIES).")
    others = [clean[t] for t in tasks if t != target]
    merges = {
        "clean_merge": ("task_arithmetic", others + [clean[target]]),
        "poisoned_merge": ("task_arithmetic", others + [attack_dir / "model.safetensors"]),
        "poisoned_ties": ("ties", others + [attack_dir / "model.safetensors"]),
    }
    for name, (method, inputs) in merges.items():
        params = {"lam": s.lam} if method == "task_arithmetic" else {}
        merge_checkpoints(open_checkpoint(str(z / "base")), [open_checkpoint(str(p)) for p in inputs], method,
                          params, out=out / name, progress=progress)
        printed = " ".join(dpath(p) if out in p.parents else zpath(p) for p in inputs)
        commands.append(f"mergeguard merge {zpath(z / 'base')} {printed} -o {dpath(out / name)} "
                        f"--method {method}" + (f" --lam {float_text(s.lam)}" if method == "task_arithmetic" else ""))

    rows: dict[str, Any] = {}
    eval_cmd = (f"mergeguard eval {{model}} --heads {zpath(heads_file)} "
                + " ".join(f"--task {t}={zpath(z / 'data' / t / 'test')}" for t in tasks)
                + f" --trigger {dpath(attack_dir / 'trigger.safetensors')} --json {{report}}")

    def measure(name: str, model_dir: Path) -> dict[str, Any]:
        result = evaluate(load_encoder(str(model_dir)), heads, test, trigger=trigger, target_task=target,
                          device=device, progress=progress)
        (out / report_name(name)).write_text(json.dumps(result, indent=2))
        commands.append(eval_cmd.format(model=dpath(model_dir), report=dpath(out / report_name(name))))
        rows[name] = result
        return result

    say("4. Evaluate: clean accuracy (CA) and attack success rate (ASR) with the attacker's trigger.")
    for name in merges:
        r = measure(name, out / name)
        say(f"   {name}: CA {r['ca_avg']:.1%}, ASR(T) {r['asr_t']:.1%} ({r['asr_t_no_trigger']:.1%} without the "
            f"trigger), ASR(N) {r['asr_n']:.1%}")

    say("5. Defend the poisoned merge with LFPM: unlabeled shadow images, no trigger, no labels.")
    merged = load_encoder(str(out / "poisoned_merge"))
    shadow = unlabeled_folder(z / "shadow", image_size)
    # with the zoo's heads, as `defend lfpm --heads`: the scan starts LFPM's prompts and checks its output
    scan_cfg = replace(s.scan, **scan_settings_from(s.lfpm))  # as `defend lfpm --heads` runs it
    defended, tau, report = defend_lfpm_scanned(merged, base, shadow, s.lfpm, heads, scan_cfg, progress)
    lfpm_dir = out / "lfpm"
    with staged_outputs(lfpm_dir) as stage:
        write_lfpm_outputs(stage, defended, merged, report.pop("prompt"), report,
                           {"defense": "lfpm", "command": "mergeguard demo", "params": asdict(s.lfpm)},
                           examples=first_images(shadow))
    commands.append(f"mergeguard defend lfpm --merged {dpath(out / 'poisoned_merge')} --base {zpath(z / 'base')} "
                    f"--shadow {zpath(z / 'shadow')} --heads {zpath(heads_file)} -o {dpath(lfpm_dir)} "
                    f"{argv_text(to_argv(s.lfpm) + to_argv(s.scan, prefix='scan', skip=SCAN_FROM_LFPM))}".rstrip())
    r = measure("lfpm", lfpm_dir)
    b, a = report["scan"]["before"], report["scan"]["after"]
    say(f"   LFPM ({report['seconds']:.0f} s): CA {r['ca_avg']:.1%}, ASR(T) {r['asr_t']:.1%} "
        f"({r['asr_t_no_trigger']:.1%} without the trigger), "
        f"ASR(N) {r['asr_n']:.1%}; scan {b['score']:.2f} {b['verdict']} → {a['score']:.2f} {a['verdict']}")

    say(f"6. The IBVS baseline: the defender's own trigger on {defender!r}, subtract λ 2 (Vb − Vc).")
    defender_data = labeled_folder(z / "data" / defender / "train", heads[defender].classnames, image_size)
    ibvs_model, ibvs_report = defend_ibvs(merged, base, heads[defender], defender_data, defender, s.ibvs,
                                          lam=2.0, progress=progress)
    ibvs_dir = out / "ibvs"
    with staged_outputs(ibvs_dir) as stage:
        write_ibvs_outputs(stage, ibvs_model, merged, ibvs_report,
                           {"defense": "ibvs", "command": "mergeguard demo", "params": ibvs_report["config"]})
    commands.append(f"mergeguard defend ibvs --merged {dpath(out / 'poisoned_merge')} --base {zpath(z / 'base')} "
                    f"--data train={zpath(z / 'data' / defender / 'train')} --heads {zpath(heads_file)} "
                    f"--task {defender} -o {dpath(ibvs_dir)} {argv_text(to_argv(s.ibvs))}")
    measure("ibvs", ibvs_dir)

    result = {
        "rows": {k: rows[k] for k in ("clean_merge", "poisoned_merge", "lfpm", "ibvs")},
        "extra_rows": {"poisoned_ties": rows["poisoned_ties"]},
        "attack": {k: summary.get(k) for k in ("ca", "asr")},
        "lfpm": {k: report[k] for k in ("seconds", "lambda_eff_start", "lambda_eff_end", "tau_norm")},
        "settings": asdict(s),
        "size": size,
        "zoo": str(z),
        "out": str(out),
        "commands": commands,  # in order, in a shell where Z and D are `variables`
        "variables": {"Z": str(z), "D": str(out)},
        "seconds": round(time.perf_counter() - start, 1),
    }
    bar_chart(out / FIGURE, f"demo ({size} zoo): average CA and ASR(T) with the trigger on {target!r}",
              {FIGURE_NAMES[k]: {"CA": rows[k]["ca_avg"], "ASR(T)": rows[k]["asr_t"]} for k in FIGURE_NAMES})
    result["figure"] = str(out / FIGURE)
    (out / MARKER).write_text(json.dumps(result, indent=2))
    return result
