"""The scan's settings and verdicts, declared without torch (the CLI builds `scan`'s options from them)."""

from __future__ import annotations

from dataclasses import dataclass

from mergeguard import settings
from mergeguard.errors import MergeguardError, SettingError, did_you_mean
from mergeguard.settings import setting

VERDICTS = ("clean", "suspicious", "backdoored")


@dataclass
class ScanConfig:
    """The scan's settings, each declared once (CLI options, checks, report)."""

    steps: int = setting(150, "Inversion steps per target.", low=1)
    batch_size: int = setting(16, "Shadow images per target and step.", low=2)
    images: int = setting(1000, "Shadow images used at most (a seeded random subset; a quarter of them, at least "
                                "64, held out to measure each mask).", low=8)
    success: float = setting(0.9, "Share of patched images a mask must send to its target.", low=0.0,
                             low_open=True, high=1.0)
    lr: float = setting(0.2, "Adam step of the masks and patterns.", low=0.0, low_open=True)
    restarts: int = setting(1, "Random starts per target (the smallest mask that works is kept).", low=1)
    chunk: int = setting(64, "Targets inverted together (lower it to save memory).", low=1)
    suspicious: float = setting(0.5, "Score from which an input is suspicious (natural log: under each head, its "
                                     "smallest mask is on average e^score times smaller than θ0's).", low=0.0)
    backdoored: float = setting(1.0, "Score from which an input is backdoored.", low=0.0)
    seed: int = settings.seed("Random seed.")
    device: str = settings.device()
    cache: bool = setting(True, "Reuse θ0's inversion from an earlier scan with the same base, shadow images, heads "
                                "and settings (kept in the mergeguard cache folder).", run_only=True)

    def check(self) -> None:
        check_config(self)


def check_config(cfg: ScanConfig) -> None:
    settings.check(cfg)
    if cfg.backdoored < cfg.suspicious:
        raise SettingError("backdoored", f"{{name}} {cfg.backdoored:g} is below the suspicious threshold "
                                         f"{cfg.suspicious:g}.")


def check_fail_on(value: str, name: str = "--fail-on") -> str:
    """A `--fail-on` (a gate's `fail_on`): suspicious or backdoored, or one sentence naming `name`."""
    if value not in VERDICTS[1:]:
        raise MergeguardError(f"{name} must be suspicious or backdoored, not {value!r}."
                              + did_you_mean(str(value), VERDICTS[1:]))
    return value


def reaches(verdict: str, fail_on: str) -> bool:
    """Whether a verdict is `fail_on` or worse."""
    return VERDICTS.index(verdict) >= VERDICTS.index(fail_on)


def verdict_of(score: float, cfg: ScanConfig) -> str:
    if score >= cfg.backdoored:
        return "backdoored"
    return "suspicious" if score >= cfg.suspicious else "clean"
