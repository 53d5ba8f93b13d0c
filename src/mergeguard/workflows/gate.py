"""`mergeguard gate`: a release in one command. A policy file (YAML) names the lock file (the pinned base and
inputs), the merge, the shadow folder and heads, and the gates; the gate checks every pin, then runs the steps
in order, each a `mergeguard` command line (run in-process by the `runner` the CLI gives), and stops at the first
gate that fails. The release folder is written only when every gate passes.

```yaml
lock: mergeguard.lock.yaml          # `mergeguard lock` writes it: the base and the inputs, pinned
shadow: unlabeled_images/           # unlabeled images (scan, defend)
heads: heads.safetensors            # `mergeguard heads`
device: auto                        # every step's
merge: {method: ties, lam: 0.3, density: 0.2}     # any method and parameters `merge` takes (weight: [...])
scan_inputs: {fail_on: backdoored}  # scan each input before the merge; `scan`'s settings beside fail_on
defend: {epochs: 10}                # optional: LFPM on the merge (`defend lfpm`'s settings; scan: {...} nested)
scan_result: {fail_on: backdoored}  # scan the merged (or defended) model
eval:
  tasks: {cars: data/cars/test, dtd: data/dtd/test}
  triggers: [suspect.safetensors]   # plus what the scans recovered from a model they found suspicious or worse
  min_ca: 0.6                       # on average; or {average: 0.6, cars: 0.7}
  max_asr: 0.05                     # the listed triggers' ASR(T) and ASR(N)
  max_asr_recovered: 0.5            # the recovered triggers' (unset: reported, not gated)
release: release/                   # where a passing release goes (-o overrides)
```

Paths are relative to the policy file's folder. A step whose command line and inputs (the files and folders it
reads, down to their sizes and times; the steps before it) are those of a finished step in the work folder is
reused, not rerun. Every pin is hashed anew on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeguard.errors import MergeguardError, SettingError, did_you_mean
from mergeguard.scan.config import reaches
from mergeguard.settings import argv_text, declared, float_text, is_nested, to_argv
from mergeguard.workflows.lock import Lock, Pin, read_lock, verify
from mergeguard.yamlfile import read_yaml

Runner = Callable[[list[str]], int]  # runs `mergeguard ARGV` in this process; its exit code (0, or 1: a gate)
Say = Callable[[str], None]

TOP_KEYS = ("lock", "shadow", "heads", "arch", "device", "merge", "scan_inputs", "defend", "scan_result", "eval",
            "release", "allow_pickle")
EVAL_KEYS = ("tasks", "triggers", "min_ca", "max_asr", "max_asr_recovered", "batch_size")
STEP_RECORD = "step.json"
REPORT = "report.json"
SUMMARY = "report.md"


# -- the policy ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanGate:
    fail_on: str
    flags: list[str]  # the scan's settings as flags


@dataclass(frozen=True)
class EvalGate:
    tasks: dict[str, Path]
    triggers: list[Path]
    min_ca: dict[str, float]  # "average" and/or task names
    max_asr: float | None  # the listed triggers'
    max_asr_recovered: float | None = None  # the scans' recovered triggers' (None: reported, not gated)
    batch_size: int = 128


@dataclass(frozen=True)
class Policy:
    path: Path
    lock_path: Path
    lock: Lock
    shadow: Path
    heads: Path
    merge: list[str]  # --method and its parameters as flags
    merge_settings: dict[str, Any]
    scan_inputs: ScanGate | None
    defend: list[str] | None  # defend lfpm's settings as flags; None: no defense
    scan_result: ScanGate | None
    eval: EvalGate | None
    release: Path
    device: str = "auto"
    arch: str | None = None
    allow_pickle: bool = False


class PolicyError(MergeguardError):
    pass


def _fail(where: str, text: str) -> PolicyError:
    return PolicyError(f"{where}: {text}")


def _mapping(value: Any, where: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, f"{key} must be a mapping of settings (got {value!r}).")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _known(section: dict[str, Any], keys: tuple[str, ...] | list[str], where: str, prefix: str) -> None:
    for key in section:
        if key not in keys:
            raise _fail(where, f"unknown key '{prefix}{key}' (known: {', '.join(keys)})." + did_you_mean(key, keys))


def _path(value: Any, root: Path, where: str, key: str, *, folder: bool | None) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(where, f"{key} must be a path (got {value!r}).")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise _fail(where, f"{key}: {value} does not exist (paths are relative to the policy's folder).")
    if folder is True and not path.is_dir():
        raise _fail(where, f"{key}: {value} is a file; give a folder.")
    if folder is False and path.is_dir():
        raise _fail(where, f"{key}: {value} is a folder; give a file.")
    return path


def _fraction(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _fail(where, f"{key} must be a fraction between 0 and 1 (got {value!r}); e.g. 0.05 for 5%.")
    return float(value)


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a word"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value is of a field's declared type (an int where a float goes; None where None may)."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for kind in kinds:
        if kind is type(None) and value is None or kind is bool and isinstance(value, bool):
            return True
        if kind in (int, float) and isinstance(value, int | float) and not isinstance(value, bool) \
                and (kind is float or isinstance(value, int)):
            return True
        if kind is str and isinstance(value, str):
            return True
    return False


def _settings_object(cls: type, values: dict[str, Any], where: str, key: str, **fixed: Any) -> Any:
    """`cls` (a settings dataclass) from a policy section, each key a declared field of the declared type; checked
    as the CLI checks it, the error naming `key.field`."""
    fields = {f.name: f for f, spec in declared(cls) if spec.cli or is_nested(f)}
    hints = typing.get_type_hints(cls)
    _known(values, list(fields), where, f"{key}.")
    given = dict(values)
    for name, f in fields.items():
        if name not in given:
            continue
        if is_nested(f):
            given[name] = _settings_object(f.default_factory, _mapping(given[name], where, f"{key}.{name}"), where,
                                           f"{key}.{name}")
        elif not _fits(given[name], hints[name]):
            kinds = typing.get_args(hints[name]) or (hints[name],)
            what = " or ".join(_KINDS.get(k, "none") for k in kinds if k is not type(None))
            raise _fail(where, f"{key}.{name} must be {what} (got {given[name]!r}).")
    for name, value in fixed.items():
        if name in fields:
            given.setdefault(name, value)
    obj = cls(**given)
    try:
        obj.check() if hasattr(obj, "check") else _check(obj)
    except SettingError as exc:
        raise _fail(where, exc.phrased(f"{key}.{exc.field}") if exc.field else exc.sentence) from None
    return obj


def _check(obj: Any) -> None:
    from mergeguard.settings import check

    check(obj)


def _scan_gate(value: Any, where: str, key: str, device: str) -> ScanGate | None:
    from mergeguard.scan.config import ScanConfig, check_fail_on

    if value is False:
        return None
    section = _mapping(value, where, key)
    fail_on = section.pop("fail_on", "backdoored")
    try:
        check_fail_on(fail_on, f"{key}.fail_on")
    except MergeguardError as exc:
        raise _fail(where, exc.sentence) from None
    cfg = _settings_object(ScanConfig, section, where, key, device=device)
    return ScanGate(fail_on, to_argv(cfg))


def _merge(value: Any, where: str, root: Path) -> tuple[list[str], dict[str, Any]]:
    from mergeguard.merge.registry import all_params, get_method

    section = _mapping(value, where, "merge")
    keys = ("method", "weight", "seed", "dtype", "shadow_per_task", "inputs_per_task", *all_params())
    _known(section, list(keys), where, "merge.")
    method = section.get("method", "task_arithmetic")
    try:
        chosen = get_method(str(method))
        params = chosen.resolve({k: v for k, v in section.items() if k in all_params()})
    except SettingError as exc:
        raise _fail(where, exc.phrased(f"merge.{exc.field}")) from None
    except MergeguardError as exc:
        raise _fail(where, exc.sentence.replace("--", "merge.")) from None
    argv = ["--method", chosen.name]
    for name, v in params.items():
        if name in section:
            argv += [f"--{name.replace('_', '-')}", float_text(v) if isinstance(v, float) else str(v)]
    weight = section.get("weight")
    if weight is not None:
        if not isinstance(weight, list) or any(isinstance(w, bool) or not isinstance(w, int | float) for w in weight):
            raise _fail(where, "merge.weight must be a list of numbers, one per input.")
        for w in weight:
            argv += ["--weight", float_text(float(w))]
    for key in ("seed", "dtype"):
        if key in section:
            argv += [f"--{key}", str(section[key])]
    for key in ("shadow_per_task", "inputs_per_task"):  # RegMean's and AdaMerging's images: {task: folder}
        if key in section and chosen.data != key:
            raise _fail(where, f"merge.{key} is for {'adamerging' if key == 'shadow_per_task' else 'regmean'}, "
                               f"not {chosen.name}.")
    if chosen.data:
        folders = _mapping(section.get(chosen.data), where, f"merge.{chosen.data}")
        if not folders:
            raise _fail(where, f"merge.{chosen.data} must name each task's folder of unlabeled images "
                               f"({chosen.name} needs them): {{TASK: FOLDER}}.")
        for task, folder in folders.items():
            argv += [f"--{chosen.data.replace('_', '-')}",
                     f"{task}={_path(folder, root, where, f'merge.{chosen.data}.{task}', folder=True)}"]
    return argv, {"method": chosen.name, **params}


def _eval(value: Any, root: Path, where: str) -> EvalGate | None:
    if value is None or value is False:
        return None
    section = _mapping(value, where, "eval")
    _known(section, EVAL_KEYS, where, "eval.")
    tasks = _mapping(section.get("tasks"), where, "eval.tasks")
    if not tasks:
        raise _fail(where, "eval.tasks must name at least one task: {NAME: FOLDER of class folders}.")
    folders = {name: _path(folder, root, where, f"eval.tasks.{name}", folder=True) for name, folder in tasks.items()}
    triggers = section.get("triggers") or []
    if not isinstance(triggers, list):
        raise _fail(where, "eval.triggers must be a list of trigger files.")
    trigger_paths = [_path(t, root, where, "eval.triggers", folder=False) for t in triggers]
    min_ca_raw = section.get("min_ca")
    if isinstance(min_ca_raw, dict):
        min_ca = {str(k): _fraction(v, where, f"eval.min_ca.{k}") for k, v in min_ca_raw.items()}
        for name in min_ca:
            if name != "average" and name not in folders:
                raise _fail(where, f"eval.min_ca.{name} names no task of eval.tasks ({', '.join(folders)}) and is "
                                   "not 'average'." + did_you_mean(name, [*folders, "average"]))
    else:
        min_ca = {} if min_ca_raw is None else {"average": _fraction(min_ca_raw, where, "eval.min_ca")}
    max_asr, recovered = (None if section.get(k) is None else _fraction(section[k], where, f"eval.{k}")
                          for k in ("max_asr", "max_asr_recovered"))
    batch = section.get("batch_size", 128)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise _fail(where, f"eval.batch_size must be a whole number of at least 1 (got {batch!r}).")
    return EvalGate(folders, trigger_paths, min_ca, max_asr, recovered, batch)


def load_policy(path: Path, release: Path | None = None) -> Policy:
    """The policy file, checked: one sentence (naming the file and the key) for every mistake, before anything
    runs."""
    from mergeguard.defend.lfpm.settings import LFPMConfig

    where = str(path)
    raw = read_yaml(path, "the policy")
    if not isinstance(raw, dict):
        raise MergeguardError(f"the policy {path} must be a mapping (lock:, merge:, eval:, ...).")
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    _known(raw, TOP_KEYS, where, "")
    root = path.resolve().parent
    for key in ("lock", "shadow", "heads", "merge"):
        if raw.get(key) is None:
            raise _fail(where, f"'{key}' is missing (the policy needs lock, shadow, heads and merge).")
    device = raw.get("device", "auto")
    if not isinstance(device, str):
        raise _fail(where, f"device must be a name such as auto, cpu or cuda (got {device!r}).")
    lock_path = _path(raw["lock"], root, where, "lock", folder=False)
    merge_argv, merge_settings = _merge(raw["merge"], where, root)
    defend = None
    if raw.get("defend") not in (None, False):
        section = _mapping(raw["defend"], where, "defend")
        defend = to_argv(_settings_object(LFPMConfig, section, where, "defend", device=device))
    arch = raw.get("arch")
    if arch is not None and not isinstance(arch, str):
        raise _fail(where, f"arch must be an open_clip name or an architecture JSON file (got {arch!r}).")
    out = release if release is not None else (root / raw["release"] if isinstance(raw.get("release"), str)
                                               else root / "release")
    return Policy(
        path=path, lock_path=lock_path, lock=read_lock(lock_path),
        shadow=_path(raw["shadow"], root, where, "shadow", folder=True),
        heads=_path(raw["heads"], root, where, "heads", folder=False),
        merge=merge_argv, merge_settings=merge_settings,
        scan_inputs=_scan_gate(raw.get("scan_inputs"), where, "scan_inputs", device),
        defend=defend,
        scan_result=_scan_gate(raw.get("scan_result"), where, "scan_result", device),
        eval=_eval(raw.get("eval"), root, where),
        release=out, device=device, arch=arch, allow_pickle=bool(raw.get("allow_pickle", False)),
    )


# -- the run ---------------------------------------------------------------------------------------------------
@dataclass
class Check:
    """One gate's number against its limit."""

    step: str
    what: str
    value: float | str
    limit: float | str
    passed: bool
    gated: bool = True  # False: a number the report shows, which no gate judges

    def line(self) -> str:
        return f"{self.step}: {self.what} {_shown(self.value)} ({'passes' if self.passed else 'fails'}, " \
               f"limit {_shown(self.limit)})"


def _shown(v: float | str) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass
class Step:
    name: str
    commands: list[list[str]]
    reused: bool = False
    seconds: float = 0.0
    codes: list[int] = field(default_factory=list)


def _state(arg: str, work: Path) -> Any:
    """What a step's command reads from `arg`, as far as its sizes and times say (a folder: every file below)."""
    value = arg.partition("=")[2] if "=" in arg and not arg.startswith("/") else arg
    path = Path(value)
    if not value or not path.is_absolute() or not path.exists() or work in path.parents:
        return None
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    listing = []
    for dirpath, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            st = os.stat(os.path.join(dirpath, name))
            listing.append([os.path.relpath(os.path.join(dirpath, name), path), st.st_size, st.st_mtime_ns])
    return listing


class GateRun:
    """One gate: the policy, its work folder, the steps run or reused, and the checks."""

    def __init__(self, policy: Policy, work: Path, runner: Runner, say: Say):
        self.p, self.work, self.runner, self.say = policy, work.resolve(), runner, say
        self.steps: list[Step] = []
        self.checks: list[Check] = []
        self.chain = ""  # the fingerprint of the steps so far
        self.base = ""
        self.inputs: list[str] = []
        self.total = 1 + sum(x is not None for x in (policy.scan_inputs, policy.defend, policy.scan_result,
                                                     policy.eval))  # the merge and the optional steps
        self.names: dict[str, str] = {}  # what a command was given -> the input as the lock names it

    # the steps' plumbing
    def folder(self, name: str) -> Path:
        return self.work / name

    def run(self, name: str, commands: list[list[str]], title: str) -> Step:
        """Run one step's commands, or reuse a finished step with the same commands and inputs."""
        from mergeguard import __version__

        k = len(self.steps) + 1
        state = [[_state(a, self.work) for a in argv] for argv in commands]
        fp = hashlib.sha256(json.dumps([__version__, self.chain, commands, state]).encode()).hexdigest()
        self.chain = fp
        folder = self.folder(name)
        record = folder / STEP_RECORD
        try:
            done = json.loads(record.read_text())
        except (OSError, ValueError):
            done = None
        step = Step(name, commands)
        if isinstance(done, dict) and done.get("fingerprint") == fp:
            step.reused, step.codes, step.seconds = True, list(done["codes"]), float(done["seconds"])
            self.say(f"gate [{k}/{self.total}] {title}: reused (same commands and inputs as the run that finished "
                     f"{done.get('finished', '')})")
            self.steps.append(step)
            return step
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        start = time.perf_counter()
        for argv in commands:
            self.say(f"gate [{k}/{self.total}] {title}: mergeguard {argv_text(argv)}")
            step.codes.append(self.runner(argv))
        step.seconds = time.perf_counter() - start
        record.write_text(json.dumps({"fingerprint": fp, "codes": step.codes, "seconds": step.seconds,
                                      "commands": commands,
                                      "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
        self.say(f"gate [{k}/{self.total}] {title}: done in {step.seconds:.1f} s")
        self.steps.append(step)
        return step

    def common(self) -> list[str]:
        argv = ["--shadow", str(self.p.shadow), "--heads", str(self.p.heads)]
        argv += ["--arch", self.p.arch] if self.p.arch else []
        return argv + (["--allow-pickle"] if self.p.allow_pickle else [])

    # the steps
    def verify(self) -> None:
        """Every pin hashed anew: one sentence (exit 2) for a byte that differs, before anything runs."""
        where = str(self.p.lock_path)
        root = self.p.lock_path.resolve().parent
        pins: list[Pin] = [self.p.lock.base, *self.p.lock.inputs]
        self.say(f"gate: checking {len(pins)} pinned checkpoints against {where}")
        sources = [verify(pin, root, where, allow_pickle=self.p.allow_pickle) for pin in pins]
        self.base, self.inputs = sources[0], sources[1:]
        self.names = {source: pin.spec for source, pin in zip(sources, pins)}

    def scan_gate(self, name: str, gate: ScanGate, argv: list[str], title: str) -> bool:
        out, report = self.folder(name) / "out", self.folder(name) / REPORT
        step = self.run(name, [[*argv, "--base", self.base, *self.common(), "-o", str(out), "--json", str(report),
                                "--fail-on", gate.fail_on, *gate.flags]], title)
        result = json.loads(report.read_text())
        scanned = [result["merged"]] if result.get("merged") else result["inputs"]
        limit = f"{gate.fail_on} (from {scanned[0]['threshold'][gate.fail_on]:g})"
        for entry in scanned:
            ok = not reaches(entry["verdict"], gate.fail_on)
            shown = self.names.get(entry["input"]) or ("the result" if result.get("merged") else entry["input"])
            self.checks.append(Check(name, f"{shown}: score {entry['score']:.2f}, {entry['verdict']}",
                                     round(float(entry["score"]), 4), limit, ok))
        return step.codes == [0]

    def merge(self) -> Path:
        out = self.folder("merge") / "model"
        heads = ["--heads", str(self.p.heads)] if "--shadow-per-task" in self.p.merge else []  # adamerging's
        self.run("merge", [["merge", self.base, *self.inputs, "-o", str(out), *self.p.merge, *heads, "--json",
                            str(self.folder("merge") / REPORT)]], "merge")
        return out

    def defend(self, merged: Path) -> Path:
        out = self.folder("defend") / "model"
        assert self.p.defend is not None
        self.run("defend", [["defend", "lfpm", "--merged", str(merged), "--base", self.base, *self.common(), "-o",
                             str(out), "--json", str(self.folder("defend") / REPORT), *self.p.defend]],
                 "defend (LFPM)")
        return out

    def recovered(self) -> list[tuple[Path, str]]:
        """Triggers the scans recovered from a model they read suspicious or worse (a clean model's recovered
        patch is the smallest adversarial patch it has, not a backdoor's trigger)."""
        found = []
        for name in ("scan_inputs", "scan_result"):
            report = self.folder(name) / REPORT
            if not any(s.name == name for s in self.steps) or not report.exists():
                continue
            result = json.loads(report.read_text())
            for entry in [result["merged"]] if result.get("merged") else result["inputs"]:
                if entry["verdict"] != "clean" and entry.get("trigger"):
                    label = "the result" if result.get("merged") else self.names.get(entry["input"], entry["input"])
                    found.append((Path(entry["trigger"]), f"the trigger recovered from {label}"))
        return found

    def evaluate(self, model: Path) -> bool:
        gate = self.p.eval
        assert gate is not None
        folder = self.folder("eval")
        base = ["eval", str(model), "--heads", str(self.p.heads), *(f for name, d in gate.tasks.items()
                                                                  for f in ("--task", f"{name}={d}")),
                "--batch-size", str(gate.batch_size), "--device", self.p.device]
        base += ["--arch", self.p.arch] if self.p.arch else []
        listed = [(t, t.name) for t in gate.triggers]
        triggers = [*listed, *self.recovered()]
        commands = [[*base, "--json", str(folder / "clean.json")]]
        commands += [[*base, "--trigger", str(t), "--json", str(folder / f"trigger-{k}.json")]
                     for k, (t, _) in enumerate(triggers)]
        self.run("eval", commands, f"eval ({len(triggers)} trigger{'s' * (len(triggers) != 1)})")
        clean = json.loads((folder / "clean.json").read_text())
        for name, limit in gate.min_ca.items():
            value = clean["ca_avg"] if name == "average" else clean["tasks"][name]["ca"]
            self.checks.append(Check("eval", f"CA {name}", round(value, 4), limit, value >= limit))
        for k, (_, label) in enumerate(triggers):
            is_listed = k < len(listed)
            limit = gate.max_asr if is_listed else gate.max_asr_recovered
            result = json.loads((folder / f"trigger-{k}.json").read_text())
            for key in ("asr_t", "asr_n"):
                value, floor = result[key], result[f"{key}_no_trigger"]
                if value is None or (limit is None and is_listed):
                    continue
                what = f"{key.replace('_', '(').upper()}) of {label} (no trigger: {floor:.1%})"
                self.checks.append(Check("eval", what, round(value, 4), "reported" if limit is None else limit,
                                         limit is None or value <= limit, gated=limit is not None))
        return all(c.passed for c in self.checks if c.step == "eval")

    def go(self) -> Path | None:
        """Every step in order; the final model's folder when every gate passes, None at the first that fails."""
        self.verify()
        if self.p.scan_inputs is not None and not self.scan_gate(
                "scan_inputs", self.p.scan_inputs, ["scan", *self.inputs], "scan the inputs"):
            return None
        model = self.merge()
        if self.p.defend is not None:
            model = self.defend(model)
        if self.p.scan_result is not None and not self.scan_gate(
                "scan_result", self.p.scan_result, ["scan", "--merged", str(model), *self.inputs],
                "scan the result"):
            return None
        if self.p.eval is not None and not self.evaluate(model):
            return None
        return model

    # what it reports
    def report(self, passed: bool, release: Path | None) -> dict[str, Any]:
        from mergeguard import __version__

        failed = next((c for c in self.checks if not c.passed), None)
        return {
            "passed": passed, "failed_step": failed.step if failed else None,
            "policy": str(self.p.path), "lock": str(self.p.lock_path), "mergeguard": __version__,
            "base": self.p.lock.base.to_yaml(), "inputs": [p.to_yaml() for p in self.p.lock.inputs],
            "merge": self.p.merge_settings,
            "steps": [{"step": s.name, "reused": s.reused, "seconds": round(s.seconds, 2), "exit": s.codes,
                       "commands": ["mergeguard " + argv_text(a) for a in s.commands]} for s in self.steps],
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "release": None if release is None else str(release),
        }


def summary(report: dict[str, Any]) -> str:
    """The report as Markdown: what a CI system shows as the job's page."""
    verdict = "PASSED" if report["passed"] else f"FAILED at {report['failed_step']}"
    lines = [f"# mergeguard gate: {verdict}", "", f"Policy `{report['policy']}`, lock `{report['lock']}`, "
             f"mergeguard {report['mergeguard']}.", "", "## Checks", "", "| step | check | value | limit | |",
             "|---|---|---|---|---|"]
    for c in report["checks"]:
        judged = "pass" if c["passed"] else "**FAIL**"
        lines.append(f"| {c['step']} | {c['what']} | {_shown(c['value'])} | {_shown(c['limit'])} | "
                     f"{judged if c['gated'] else 'not gated'} |")
    lines += ["", "## Steps", "", "| step | time | |", "|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['step']} | {s['seconds']:.1f} s | {'reused' if s['reused'] else 'ran'} |")
    lines += ["", "## Inputs (pinned)", "", "| role | input | pin |", "|---|---|---|"]
    for role, p in [("base", report["base"]), *(("input", p) for p in report["inputs"])]:
        pin = f"{p['hub']}@{p['commit']}; " if p.get("hub") else ""
        pin += ", ".join(f"{n}: sha256 {d[:16]}…" for n, d in p["files"].items())
        lines.append(f"| {role} | `{p['spec']}` | {pin} |")
    return "\n".join(lines) + "\n"


def write_release(out: Path, model: Path, report: dict[str, Any]) -> None:
    """The release folder, written whole or not at all: the model's files, a model card naming every input with
    its pin and every check with its number, report.json and report.md."""
    from mergeguard.checkpoint.writer import staged_outputs

    with staged_outputs(out) as stage:
        for item in sorted(model.iterdir()):  # the weights (every shard, the index) and the architecture
            if item.is_file() and (item.name.startswith("model") or item.name == "arch.json"):
                shutil.copy2(item, stage / item.name)
        (stage / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        (stage / SUMMARY).write_text(summary(report))
        card = summary(report).replace("# mergeguard gate: PASSED", "# A merge released by mergeguard gate", 1)
        merge = ", ".join(f"{k}={v}" for k, v in report["merge"].items())
        card += f"\n## Merge\n\n{merge}\n\n## Commands\n\n```\n" + "\n".join(
            c for s in report["steps"] for c in s["commands"]) + "\n```\n"
        (stage / "README.md").write_text(card)
        kept = {p.name for p in stage.iterdir()} | {".partial"}
        for old in out.iterdir():  # an earlier release's files that this one does not have (--overwrite)
            if old.name not in kept:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
