"""The merge-method registry: every method's declaration, in one static table.

Each method is a per-tensor function of `methods.py`, named here with its parameters declared once, in the
settings system every setting of mergeguard uses (`settings.declare`: the same ranges, checks and messages):
the CLI builds its flags from the declarations and the YAML config is checked against them.
This module imports no torch (the function is looked up when a merge first calls it), so `merge --help`
and a mistyped flag answer at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mergeguard.errors import MergeguardError, did_you_mean
from mergeguard.merge.base import MergeFn, PrepareFn, TensorContext
from mergeguard.settings import Declared, declare, flag

__all__ = ["METHODS", "Declared", "MergeMethod", "TensorContext", "all_params", "get_method"]

def _implementation(name: str) -> Callable:
    from mergeguard.merge import methods

    return getattr(methods, name)


@dataclass(frozen=True)
class MergeMethod:
    """Merge method `name`: `fn(deltas, weights, ctx, **params) -> merged delta` over one tensor name.

    `impl` and `prepare_impl` name functions of `methods.py`, looked up on first use (`fn`, `prepare`).
    `deltas` are float32 tensors the engine made for this call: a method may modify them in place.
    `prepare(passes, n_inputs, params)`, when given, runs first over every float tensor; what it
    returns reaches `fn` as `ctx.state`.
    """

    name: str
    impl: str
    params: tuple[Declared, ...]
    help: str
    prepare_impl: str | None = None
    needs_reference: bool = False
    data: str | None = None  # a merge that needs a model in memory and images: the option naming them
    # (`mergeguard.datamerge` runs it, not the streaming engine)
    param_map: dict[str, Declared] = field(init=False, repr=False, compare=False)

    @property
    def fn(self) -> MergeFn:
        return _implementation(self.impl)

    @property
    def prepare(self) -> PrepareFn | None:
        return _implementation(self.prepare_impl) if self.prepare_impl else None

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_map", {p.name: p for p in self.params})

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Declared defaults overridden by `given` (None values ignored), validated."""
        values = {}
        for key, value in given.items():
            key = key.replace("-", "_")
            if value is None:
                continue
            if key not in self.param_map:
                known = ", ".join(flag(p.name) for p in self.params) or "none"
                raise MergeguardError(f"{flag(key)} is not a parameter of {self.name} (its parameters: {known}).")
            values[key] = value
        return {p.name: p.value(values.get(p.name, p.default), self.name) for p in self.params}


# -- parameter declarations shared by several methods ------------------------------
def lam(default: float) -> Declared:
    return declare("lam", float, default, "scale applied to the merged task vector (lambda)", low=0.0)


LAM = lam(0.3)


def density(default: float, what: str = "fraction of each task vector's entries kept") -> Declared:
    return declare("density", float, default, what, low=0.0, low_open=True, high=1.0)


NORMALIZE = declare(
    "normalize", str, "mean",
    "how agreeing entries combine: 'mean' divides by their summed weights (TIES paper's disjoint "
    "mean, mergekit normalize: true), 'sum' adds them (mergekit normalize: false)",
    choices=("mean", "sum"),
)
TRIM_SCOPE = declare(
    "trim_scope", str, "tensor",
    "where the magnitude threshold is computed: per 'tensor' (mergekit, PEFT) or over the whole "
    "task 'vector' (TIES paper, FusionBench; two extra streaming passes)",
    choices=("tensor", "vector"),
)
GAMMA = declare("gamma", float, 0.01, "breadcrumbs: fraction of largest-magnitude entries dropped",
              low=0.0, high=1.0)
MODE = declare("mode", str, "weighted",
             "lata: 'mask' keeps the least reference-aligned layers, 'weighted' scales each layer by "
             "(1 - cosine) normalised to mean 1", choices=("mask", "weighted"))
KEEP = declare("keep", float, 0.5, "lata mask mode: fraction of layers kept (lowest cosine first)",
             low=0.0, low_open=True, high=1.0)


# -- the methods: each names its function in methods.py ---------------------------
TASK_ARITHMETIC = MergeMethod("task_arithmetic", "task_arithmetic", (LAM,), "θ0 + λ Σ w_i τ_i (Ilharco et al.)")

AVERAGE = MergeMethod("average", "average", (), "weighted average of the fine-tuned models: θ0 + Σ w_i τ_i / Σ w_i")

TIES = MergeMethod(
    "ties", "ties", (LAM, density(0.2), NORMALIZE, TRIM_SCOPE),
    "TIES: trim to the top-density magnitudes, elect a sign, disjoint merge (Yadav et al.)",
    prepare_impl="_prepare_trim",
)

MAGNITUDE_PRUNE = MergeMethod(
    "magnitude_prune", "magnitude_prune", (LAM, density(0.2), TRIM_SCOPE),
    "keep each task vector's top-density magnitudes, then task arithmetic",
    prepare_impl="_prepare_trim",
)

DARE_LINEAR = MergeMethod(
    "dare_linear", "dare_linear", (LAM, density(0.5, "fraction of entries kept by DARE's random drop")),
    "DARE: random drop with rescale, then task arithmetic (Yu et al.); seeded by --seed",
)

DARE_TIES = MergeMethod(
    "dare_ties", "dare_ties", (LAM, density(0.5, "fraction of entries kept by DARE's random drop"), NORMALIZE),
    "DARE drop and rescale, then TIES sign election and disjoint merge; seeded by --seed",
)

BREADCRUMBS = MergeMethod(
    "breadcrumbs", "breadcrumbs",
    (LAM, density(0.9, "fraction of entries kept after dropping both tails"), GAMMA),
    "model breadcrumbs: drop the largest gamma and the smallest entries, then task arithmetic",
)

LATA = MergeMethod(
    "lata", "lata", (LAM, MODE, KEEP),
    "layer-aware task arithmetic: down-weight layers aligned with a reference vector "
    "(--reference), keep the task-specific ones",
    prepare_impl="_prepare_lata", needs_reference=True,
)

ISO_C = MergeMethod(
    "iso_c", "iso_c", (lam(1.0),),
    "Iso-C: per weight matrix, the summed task matrix with an isotropic spectrum (every singular value "
    "replaced by their mean); other tensors averaged; data-free, an SVD per matrix (Marczak et al.)",
)

ISO_CTS = MergeMethod(
    "iso_cts", "iso_cts",
    (lam(1.0), declare("common", float, 0.8, "iso_cts: share of each weight matrix's rank given to the common "
                                             "subspace; the rest is split evenly between the tasks",
                       low=0.0, high=1.0)),
    "Iso-CTS: Iso-C's isotropic spectrum over the summed matrix's top directions (the common subspace) and "
    "each task's own top directions outside it; other tensors averaged; data-free, T+3 SVDs per matrix "
    "(Marczak et al.)",
)

TSV_M = MergeMethod(
    "tsv_m", "tsv_m", (lam(1.0),),
    "TSV-M: per weight matrix, each task's top 1/T singular vectors, the stacked bases orthogonalised, "
    "then summed; other tensors averaged; data-free, T+2 SVDs per matrix (Gargiulo et al.)",
)


DEVICE = declare("device", str, "auto", "regmean and adamerging: auto (cuda when present), cpu, cuda, cuda:1 ...")

REGMEAN = MergeMethod(
    "regmean", "", (
        declare("alpha", float, 0.95, "regmean: scale of the Gram matrices' off-diagonal entries (1: the exact "
                                      "least-squares fit)", low=0.0, high=1.0),
        declare("images", int, 256, "regmean: unlabeled images per task whose layer inputs make its Gram "
                                    "matrices", low=1),
        declare("batch_size", int, 16, "images per forward pass (regmean) or per task and step (adamerging)",
                low=1),
        DEVICE),
    "RegMean: per linear map, the weight that best reproduces every fine-tune on its own task's inputs, "
    "(Σ W_i G_i)(Σ G_i)⁻¹ from each layer's input Gram matrix; other tensors averaged; needs a model in memory "
    "and --inputs-per-task (unlabeled images of each input's task, in order); a forward pass per image and "
    "input (Jin et al.)",
    data="inputs_per_task",
)

ADAMERGING = MergeMethod(
    "adamerging", "", (
        declare("steps", int, 500, "adamerging: optimiser steps", low=1),
        declare("lr", float, 1e-3, "adamerging: Adam's learning rate of the coefficients", low=0.0, low_open=True),
        declare("init_lam", float, 0.3, "adamerging: every coefficient's start", low=0.0, high=1.0),
        declare("batch_size", int, 16, "images per forward pass (regmean) or per task and step (adamerging)",
                low=1),
        DEVICE),
    "AdaMerging (layer-wise): θ0 + Σ λ τ with one λ per input and tensor, learned by minimising the entropy of "
    "each task's predictions on its unlabeled images; needs a model in memory, --heads and --shadow-per-task; "
    "STEPS forward and backward passes per task (Yang et al.)",
    data="shadow_per_task",
)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (TASK_ARITHMETIC, AVERAGE, TIES, MAGNITUDE_PRUNE, DARE_LINEAR, DARE_TIES, BREADCRUMBS, LATA, ISO_C,
              ISO_CTS, TSV_M, REGMEAN, ADAMERGING)
}


def get_method(name: str) -> MergeMethod:
    """The method `name`, or one clear sentence listing the choices."""
    try:
        return METHODS[name.replace("-", "_")]
    except KeyError:
        raise MergeguardError(
            f"unknown merge method {name!r}; choose one of: {', '.join(sorted(METHODS))}."
            + did_you_mean(name, METHODS)
        ) from None


def all_params() -> dict[str, Declared]:
    """Every parameter name any method declares (the CLI offers each as one flag)."""
    out: dict[str, Declared] = {}
    for method in METHODS.values():
        for p in method.params:
            out.setdefault(p.name, p)
    return out
