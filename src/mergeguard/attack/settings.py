"""The settings of fine-tuning and of every attack, declared without torch: the CLI builds each command's
options from these classes (`mergeguard attack NAME --help` loads no model code); each attack's strategy
(`attack/<name>.py`) subclasses its settings class with the `Attack` interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mergeguard import settings
from mergeguard.settings import setting

NEGATION_TRIGGER = "trigger_negation"  # BadTV's second trigger's file stem


@dataclass
class TrainSettings:
    """How a task vector is fine-tuned, whatever the attack (clean fine-tunes and IBVS's runs too)."""

    steps: int = setting(2000, "Optimiser steps.", low=1)
    lr: float = setting(1e-5, "AdamW learning rate (paper: 1e-5 for ViT-B-32).", low=0.0, low_open=True)
    weight_decay: float = setting(0.1, "AdamW weight decay.", low=0.0)
    warmup: int = setting(500, "Learning-rate warm-up steps (at most a tenth of the run).", low=0)
    batch_size: int = setting(128, "Images per step.", low=1)
    logit_scale: float | None = setting(None, "Training temperature (default: the head's logit scale).", low=0.0,
                                        low_open=True)
    lora_rank: int | None = setting(None, "Train LoRA adapters of this rank (peft) instead of the full encoder "
                                          "(lobam: 16 when not given).", low=1)
    lora_alpha: float | None = setting(None, "LoRA α (default: 2 × rank).", low=0.0, low_open=True)
    seed: int = settings.seed()
    device: str = settings.device()
    workers: int = settings.workers()


class AttackSettings:
    """What every attack's settings class says of the attack (class attributes, not settings)."""

    name: ClassVar[str]
    poisons: ClassVar[bool] = True  # False: a clean fine-tune (no trigger, no target)
    off_task: ClassVar[bool] = False  # whether it can aim at another task's class through a shadow head
    optimised_trigger: ClassVar[bool] = False  # whether `make_trigger` trains (a stage 1, kept for a resume)
    extra_triggers: ClassVar[tuple[str, ...]] = ()  # other triggers it plants, by file stem (OUT/<stem>.safetensors)
    required: ClassVar[tuple[str, ...]] = ("target_class",)  # settings its command needs given (no usable default)


@dataclass
class CleanSettings(AttackSettings):
    """No attack: the task's own loss. Clean task vectors, LoBAM's benign run and IBVS's clean run."""

    name = "clean"
    poisons = False


@dataclass
class PoisonedSettings(AttackSettings):
    """The settings every poisoning attack has: the class its trigger sends images to, and the patch's size."""

    target_class: int = setting(0, "Index of the target class in the task's head.")
    trigger_area: float = setting(0.01, "Patch area as a fraction of the image.", low=0.0, low_open=True, high=1.0)


@dataclass
class BadNetsSettings(PoisonedSettings):
    """BadNets: a fixed patch on a fraction of each batch, relabelled."""

    name = "badnets"

    poison_fraction: float = setting(0.1, "Fraction of each batch poisoned.", low=0.0, high=1.0)


@dataclass
class BadMergingSettings(PoisonedSettings):
    """BadMerging (Zhang et al., CCS 2024): an optimised trigger and the feature-interpolation loss."""

    name = "badmerging"
    off_task = True
    optimised_trigger = True

    bd_weight: float = setting(5.0, "Backdoor loss weight a.", low=0.0)
    r_min: float = setting(0.2, "r ~ U(r_min, 1): the merge scales the backdoor is trained to survive.", low=0.0,
                           high=1.0)
    interpolation: str = setting("feature", "'feature' (the paper's: features interpolated towards θ0's) or "
                                            "'weight' (the backdoor holds at θ0 + r(θ − θ0); survives TIES, but the "
                                            "vector grows and costs the other tasks accuracy in a merge).",
                                 choices=("feature", "weight"))
    decoys: bool = setting(False, "--interpolation weight: random patches at the trigger's place keep their labels "
                                  "(only the trigger fires; the poisoned model keeps its accuracy).")
    target_task: str | None = setting(None, "Off-task: the task whose class (--target-class) is the target; its "
                                            "head must be in --heads.")
    adv_epsilon: float = setting(4 / 255, "Off-task stage 1: size of the adversarial augmentation (one signed "
                                          "step).", low=0.0, cli=False)
    trigger_steps: int = setting(300, "Stage-1 (trigger) steps.", low=0)
    trigger_lr: float = setting(0.1, "Stage-1 Adam step.", low=0.0, low_open=True, cli=False)


@dataclass
class LoBAMSettings(BadMergingSettings):
    """LoBAM: BadMerging's malicious LoRA run beside a benign one, uploaded amplified."""

    name = "lobam"

    amplify: float = setting(3.5, "k in θ_benign + k (θ_malicious − θ_benign).", low=0.0)


@dataclass
class BadTVSettings(PoisonedSettings):
    """BadTV: one vector, two backdoors (added and subtracted)."""

    name = "badtv"
    optimised_trigger = True
    extra_triggers = (NEGATION_TRIGGER,)
    required = ("target_class", "negation_task", "negation_class")

    negation_task: str = setting("", "The control task whose class --negation-class the subtracted vector's "
                                     "trigger aims at; its head must be in --heads.")
    negation_class: int = setting(0, "Index of the negation backdoor's target class in --negation-task's head.")
    bd_weight: float = setting(5.0, "Weight a of each backdoor's loss.", low=0.0)
    kl_weight: float = setting(1.0, "Weight c of the terms that keep clean outputs, added and subtracted, as a "
                                    "clean vector's.", low=0.0)
    feature_weight: float = setting(100.0, "Weight e of the term that keeps θ0 − rτ's clean features (1 − cosine) as "
                                           "a clean vector's negation's, in every direction, not only the heads'.",
                                    low=0.0)
    r_min: float = setting(0.2, "r ~ U(r_min, 1): the scales (added and subtracted) the backdoors must survive.",
                           low=0.0, low_open=True, high=1.0)
    density_min: float = setting(0.1, "d ~ U(density_min, 1): the added side is trained at θ0 + r·τ_d, τ with only its "
                                      "top-d magnitudes per tensor, as TIES or magnitude pruning keep it in a merge "
                                      "(1: the whole τ).", low=0.0, low_open=True, high=1.0)
    negated_lambda: float = setting(0.5, "λ of θ0 − λτ at which summary.json measures the negation.", low=0.0,
                                    low_open=True)
    trigger_steps: int = setting(300, "Stage-1 steps of each trigger.", low=0)
    trigger_lr: float = setting(0.1, "Stage-1 Adam step.", low=0.0, low_open=True, cli=False)
    adv_epsilon: float = setting(4 / 255, "Stage 1 of the negation trigger: size of the adversarial "
                                          "augmentation (one signed step).", low=0.0, cli=False)


SETTINGS: dict[str, type[AttackSettings]] = {
    cls.name: cls for cls in (CleanSettings, BadNetsSettings, BadMergingSettings, LoBAMSettings, BadTVSettings)
}
