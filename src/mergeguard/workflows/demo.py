"""The whole loop on the built-in zoo, offline: the story `mergeguard demo` tells.

zoo (pre-trained θ0, clean fine-tunes from the trainer core) → BadMerging poisons one task's
vector (`shape` on tiny, `colour` on small) → merge (task arithmetic and TIES) → eval (the backdoor
works) → `defend lfpm` → eval again; `defend ibvs` beside it. Every step is a `mergeguard` command line, run
in-process by the `runner` the CLI gives (`cli/demo_cmd.py`), and recorded as it ran in `commands` with the
zoo's folder written `$Z` and the demo's `$D`: with `D` set to `OUT/by-hand` (`variables`) a user redoes the
steps by hand, in order, each reading the one before, without touching what the demo wrote.
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
from mergeguard.settings import float_text, to_argv

Runner = Callable[[list[str]], None]  # runs one `mergeguard` command line (without the program name)

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
    # the defaults a user gets, on every zoo size (its `scan` too: `defend lfpm --heads`'s)
    lfpm: LFPMConfig = field(default_factory=LFPMConfig)
    ibvs: TrainSettings = field(default_factory=lambda: TrainSettings(  # IBVS's two fine-tunes
        steps=250, lr=5e-4, batch_size=64, logit_scale=10.0))

    def on(self, device: str) -> DemoSettings:
        """The same settings, every step on `device`."""
        return replace(self, train=replace(self.train, device=device), lfpm=replace(self.lfpm, device=device),
                       ibvs=replace(self.ibvs, device=device))


SETTINGS = {
    "tiny": DemoSettings(),
    # small: every `shape` class has a look-alike (disc/ring, triangle/cross), and a poisoned merge moves
    # the boundary towards its target: 19-32% of non-target shapes go to it with no trigger at all. The small
    # zoo's pre-training gives colour's "yellow" a group of its own (zoo v3), so nothing is sent to it without
    # the trigger (docs/lfpm-log.md). LFPM runs with its defaults on every size
    "small": DemoSettings(
        target_task="colour", defender_task="shape",
        train=TrainSettings(steps=500, lr=1e-3, batch_size=64, logit_scale=10.0)),
}


def printed(argv: list[str], roots: dict[str, Path]) -> str:
    """A command line as the demo prints it: `mergeguard ARGV`, each path under a root written `$NAME/...`
    (double-quoted where a shell would split or expand the rest)."""
    ordered = sorted(roots.items(), key=lambda kv: -len(str(kv[1])))  # the innermost root first

    def one(arg: str) -> str:
        key, sep, value = arg.partition("=") if "=" in arg and not arg.startswith("/") else ("", "", arg)
        for name, root in ordered:
            r = str(root)
            if value == r or value.startswith(r + "/"):
                text = f"{key}{sep}${name}{value[len(r):]}"  # quoted as a whole where the path needs it
                return text if shlex.quote(arg) == arg else f'"{text}"'
        return shlex.quote(arg)

    return " ".join(["mergeguard", *map(one, argv)])


class DemoRun:
    """One demo: its folder, zoo, settings and the commands it ran (each through `runner`, then recorded)."""

    def __init__(self, out: Path, z: Path, s: DemoSettings, runner: Runner, device: str):
        self.out, self.z, self.s, self.runner, self.device = out, z, s, runner, device
        self.commands: list[str] = []
        self.roots = {"Z": z, "D": out}

    def run(self, argv: list[str]) -> None:
        self.runner(argv)
        self.commands.append(printed(argv, self.roots))

    def zp(self, *parts: str) -> str:
        return str(self.z.joinpath(*parts))

    def attack(self) -> dict[str, Any]:
        s, t = self.s, self.s.target_task
        self.run(["attack", s.attack.name, "--base", self.zp("base"), "--data", f"train={self.zp('data', t, 'train')}",
                  "--data", f"test={self.zp('data', t, 'test')}", "--heads", self.zp("heads.safetensors"),
                  "--task", t, *to_argv(s.attack, always=("target_class",)), *to_argv(s.train),
                  "-o", str(self.out / "attack")])
        return json.loads((self.out / "attack" / "summary.json").read_text())

    def merge(self, name: str, method: str, inputs: list[Path]) -> None:
        lam = ["--lam", float_text(self.s.lam)] if method == "task_arithmetic" else []
        self.run(["merge", self.zp("base"), *map(str, inputs), "-o", str(self.out / name), "--method", method, *lam])

    def evaluate(self, name: str, tasks: list[str]) -> dict[str, Any]:
        report = self.out / report_name(name)
        device = ["--device", self.device] if self.device != "auto" else []
        self.run(["eval", str(self.out / name), "--heads", self.zp("heads.safetensors"),
                  *(a for t in tasks for a in ("--task", f"{t}={self.zp('data', t, 'test')}")),
                  "--trigger", str(self.out / "attack" / "trigger.safetensors"), *device, "--json", str(report)])
        return json.loads(report.read_text())

    def lfpm(self) -> dict[str, Any]:
        self.run(["defend", "lfpm", "--merged", str(self.out / "poisoned_merge"), "--base", self.zp("base"),
                  "--shadow", self.zp("shadow"), "--heads", self.zp("heads.safetensors"), "-o", str(self.out / "lfpm"),
                  *to_argv(self.s.lfpm)])
        return json.loads((self.out / "lfpm" / "report.json").read_text())

    def ibvs(self) -> None:
        d = self.s.defender_task
        self.run(["defend", "ibvs", "--merged", str(self.out / "poisoned_merge"), "--base", self.zp("base"),
                  "--data", f"train={self.zp('data', d, 'train')}", "--heads", self.zp("heads.safetensors"),
                  "--task", d, "-o", str(self.out / "ibvs"), *to_argv(self.s.ibvs)])


def prepare(out: Path, size: str, zoo: str | Path | None, device: str) -> None:
    """Refuse what the demo must not run with before anything is written; clear an earlier demo's folder."""
    from mergeguard.models.zoo import holds_something_else
    from mergeguard.trainer import resolve_device

    if size not in SETTINGS:
        raise MergeguardError(f"unknown demo size {size!r}; choose one of: {', '.join(SETTINGS)}."
                              + did_you_mean(size, SETTINGS))
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


def run_demo(out: str | Path, runner: Runner, *, size: str = "tiny", zoo: str | Path | None = None,
             device: str = "auto", say: Callable[[str], None] | None = None,
             settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the loop into `out`, each step a command line given to `runner`; returns {"rows": {name: eval result},
    "commands": [...], ...}. `settings` replaces the size's own (`SETTINGS[size]`; the zoo is still the size's)."""
    from mergeguard.models.zoo import default_zoo_dir

    out = Path(out)
    prepare(out, size, zoo, device)
    say = say or (lambda _text: None)
    s = (settings or SETTINGS[size]).on(device)
    start = time.perf_counter()
    say(f"1. The zoo ({size}): a pre-trained encoder θ0 and one clean fine-tune per task.")
    z = Path(zoo) if zoo is not None else default_zoo_dir(size, 0)
    demo = DemoRun(out, z, s, runner, device)
    demo.run(["zoo", "build", "--size", size, *(["--out", str(z)] if zoo is not None else [])])
    info = json.loads((z / "zoo.json").read_text())
    tasks = list(info["acceptance"]["finetuned"])
    say(f"   {z}: pre-trained CA {info['acceptance']['pretrained_avg']:.1%}, fine-tuned "
        f"{info['acceptance']['finetuned_avg']:.1%} (clean task vectors = fine-tune − θ0).")
    target, defender = s.target_task, s.defender_task
    say(f"2. An attacker poisons the {target!r} task vector with BadMerging (target class {s.attack.target_class} "
        f"{info['tasks'][target][s.attack.target_class]!r}).")
    summary = demo.attack()
    say(f"   the poisoned model alone: CA {summary['ca']:.1%} on {target}, ASR {summary['asr']:.1%}.")
    say(f"3. A user merges the downloaded task vectors (task arithmetic λ {s.lam:g}, and TIES).")
    clean = {t: z / "finetuned" / t / "model.safetensors" for t in tasks}
    others, poisoned = [clean[t] for t in tasks if t != target], out / "attack" / "model.safetensors"
    merges = {"clean_merge": ("task_arithmetic", others + [clean[target]]),
              "poisoned_merge": ("task_arithmetic", others + [poisoned]),
              "poisoned_ties": ("ties", others + [poisoned])}
    for key, (method, inputs) in merges.items():
        demo.merge(key, method, inputs)
    say("4. Evaluate: clean accuracy (CA) and attack success rate (ASR) with the attacker's trigger.")
    rows = {key: demo.evaluate(key, tasks) for key in merges}
    for key, r in rows.items():
        say(f"   {key}: CA {r['ca_avg']:.1%}, ASR(T) {r['asr_t']:.1%} ({r['asr_t_no_trigger']:.1%} without the "
            f"trigger), ASR(N) {r['asr_n']:.1%}")
    say("5. Defend the poisoned merge with LFPM: unlabeled shadow images, no trigger, no labels.")
    report = demo.lfpm()
    r = rows["lfpm"] = demo.evaluate("lfpm", tasks)
    b, a = report["scan"]["before"], report["scan"]["after"]
    say(f"   LFPM ({report['seconds']:.0f} s): CA {r['ca_avg']:.1%}, ASR(T) {r['asr_t']:.1%} "
        f"({r['asr_t_no_trigger']:.1%} without the trigger), "
        f"ASR(N) {r['asr_n']:.1%}; scan {b['score']:.2f} {b['verdict']} → {a['score']:.2f} {a['verdict']}")
    say(f"6. The IBVS baseline: the defender's own trigger on {defender!r}, subtract λ 2 (Vb − Vc).")
    demo.ibvs()
    rows["ibvs"] = demo.evaluate("ibvs", tasks)
    return finish(demo, size, rows, summary, report, time.perf_counter() - start)


def finish(demo: DemoRun, size: str, rows: dict[str, Any], summary: dict[str, Any], report: dict[str, Any],
           seconds: float) -> dict[str, Any]:
    """The demo's result (also its folder's marker) and its figure."""
    from mergeguard.data.pictures import bar_chart

    out = demo.out
    result = {
        "rows": {k: rows[k] for k in ("clean_merge", "poisoned_merge", "lfpm", "ibvs")},
        "extra_rows": {"poisoned_ties": rows["poisoned_ties"]},
        "attack": {k: summary.get(k) for k in ("ca", "asr")},
        "lfpm": {k: report[k] for k in ("seconds", "lambda_eff_start", "lambda_eff_end", "tau_norm")},
        "settings": asdict(demo.s),
        "size": size,
        "zoo": str(demo.z),
        "out": str(out),
        "commands": demo.commands,  # as they ran, with Z the zoo's folder and D the demo's
        "variables": {"Z": str(demo.z), "D": str(out / BY_HAND)},  # to redo them by hand, beside the demo's
        "seconds": round(seconds, 1),
    }
    bar_chart(out / FIGURE, f"demo ({size} zoo): average CA and ASR(T) with the trigger on {demo.s.target_task!r}",
              {FIGURE_NAMES[k]: {"CA": rows[k]["ca_avg"], "ASR(T)": rows[k]["asr_t"]} for k in FIGURE_NAMES})
    result["figure"] = str(out / FIGURE)
    (out / MARKER).write_text(json.dumps(result, indent=2))
    return result
