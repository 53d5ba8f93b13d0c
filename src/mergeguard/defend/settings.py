"""LFPM's settings, declared without torch: `defend lfpm`'s options, checks, report and printed command come
from these fields (`settings.setting`); the run itself is `defend/lfpm.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mergeguard.settings import setting

PROMPTS = ("mask", "patch", "tokens")


@dataclass
class LFPMConfig:
    """LFPM's settings, each declared once: the CLI's `defend lfpm` options, the checks, the report and the
    demo's printed command all come from these fields."""

    epochs: int = setting(10, "Passes over the shadow images; more of them win back clean accuracy.", low=1)
    batch_size: int = setting(128, "Shadow images per step.", low=1)
    lr: float | None = setting(None, "Adam learning rate of the anti-backdoor vector τa (default: the RMS of the "
                                     "merge's own task vector θm − θ0, so each step follows the model's scale).",
                               low=0.0, low_open=True)
    path_points: int = setting(4, "K points α = k/K of the loss path integral.", low=1)
    beta: float = setting(1.0, "Weight of clean-feature preservation: raise it if the defended model still loses "
                               "too much accuracy after more --epochs, lower it if the trigger survives.", low=0.0)
    subspace_rank: int = setting(0, "Rank of the adversarial subspace the excess reaction is projected on "
                                    "(0: the whole feature space).", low=0)
    prompt: str = setting("mask", "Mined visual prompt: mask (pattern + soft mask, finds trigger-shaped "
                                  "backdoors), patch (a square pasted at a random position) or tokens (VPT: "
                                  "learnable tokens inserted after the class token).", choices=PROMPTS)
    prompt_tokens: int = setting(4, "tokens: how many prompt tokens.", low=1)
    mask_penalty: float = setting(10.0, "mask: weight of the mask's mean area against the log excess reaction.",
                                  low=0.0)
    mine_warmup: int = setting(100, "Ascent steps on each prompt before training starts (stage I).", low=0)
    patch_fraction: float = setting(0.1, "patch: side of the patch as a fraction of the image side.", low=0.0,
                                    low_open=True, high=1.0)
    patch_lr: float = setting(0.1, "Step of the prompt's ascent (Adam for mask and tokens, sign ascent for the "
                                   "patch).", low=0.0, low_open=True)
    mine_steps: int = setting(1, "Prompt ascent steps per training step.", low=0)
    fresh_prompt_every: int = setting(0, "Every E epochs, replace one prompt (in turn) by one mined anew from a "
                                         "random start against the current model, so a backdoor that returns late "
                                         "in a long run is found again (0: never).", low=0)
    prompts: int = setting(4, "Independently mined prompts, used in turn (each step trains on one); with --heads, "
                              "as many triggers recovered by the scan are added.", low=1)
    reference: float = setting(1.0, "γ: suppress the reaction minus γ × θ0's reaction (1: the excess over θ0).",
                               low=0.0)
    restore: bool = setting(False, "With --heads: along the feature direction in which the scan's most "
                                   "suspicious recovered trigger moves the merge's features (beyond θ0's reaction), "
                                   "preserve θ0's clean features instead of the merge's when that sends fewer shadow "
                                   "images to its target, so images a poisoned merge sends part-way to the target "
                                   "without a trigger are sent back. Off by default: it lowered that floor in 4 of 5 "
                                   "measured cases but raised ASR(T) from 3% to 24% where the scan's top target was "
                                   "the wrong one (docs/lfpm.md).")
    force: bool = setting(False, "With --heads: run even when the scan finds no suspicious target in the merged "
                                 "model (by default LFPM stops there and returns the merge unchanged).")
    adam_eps: float = setting(1e-8, "Adam's ε for τa's optimiser.", low=0.0, low_open=True)
    idle_tolerance: float = setting(1e-9, "A step whose loss is below this × E‖f_θm(x)‖² leaves τa as it is "
                                          "(fp32; under bf16 autocast at least 1e-4).", low=0.0, cli=False)
    seed: int = setting(0, "Random seed (recorded in the output's metadata).")
    device: str = setting("auto", "auto (cuda when present), cpu, cuda, cuda:1 ...", run_only=True)
    workers: int = setting(0, "Data-loading worker processes.", low=0, run_only=True)
    checkpoint_every: int | None = setting(None, "Save the run's state every N steps (default: a tenth of the "
                                                 "run).", low=1, run_only=True)


SCAN_FROM_LFPM = ("device", "seed")  # the scan of `defend lfpm --heads` runs on LFPM's device with its seed


def scan_settings_from(cfg: LFPMConfig) -> dict[str, Any]:
    """The scan settings `defend lfpm --heads` takes from LFPM's own (`SCAN_FROM_LFPM`: its device and seed)."""
    return {k: getattr(cfg, k) for k in SCAN_FROM_LFPM}
