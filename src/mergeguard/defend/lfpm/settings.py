"""LFPM's settings, declared without torch: `defend lfpm`'s options, checks, report and printed command come
from these fields (`settings.setting`); the run itself is `run.py`."""

from __future__ import annotations

from dataclasses import dataclass

from mergeguard import settings
from mergeguard.scan.config import ScanConfig
from mergeguard.settings import experiment, nested, setting

PROMPTS = ("mask", "patch", "tokens")


@dataclass
class LFPMConfig:
    """LFPM's settings, each declared once: the CLI's `defend lfpm` options, the checks, the report and the
    demo's printed command all come from these fields. What a user sets is `setting`; `experiment` marks what
    docs/lfpm.md says to leave alone unless measuring (shown apart in `--help`)."""

    epochs: int = experiment(10, "Passes over the shadow images; more of them win back clean accuracy.", low=1)
    batch_size: int = setting(128, "Shadow images per step.", low=1)
    lr: float | None = experiment(None, "Adam learning rate of the anti-backdoor vector τa (default: the RMS of the "
                                     "merge's own task vector θm − θ0, so each step follows the model's scale).",
                               low=0.0, low_open=True)
    path_points: int = experiment(4, "K points α = k/K of the loss path integral.", low=1)
    beta: float = experiment(1.0, "Weight of clean-feature preservation: raise it if the defended model still loses "
                               "too much accuracy after more --epochs, lower it if the trigger survives.", low=0.0)
    subspace_rank: int = experiment(0, "Rank of the adversarial subspace the excess reaction is projected on "
                                    "(0: the whole feature space).", low=0)
    prompt: str = experiment("mask", "Mined visual prompt: mask (pattern + soft mask, finds trigger-shaped "
                                  "backdoors), patch (a square pasted at a random position) or tokens (VPT: "
                                  "learnable tokens inserted after the class token).", choices=PROMPTS)
    prompt_tokens: int = experiment(4, "tokens: how many prompt tokens.", low=1)
    mask_penalty: float = experiment(10.0, "mask: weight of the mask's mean area against the log excess reaction.",
                                  low=0.0)
    mine_warmup: int = experiment(100, "Ascent steps on each prompt before training starts (stage I).", low=0)
    patch_fraction: float = experiment(0.1, "patch: side of the patch as a fraction of the image side.", low=0.0,
                                    low_open=True, high=1.0)
    patch_lr: float = experiment(0.1, "Step of the prompt's ascent (Adam for mask and tokens, sign ascent for the "
                                   "patch).", low=0.0, low_open=True)
    mine_steps: int = experiment(1, "Prompt ascent steps per training step.", low=0)
    fresh_prompt_every: int = experiment(0, "Every E epochs, replace one prompt (in turn) by one mined anew from a "
                                         "random start against the current model, so a backdoor that returns late "
                                         "in a long run is found again (0: never).", low=0)
    prompts: int = experiment(4, "Independently mined prompts, used in turn (each step trains on one); with --heads, "
                              "as many triggers recovered by the scan are added.", low=1)
    reference: float = experiment(1.0, "γ: suppress the reaction minus γ × θ0's reaction (1: the excess over θ0).",
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
    adam_eps: float = experiment(1e-8, "Adam's ε for τa's optimiser.", low=0.0, low_open=True)
    idle_tolerance: float = setting(1e-9, "A step whose loss is below this × E‖f_θm(x)‖² leaves τa as it is "
                                          "(fp32; under bf16 autocast at least 1e-4).", low=0.0, cli=False)
    seed: int = settings.seed()
    device: str = settings.device()
    workers: int = settings.workers()
    checkpoint_every: int | None = setting(None, "Save the run's state every N steps (default: a tenth of the "
                                                 "run).", low=1, run_only=True)
    # `defend lfpm --heads`: the scan that decides, starts and checks the run, on LFPM's device with its seed
    scan: ScanConfig = nested(ScanConfig, "Scan (with --heads): ", inherit=("device", "seed"))

    def __post_init__(self) -> None:
        settings.inherit_into(self)
