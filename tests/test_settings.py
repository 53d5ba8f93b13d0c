"""Settings declared once (mergeguard.settings): the checks, the argv of a printed command, and the CLI
options made from the same declarations, which must parse that argv back into the same settings."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, fields, replace
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from mergeguard import settings
from mergeguard.attack.settings import SETTINGS, BadMergingSettings, TrainSettings
from mergeguard.cli import app
from mergeguard.defend import LFPMConfig
from mergeguard.errors import SettingError
from mergeguard.settings import setting


@dataclass
class Toy:
    count: int = setting(3, "an integer of at least 1", low=1)
    rate: float = setting(0.5, "a positive number", low=0.0, low_open=True)
    share: float = setting(0.1, "in [0, 1]", low=0.0, high=1.0)
    mode: str = setting("a", "a choice", choices=("a", "b"))
    flag: bool = setting(False, "a switch")
    device: str = setting("auto", "where", run_only=True)


@pytest.mark.parametrize("change, message", [
    ({"count": 0}, "count must be at least 1 (got 0)."),
    ({"rate": 0.0}, "rate must be a positive number (got 0.0)."),
    ({"rate": math.inf}, "rate must be a finite number (got inf)."),
    ({"share": 1.5}, "share must be in [0, 1] (got 1.5)."),
    ({"mode": "c"}, "mode must be one of a, b (got 'c')."),
])
def test_each_declared_range_is_one_sentence_naming_the_field(change, message):
    with pytest.raises(SettingError) as err:
        settings.check(replace(Toy(), **change))
    assert str(err.value) == message and err.value.field == next(iter(change))
    assert err.value.phrased("--" + err.value.field) == "--" + message  # what the CLI shows


def test_defaults_pass_and_the_fingerprint_leaves_out_run_only_fields():
    settings.check(Toy())
    assert settings.fingerprint(Toy()) == {"count": 3, "rate": 0.5, "share": 0.1, "mode": "a", "flag": False}


@dataclass
class Outer:
    steps: int = setting(2, "steps", low=1)
    device: str = settings.device()
    inner: Toy = settings.nested(Toy, "Inner: ", inherit=("device",))

    def __post_init__(self) -> None:
        settings.inherit_into(self)


def test_argv_lists_changed_fields_and_required_ones():
    toy = Toy(count=7, rate=1e-3, flag=True, device="cpu")
    assert settings.to_argv(toy) == ["--count", "7", "--rate", "0.001", "--flag", "--device", "cpu"]
    assert settings.to_argv(Toy(), always=("mode",)) == ["--mode", "a"]


def test_a_nested_settings_object_takes_prefixed_flags_and_inherits_its_parents_fields():
    """A settings object inside another (LFPM's scan): its flags are --NAME-FIELD, the fields it inherits are
    the parent's (never flags of its own), its errors name NAME_FIELD, and it is part of the fingerprint."""
    outer = Outer(steps=3, device="cpu", inner=Toy(count=7, rate=1e-3))
    assert outer.inner.device == "cpu"  # inherited, whatever the inner object was given
    assert replace(outer, device="cuda").inner.device == "cuda"
    assert settings.to_argv(outer) == ["--steps", "3", "--device", "cpu", "--inner-count", "7", "--inner-rate",
                                       "0.001"]
    with pytest.raises(SettingError) as err:
        settings.check(replace(outer, inner=Toy(count=0)))
    assert err.value.field == "inner_count" and err.value.phrased("--inner-count").startswith("--inner-count must")
    assert settings.fingerprint(outer)["inner"] == settings.fingerprint(outer.inner)


def _every_field_changed(obj):
    """`obj` with every CLI-offered field moved off its default to another valid value."""
    new = {}
    for f, spec in settings.declared(obj):
        if not spec.cli or f.name in ("device", "workers"):
            continue
        value = f.default
        if spec.choices:
            new[f.name] = next(c for c in spec.choices if c != value)
        elif isinstance(value, bool):
            new[f.name] = not value
        elif isinstance(value, int):
            new[f.name] = value + 1 if spec.high is None else value
        elif isinstance(value, float):  # non-round: a printed command must carry every digit
            new[f.name] = value / 3 if value else 0.123456789
        elif value is None and f.name in ("checkpoint_every", "lora_rank"):
            new[f.name] = 3
        elif value is None and f.name in ("logit_scale", "lora_alpha"):
            new[f.name] = 7.123456789
    return replace(obj, **new)


def _captured(monkeypatch, module, name, argv):
    seen = {}

    def capture(*args, **kwargs):
        seen["args"] = args
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(module, name, capture)
    result = CliRunner().invoke(app, argv)
    assert "args" in seen, result.output
    return seen["args"]


def test_the_printed_lfpm_command_parses_back_to_the_same_settings(monkeypatch, tmp_path):
    """Every LFPM setting, changed, survives settings → argv → `defend lfpm` → LFPMConfig: the demo's printed
    command reruns the demo's LFPM, and a field added to LFPMConfig is an option at once."""
    import mergeguard.defend as defend

    cfg = _every_field_changed(replace(LFPMConfig(), device="cpu"))
    assert cfg != replace(LFPMConfig(), device="cpu")
    (tmp_path / "m").mkdir()
    argv = ["defend", "lfpm", "--merged", str(tmp_path / "m"), "--base", str(tmp_path / "m"), "--shadow",
            str(tmp_path / "m"), "-o", str(tmp_path / "o"), *shlex.split(settings.argv_text(settings.to_argv(cfg)))]
    encoder = SimpleNamespace(image_size=32)
    monkeypatch.setattr(defend, "load_models", lambda *a, **k: ([encoder, encoder], [], None))
    monkeypatch.setattr("mergeguard.data.folders.unlabeled_folder", lambda *a, **k: [])
    args = _captured(monkeypatch, defend, "defend_lfpm", argv)
    got = next(a for a in args if isinstance(a, LFPMConfig))
    assert got == cfg


def test_the_scan_settings_of_defend_lfpm_heads_parse_back_and_errors_name_the_prefixed_flag(monkeypatch, tmp_path):
    """`defend lfpm --heads` takes the scan's settings (`LFPMConfig.scan`) as --scan-* (device and seed are
    LFPM's): every one, changed, reaches the scan; a bad one is one sentence naming its --scan-* flag, before
    anything is read."""
    import mergeguard.defend as defend
    import mergeguard.models.heads as heads_module
    from mergeguard.scan import ScanConfig

    scan = _every_field_changed(ScanConfig())
    scan = replace(scan, backdoored=scan.suspicious + 1)  # the scan's own check: backdoored ≥ suspicious
    cfg = replace(LFPMConfig(), device="cpu", seed=5, scan=scan)
    assert cfg.scan.seed == 5 and cfg.scan.device == "cpu" and cfg.scan != replace(ScanConfig(), device="cpu", seed=5)
    (tmp_path / "m").mkdir()
    (tmp_path / "h.safetensors").write_bytes(b"")
    common = ["defend", "lfpm", "--merged", str(tmp_path / "m"), "--base", str(tmp_path / "m"), "--shadow",
              str(tmp_path / "m"), "-o", str(tmp_path / "o"), "--heads", str(tmp_path / "h.safetensors")]
    argv = [*common, *settings.to_argv(cfg)]
    assert "--scan-steps" in argv and "--scan-seed" not in argv and "--scan-device" not in argv
    encoder = SimpleNamespace(image_size=32)
    monkeypatch.setattr(defend, "load_models", lambda *a, **k: ([encoder, encoder], [], None))
    monkeypatch.setattr(heads_module, "load_heads", lambda *a, **k: {})
    monkeypatch.setattr("mergeguard.data.folders.unlabeled_folder", lambda *a, **k: [])
    args = _captured(monkeypatch, defend, "defend_lfpm_scanned", argv)
    assert next(a for a in args if isinstance(a, LFPMConfig)) == cfg
    for bad, message in ((["--scan-steps", "0"], "--scan-steps must be at least 1 (got 0)."),
                         (["--scan-suspicious", "2", "--scan-backdoored", "1"],
                          "--scan-backdoored 1 is below the suspicious threshold 2.")):
        result = CliRunner().invoke(app, [*common, *bad])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["badnets", "badmerging", "lobam", "badtv"])
def test_an_attack_command_parses_back_to_the_same_settings(name, monkeypatch, tmp_path):
    import mergeguard.cli.attack_cmd as attack_cmd

    attack = _every_field_changed(SETTINGS[name]())  # what the command builds: the settings, its strategy's fields
    attack = replace(attack, target_task=None) if isinstance(attack, BadMergingSettings) else attack
    if name == "badtv":  # its two tasks are names of the heads' tasks: any name parses back
        attack = replace(attack, negation_task="other")
    train = _every_field_changed(replace(TrainSettings(), device="cpu"))
    argv = ["attack", name, "--base", ".", "--data", "train=d", "--heads", "h", "--task", "t", "-o",
            str(tmp_path / "o"), *settings.to_argv(attack, always=("target_class",)), *settings.to_argv(train)]
    args = _captured(monkeypatch, attack_cmd, "_run", argv)
    assert args[1] == attack and args[2] == train
    assert {f.name for f in fields(attack)} - {"target_task"} <= {a[2:].replace("-", "_") for a in argv
                                                                 if a.startswith("--")} | {"adv_epsilon", "trigger_lr"}


def test_a_setting_with_no_flag_is_never_printed_as_one():
    """`to_argv` once printed `--idle-tolerance`, which no command has: a changed field that has no flag
    cannot be reproduced by a printed command, so it is refused rather than dropped or misprinted."""
    assert settings.to_argv(LFPMConfig()) == []
    with pytest.raises(ValueError, match="idle_tolerance has no command-line flag"):
        settings.to_argv(replace(LFPMConfig(), idle_tolerance=1e-6))


def test_the_scan_command_parses_back_to_the_same_settings(monkeypatch, tmp_path):
    import mergeguard.scan as scan_module
    from mergeguard.scan import ScanConfig

    cfg = _every_field_changed(ScanConfig())
    cfg = replace(cfg, backdoored=cfg.suspicious + 1)
    (tmp_path / "m").mkdir()
    argv = ["scan", "--base", str(tmp_path / "m"), "--merged", str(tmp_path / "m"), "--shadow", str(tmp_path / "m"),
            *settings.to_argv(cfg)]
    monkeypatch.setattr("mergeguard.checkpoint.open_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr("mergeguard.models.encoder.load_encoder", lambda *a, **k: SimpleNamespace(image_size=32))
    monkeypatch.setattr("mergeguard.data.folders.unlabeled_folder", lambda *a, **k: [])
    monkeypatch.setattr("mergeguard.data.stack_images", lambda *a, **k: [])
    args = _captured(monkeypatch, scan_module, "Scanner", argv)
    assert next(a for a in args if isinstance(a, ScanConfig)) == cfg


@pytest.mark.parametrize("command", [["defend", "ibvs"], ["finetune"]])
def test_the_training_commands_parse_back_to_the_same_settings(command, monkeypatch, tmp_path):
    """`defend ibvs` and `finetune` take the trainer core's settings (`TrainSettings`), every one."""
    import mergeguard.cli.attack_cmd as attack_cmd
    import mergeguard.defend as defend

    train = _every_field_changed(replace(TrainSettings(), device="cpu"))
    (tmp_path / "d").mkdir()
    common = ["--base", str(tmp_path / "d"), "--data", f"train={tmp_path / 'd'}", "--heads", "h", "--task", "t",
              "-o", str(tmp_path / "o"), *settings.to_argv(train)]
    if command == ["finetune"]:
        args = _captured(monkeypatch, attack_cmd, "_run", [*command, *common])
    else:
        monkeypatch.setattr("mergeguard.models.heads.load_heads", lambda *a, **k: {})
        monkeypatch.setattr("mergeguard.models.heads.head_for", lambda *a, **k: SimpleNamespace(classnames=[]))
        monkeypatch.setattr(defend, "load_models", lambda *a, **k: ([SimpleNamespace(image_size=32)] * 2, [], None))
        monkeypatch.setattr("mergeguard.data.folders.labeled_folder", lambda *a, **k: [])
        args = _captured(monkeypatch, defend, "defend_ibvs", [*command, "--merged", str(tmp_path / "d"), *common])
    assert next(a for a in args if isinstance(a, TrainSettings)) == train


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "lata", "iso_c"])
def test_a_merge_methods_parameters_parse_back_exactly(method, monkeypatch, tmp_path):
    """Each declared parameter of a merge method, moved off its default (non-round floats), reaches the engine
    as given through `merge`'s flags; a bad one is one sentence naming its flag and the method."""
    import mergeguard.merge as merge_module
    from mergeguard.merge import get_method

    values = {}
    for p in get_method(method).params:
        if p.spec.choices:
            values[p.name] = next(c for c in p.spec.choices if c != p.default)
        else:
            values[p.name] = p.default * 0.987654321 if p.default else 0.123456789
    argv = ["merge", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "o"), "--method", method]
    for name, value in values.items():
        argv += [settings.flag(name), settings.float_text(value) if isinstance(value, float) else value]
    if method == "lata":
        argv += ["--reference", str(tmp_path)]
    monkeypatch.setattr("mergeguard.checkpoint.open_checkpoint", lambda *a, **k: SimpleNamespace(spec=str(tmp_path)))
    args = _captured(monkeypatch, merge_module, "merge_checkpoints", argv)
    assert get_method(method).resolve(args[3]) == {**get_method(method).resolve({}), **values}
    result = CliRunner().invoke(app, [*argv, "--lam", "-1"])
    assert result.exit_code == 2 and f"--lam for {method} must be 0 or more (got -1.0)." in result.output
