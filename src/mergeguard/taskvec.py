"""Task vectors: a checkpoint's delta against its base (headers checked against the base first),
extracted (full fine-tunes or PEFT LoRA adapters) and measured. The merge engine builds on these.

A task vector file is an ordinary safetensors checkpoint whose metadata says
`mergeguard.kind = task_vector`; one made from a LoRA adapter is *partial*
(`mergeguard.partial = true`): tensors it lacks are a zero delta.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergeguard.checkpoint import Checkpoint, CheckpointWriter, PlannedTensor
from mergeguard.checkpoint.paths import refuse_writing_over
from mergeguard.checkpoint.provenance import build_metadata, command_line, input_record
from mergeguard.checkpoint.reader import PARTIAL_KEY
from mergeguard.checkpoint.tensors import check_finite, parse_dtype
from mergeguard.errors import MergeguardError
from mergeguard.progress import NullProgress, ProgressSink

PEFT_PREFIX = "base_model.model."
_CHUNK = 1 << 22
MHA_OUT_PROJ = ".base_layer.out_proj"
PEFT_OUT_PROJ_FIX = "0.22.0"  # the first peft release that applies a MultiheadAttention out_proj update once

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    out: Path
    source: str  # "full" or "lora"
    tensors: int
    skipped: int
    norm: float
    lora_rule: dict | None = None  # LoRA only: which out_proj rule was applied, why, and to which modules


# -- inputs against the base, and their deltas -------------------------------------
@dataclass
class InputPlan:
    """Which inputs take part in each float tensor of the base, after checking every header."""

    present: dict[str, list[int]]  # float tensor name -> indices of the inputs that have it
    copied: list[str]  # non-float tensors copied from the base
    skipped: dict[str, int] = field(default_factory=dict)  # input label -> tensors skipped
    extra: dict[str, int] = field(default_factory=dict)  # input label -> tensors the base lacks


def check_inputs(base: Checkpoint, inputs: Sequence[Checkpoint], *, allow_missing: bool = False,
                 reference: Checkpoint | None = None) -> InputPlan:
    """Check every input's headers against the base; say which tensor is wrong, in one sentence."""
    if len(base) == 0:
        raise MergeguardError(f"the base {base.spec} holds no tensors.")
    if base.kind != "model":
        raise MergeguardError(f"the base {base.spec} is a {base.kind.replace('_', ' ')}, not a model checkpoint.")
    for ckpt in [*inputs, *([reference] if reference else [])]:
        if ckpt.kind == "lora_adapter":
            raise MergeguardError(
                f"{ckpt.spec} is a LoRA adapter; turn it into a task vector first with "
                f"`mergeguard extract-tv BASE {ckpt.spec} -o tv.safetensors`."
            )
    present: dict[str, list[int]] = {}
    copied: list[str] = []
    skipped: dict[str, int] = {}
    for name, info in base.infos.items():
        if not info.is_float:
            copied.append(name)
            continue
        present[name] = []
        for i, ckpt in enumerate([*inputs, *([reference] if reference else [])]):
            role = "the reference" if i == len(inputs) else f"input {ckpt.spec}"
            if name not in ckpt:
                if ckpt.is_partial or allow_missing:
                    skipped[ckpt.spec] = skipped.get(ckpt.spec, 0) + (not ckpt.is_partial)
                    continue
                n_missing = sum(1 for k, v in base.infos.items() if v.is_float and k not in ckpt)
                more = f" (and {n_missing - 1} more)" if n_missing > 1 else ""
                raise MergeguardError(
                    f"{role} lacks tensor {name!r}{more}; pass --allow-missing to merge without them."
                )
            other = ckpt.info(name)
            if other.shape != info.shape:
                raise MergeguardError(
                    f"tensor {name!r} has shape {list(other.shape)} in {role} but "
                    f"{list(info.shape)} in the base {base.spec}."
                )
            if ckpt.is_task_vector:
                if not other.is_float:
                    raise MergeguardError(f"tensor {name!r} of task vector {ckpt.spec} is not a float tensor.")
            elif other.dtype != info.dtype:
                raise MergeguardError(
                    f"tensor {name!r} is {str(other.dtype).removeprefix('torch.')} in {role} but "
                    f"{str(info.dtype).removeprefix('torch.')} in the base {base.spec}; "
                    "convert one of them first."
                )
            if i < len(inputs):
                present[name].append(i)
    extra = {c.spec: n for c in inputs if (n := sum(1 for k in c.infos if k not in base))}
    return InputPlan(present, copied, {k: v for k, v in skipped.items() if v}, extra)


def delta_of(ckpt: Checkpoint, name: str, base32: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 delta of `ckpt` for tensor `name` (`raw`: that tensor, already read):
    itself for a task vector, else minus the base."""
    t = ckpt.get(name) if raw is None else raw
    check_finite(t, name, ckpt.spec)
    if ckpt.is_task_vector:
        return t.float() if ckpt.reads_fresh or t.dtype != torch.float32 else t.clone()
    if t.dtype != torch.float32:
        return t.float().sub_(base32)
    # a tensor read from disk is ours to overwrite; one held in memory (a pickle) is not
    return t.sub_(base32) if ckpt.reads_fresh else torch.sub(t, base32)


# -- LoRA adapter -> dense deltas ----------------------------------------------------
@dataclass(frozen=True)
class LoraModule:
    module: str  # module path inside the adapter, without the PEFT prefix
    base_key: str  # the base checkpoint tensor it updates
    a_key: str
    b_key: str
    scale: float
    kind: str  # "linear", "conv" or "embedding"
    fan_in_fan_out: bool


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or its suffix."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _match_base_key(module: str, base: Checkpoint) -> str | None:
    """The base tensor a LoRA module updates: `<module>.weight` (or an attention `in_proj_weight`),
    allowing the adapter's module path to carry a prefix the base lacks, or the reverse."""
    for leaf in ("weight", "in_proj_weight"):
        parts = f"{module}.{leaf}".split(".")
        for start in range(len(parts) - 1):
            candidate = ".".join(parts[start:])
            if candidate in base:
                return candidate
            hits = [k for k in base.infos if k.endswith("." + candidate)]
            if len(hits) == 1:
                return hits[0]
    return None


@dataclass(frozen=True)
class OutProjRule:
    """How a LoRA update of a MultiheadAttention's out_proj counts: twice for adapters saved by a peft before
    0.22.0 (it applied that update twice, in training as in merge_and_unload), once after. Read from the
    `peft_version` the adapter's config records, the way peft's own loader reads it: a config without one
    predates peft 0.18 and counts twice; a dev build of 0.21.1 or later already has the fix."""

    peft_version: str | None
    doubled: bool
    why: str

    @classmethod
    def of(cls, config: dict) -> OutProjRule:
        from packaging.version import InvalidVersion, Version

        saved = config.get("peft_version")
        if not saved:
            return cls(None, True, "the adapter's config has no peft_version (saved before peft 0.18), so, as peft "
                                   f"does, its out_proj updates count twice (peft < {PEFT_OUT_PROJ_FIX})")
        try:
            version = Version(str(saved).partition("@")[0])
        except InvalidVersion:
            raise MergeguardError(f"the adapter's config says it was saved by peft {saved!r}, "
                                  "which is not a version number.") from None
        release = Version(version.base_version)
        doubled = release < Version("0.21.1") or (not version.is_devrelease and release < Version(PEFT_OUT_PROJ_FIX))
        how = "twice" if doubled else "once"
        return cls(str(saved), doubled, f"saved by peft {saved}, which applied out_proj updates {how}")


def lora_plan(adapter: Checkpoint, base: Checkpoint) -> tuple[list[LoraModule], dict]:
    """Read a PEFT adapter's config and tensor names; map each LoRA module onto a base tensor. Also returns
    the out_proj rule applied (`ExtractResult.lora_rule`: peft_version, out_proj_doubled, why, modules)."""
    cfg = adapter.adapter_config or {}
    if cfg.get("use_dora"):
        raise MergeguardError(f"{adapter.spec} is a DoRA adapter, which is not supported yet.")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise MergeguardError(f"{adapter.spec} is a {peft_type} adapter; only LoRA adapters are supported.")
    default_r = cfg.get("r", 8)
    default_alpha = cfg.get("lora_alpha", default_r)
    rslora = bool(cfg.get("use_rslora", False))
    rule = OutProjRule.of(cfg)
    modules, out_proj = [], []
    pairs = {
        ".lora_A.weight": (".lora_B.weight", "linear"),
        ".lora_embedding_A": (".lora_embedding_B", "embedding"),
    }
    for key in adapter.keys():
        for a_suffix, (b_suffix, kind) in pairs.items():
            if not key.endswith(a_suffix):
                continue
            prefix = key[: -len(a_suffix)]
            b_key = prefix + b_suffix
            if b_key not in adapter:
                raise MergeguardError(f"{adapter.spec} has {key} but no {b_key}.")
            module = re.sub(r"\.base_layer(?=\.|$)", "", prefix.removeprefix(PEFT_PREFIX))
            base_key = _match_base_key(module, base)
            if base_key is None:
                raise MergeguardError(
                    f"LoRA module {module!r} of {adapter.spec} matches no tensor of the base {base.spec}; "
                    "is this adapter for that base model?"
                )
            a_info = adapter.info(key)
            r = a_info.shape[0]  # the rank, whatever rank_pattern says, is the tensor's
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, default_alpha)
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            if prefix.endswith(MHA_OUT_PROJ):
                out_proj.append(base_key)
                if rule.doubled:  # the adapter was trained under the function its peft computed
                    scale *= 2
            if kind == "linear" and len(a_info.shape) == 4:
                kind = "conv"
            modules.append(LoraModule(module, base_key, key, b_key, scale, kind,
                                      bool(cfg.get("fan_in_fan_out", False))))
    unknown = [
        k for k in adapter.keys()
        if "lora_" not in k and not k.endswith((".lora_magnitude_vector",))
    ]
    if unknown:
        raise MergeguardError(
            f"{adapter.spec} holds non-LoRA tensors such as {unknown[0]!r} (modules_to_save); "
            "they are not supported yet."
        )
    if not modules:
        raise MergeguardError(f"{adapter.spec} holds no LoRA weights (lora_A / lora_B).")
    report = {"peft_version": rule.peft_version, "out_proj_doubled": rule.doubled if out_proj else None,
              "why": rule.why if out_proj else "no MultiheadAttention out_proj module", "out_proj_modules": out_proj}
    return modules, report


def lora_delta(adapter: Checkpoint, m: LoraModule, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW = scale · B A for one module, in float32, shaped like the base tensor."""
    a = adapter.get(m.a_key).float()
    b = adapter.get(m.b_key).float()
    check_finite(a, m.a_key, adapter.spec)
    check_finite(b, m.b_key, adapter.spec)
    if m.kind == "embedding":
        delta = (b @ a).T
    else:
        delta = b.flatten(1) @ a.flatten(1)  # (out, in); a conv kernel is reshaped below
        square = delta.shape[0] == delta.shape[1]
        # PEFT transposes only for fan-in-fan-out layers (GPT-2's Conv1D): the base's shape says which,
        # and the config's flag decides only for square matrices, where the shape cannot
        if (m.kind == "linear" and tuple(delta.shape) != tuple(shape) and tuple(delta.T.shape) == tuple(shape)) or (
                square and m.fan_in_fan_out):
            delta = delta.T
    if delta.numel() != math.prod(shape):
        raise MergeguardError(
            f"LoRA module {m.module!r} gives a {list(delta.shape)} update but the base tensor "
            f"{m.base_key!r} is {list(shape)}."
        )
    return (delta * m.scale).reshape(shape)


# -- extraction --------------------------------------------------------------------
def extract_task_vector(
    base: Checkpoint,
    finetuned: Checkpoint,
    out: str | Path,
    *,
    dtype: str | None = "auto",
    allow_missing: bool = False,
    overwrite: bool = False,
    progress: ProgressSink | None = None,
) -> ExtractResult:
    """Write τ = θ_finetuned − θ_base (or a LoRA adapter's dense ΔW) as a task vector file."""
    progress = progress or NullProgress()
    out_dtype = parse_dtype(dtype)
    refuse_writing_over(out, [base, finetuned])
    if base.is_task_vector:
        raise MergeguardError(f"the base {base.spec} is a task vector, not a model.")
    if finetuned.is_task_vector:
        raise MergeguardError(f"{finetuned.spec} is already a task vector.")

    lora_rule = None
    if finetuned.kind == "lora_adapter":
        modules, lora_rule = lora_plan(finetuned, base)
        if lora_rule["out_proj_modules"] and lora_rule["peft_version"] is None:
            log.warning("%s: %s.", finetuned.spec, lora_rule["why"])
        by_key = {m.base_key: m for m in modules}
        names = [k for k in base.keys() if k in by_key]
        source, skipped = "lora", 0

        def compute(name: str, base32: torch.Tensor) -> torch.Tensor:
            return lora_delta(finetuned, by_key[name], tuple(base32.shape))
    else:
        plan = check_inputs(base, [finetuned], allow_missing=allow_missing)
        names = [k for k, idx in plan.present.items() if idx]
        source, skipped = "full", sum(plan.skipped.values())

        def compute(name: str, base32: torch.Tensor) -> torch.Tensor:
            return delta_of(finetuned, name, base32)

    provenance = {
        "command": command_line(),
        "source": source,
        "inputs": [input_record(base, "base"), input_record(finetuned, "finetuned")],
        **({"lora": lora_rule} if lora_rule else {}),
    }
    metadata = build_metadata("task_vector", provenance, inherit_from=base)
    if source == "lora" or skipped:
        metadata[PARTIAL_KEY] = "true"
    layout = [PlannedTensor(n, out_dtype or base.info(n).dtype, base.info(n).shape) for n in names]
    sq = 0.0
    with CheckpointWriter(out, layout, metadata, overwrite=overwrite) as writer:
        progress.stage("extracting task vector", len(layout))
        for planned in layout:
            base_t = base.get(planned.name)
            check_finite(base_t, planned.name, f"the base {base.spec}")
            delta = compute(planned.name, base_t.float())
            sq += float(delta.pow(2).sum())
            writer.write(planned.name, delta.to(planned.dtype))
            progress.advance()
        writer.commit()
    return ExtractResult(Path(out), source, len(layout), skipped, math.sqrt(sq), lora_rule)


# -- statistics --------------------------------------------------------------------
@dataclass
class VectorStats:
    labels: list[str]
    norms: list[float]
    cosine: list[list[float]]
    sign_conflict: list[list[float]]  # among entries nonzero in both, the fraction with opposite signs
    outliers: list[str]
    outlier_ratio: float
    params: list[int] = field(default_factory=list)


def task_vector_stats(
    vectors: Sequence[Checkpoint],
    base: Checkpoint | None = None,
    *,
    outlier_ratio: float = 2.0,
    progress: ProgressSink | None = None,
) -> VectorStats:
    """Norms, pairwise cosines and sign-conflict rates of task vectors, streamed tensor by tensor.

    Model checkpoints count as task vectors relative to `base`. An input whose norm exceeds
    `outlier_ratio` x the median norm of the others is flagged (an amplified vector, as LoBAM uploads).
    """
    progress = progress or NullProgress()
    for v in vectors:
        if not v.is_task_vector and base is None:
            raise MergeguardError(f"{v.spec} is a model, not a task vector; pass --base to compare it.")
        if v.kind == "lora_adapter":
            raise MergeguardError(f"{v.spec} is a LoRA adapter; extract a task vector from it first.")
    n = len(vectors)
    names = list(dict.fromkeys(k for v in vectors for k, i in v.infos.items() if i.is_float))
    dot = torch.zeros(n, n, dtype=torch.float64)
    conflicts = torch.zeros(n, n, dtype=torch.float64)
    both = torch.zeros(n, n, dtype=torch.float64)
    counts = [0] * n
    progress.stage("measuring task vectors", len(names))
    for name in names:
        base32 = None
        if base is not None and name in base:
            base32 = base.get(name).float()
        deltas: dict[int, torch.Tensor] = {}
        for i, v in enumerate(vectors):
            if name not in v:
                continue
            if not v.is_task_vector and base32 is None:
                continue  # a model tensor the base lacks is no task-vector entry
            if base32 is not None and v.info(name).shape != tuple(base32.shape):
                raise MergeguardError(
                    f"tensor {name!r} has shape {list(v.info(name).shape)} in {v.spec} but "
                    f"{list(base32.shape)} in the base."
                )
            deltas[i] = delta_of(v, name, base32 if base32 is not None else torch.zeros(()))
        idx = list(deltas)
        shapes = {tuple(d.shape) for d in deltas.values()}
        if len(shapes) > 1:
            raise MergeguardError(f"tensor {name!r} has different shapes across the inputs: {shapes}.")
        if idx:
            sub = torch.tensor(idx)
            grid = (sub[:, None], sub[None, :])
            flat = torch.stack([deltas[i].reshape(-1) for i in idx])
            for chunk in flat.split(_CHUNK, dim=1):  # float32 counts stay exact below 2**24
                signs = chunk.sign()
                nz = (signs != 0).float()
                pairs = (nz @ nz.T).double()
                dot[grid] += chunk.double() @ chunk.double().T
                both[grid] += pairs
                conflicts[grid] += (pairs - (signs @ signs.T).double()) / 2  # agree - conflict = Σ s s
            for i in idx:
                counts[i] += deltas[i].numel()
        progress.advance()
    norms = dot.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cosine = torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.zeros_like(dot))
    conflict_rate = torch.where(both > 0, conflicts / both.clamp_min(1), torch.zeros_like(both))
    outliers = []
    if n >= 2:
        for i in range(n):
            others = [float(norms[j]) for j in range(n) if j != i]
            if float(norms[i]) > outlier_ratio * statistics.median(others):
                outliers.append(vectors[i].spec)
    return VectorStats(
        labels=[v.spec for v in vectors],
        norms=[float(x) for x in norms],
        cosine=cosine.tolist(),
        sign_conflict=conflict_rate.tolist(),
        outliers=outliers,
        outlier_ratio=outlier_ratio,
        params=counts,
    )
