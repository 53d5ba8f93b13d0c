"""The streaming merge engine: one tensor name at a time, for any checkpoint `checkpoint/` yields.

For each float tensor of the base it reads that tensor from the base and from every
input, turns fine-tuned weights into deltas (task vectors are used as they are),
calls the method's per-tensor function and writes `base + merged delta`. Memory
stays near (inputs + 1) x the largest tensor. Methods that need whole-vector
statistics (TIES over the whole vector, LATA's layer cosines) get extra streaming
passes first. Non-float tensors (integer buffers) are copied from the base.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeguard.checkpoint import Checkpoint, CheckpointWriter, PlannedTensor
from mergeguard.checkpoint.paths import refuse_writing_over
from mergeguard.checkpoint.provenance import build_metadata, command_line, input_record, model_card
from mergeguard.checkpoint.tensors import check_finite, parse_dtype
from mergeguard.errors import MergeguardError
from mergeguard.merge.base import TensorContext
from mergeguard.merge.registry import MergeMethod, get_method
from mergeguard.progress import NullProgress, ProgressSink
from mergeguard.taskvec import check_inputs, delta_of


def _prefetched(names: Sequence[str], read: Callable[[str], Any]) -> Iterator[tuple[str, Any]]:
    """Yield (name, read(name)) while a background thread already reads the next name: disk reads
    (which release the GIL) overlap the merge arithmetic, at the cost of one more tensor set in memory."""
    if not names:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeguard-read") as pool:
        pending = pool.submit(read, names[0])
        for i, name in enumerate(names):
            data = pending.result()
            if i + 1 < len(names):
                pending = pool.submit(read, names[i + 1])
            yield name, data


@dataclass
class MergeResult:
    out: Path
    method: str
    params: dict[str, Any]
    tensors: int
    merged: int
    copied: int
    skipped: dict[str, int]
    extra: dict[str, int]
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)


def merge_checkpoints(
    base: Checkpoint,
    inputs: Sequence[Checkpoint],
    method: str | MergeMethod,
    params: dict[str, Any] | None = None,
    *,
    out: str | Path,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    dtype: str | None = "auto",
    shard_size: int | None = None,
    allow_missing: bool = False,
    reference: Checkpoint | None = None,
    overwrite: bool = False,
    progress: ProgressSink | None = None,
) -> MergeResult:
    """Merge `inputs` (fine-tuned checkpoints or task vectors) onto `base` with `method`, streaming."""
    start = time.perf_counter()
    progress = progress or NullProgress()
    method = get_method(method) if isinstance(method, str) else method
    if method.data:
        raise MergeguardError(f"{method.name} needs a model in memory and images, which the streaming engine "
                              f"does not hold: run it with `mergeguard merge --method {method.name} "
                              f"--{method.data.replace('_', '-')} ...` (`mergeguard.datamerge`).")
    params = method.resolve(params or {})
    weights = _checked_weights(method, inputs, weights, reference)
    out_dtype = parse_dtype(dtype)
    refuse_writing_over(out, [base, *inputs, *([reference] if reference is not None else [])])

    plan = check_inputs(base, inputs, allow_missing=allow_missing, reference=reference)
    weight_t = torch.tensor(weights, dtype=torch.float32)

    def passes() -> Iterator[tuple[str, list[torch.Tensor], list[int], torch.Tensor | None]]:
        progress.stage("analysing task vectors", len(plan.present))
        for name, idx in plan.present.items():
            base32 = base.get(name).float()
            deltas = [delta_of(inputs[i], name, base32) for i in idx]
            ref = delta_of(reference, name, base32) if reference is not None and name in reference else None
            yield name, deltas, idx, ref
            progress.advance()

    state = method.prepare(passes, len(inputs), params) if method.prepare else None

    provenance = {
        "command": command_line(),
        "method": method.name,
        "params": params,
        "seed": seed,
        "dtype": dtype or "auto",
        "inputs": [input_record(base, "base")]
        + [{**input_record(c, "input"), "weight": w} for c, w in zip(inputs, weights)]
        + ([input_record(reference, "reference")] if reference is not None else []),
    }
    metadata = build_metadata("model", provenance, inherit_from=base)
    layout = [
        PlannedTensor(name, out_dtype if (out_dtype and info.is_float) else info.dtype, info.shape)
        for name, info in base.infos.items()
    ]
    with CheckpointWriter(out, layout, metadata, shard_size=shard_size, overwrite=overwrite) as writer:
        progress.stage(f"merging ({method.name})", len(layout))

        def read(name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
            return base.get(name), [inputs[i].get(name) for i in plan.present.get(name, [])]

        for planned, (name, (tensor, raws)) in zip(layout, _prefetched([t.name for t in layout], read)):
            check_finite(tensor, name, f"the base {base.spec}")
            idx = plan.present.get(name)
            if idx:  # a float tensor with at least one input delta
                # the sum is formed in place: copy a tensor held in memory (a pickle) rather than change it
                base32 = tensor.float() if base.reads_fresh or tensor.dtype != torch.float32 else tensor.clone()
                deltas = [delta_of(inputs[i], name, base32, raw) for i, raw in zip(idx, raws)]
                ctx = TensorContext(name=name, inputs=idx, seed=seed, state=state)
                merged = method.fn(deltas, weight_t[idx], ctx, **params)
                tensor = base32.add_(merged)
            writer.write(name, tensor.to(planned.dtype))
            progress.advance()
        writer.extra_files["README.md"] = model_card(f"Merged model ({method.name})", provenance)
        writer.commit()

    return MergeResult(out=Path(out), method=method.name, params=params, tensors=len(layout),
                       merged=sum(1 for v in plan.present.values() if v), copied=len(plan.copied),
                       skipped=plan.skipped, extra=plan.extra, seconds=time.perf_counter() - start,
                       report=_state_report(state, inputs))


def _checked_weights(method: MergeMethod, inputs: Sequence[Checkpoint], weights: Sequence[float] | None,
                     reference: Checkpoint | None) -> list[float]:
    """One weight per input (1 each by default), and the inputs the method needs, or one sentence."""
    if not inputs:
        raise MergeguardError("give at least one input to merge.")
    weights = [1.0] * len(inputs) if weights is None or len(weights) == 0 else [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise MergeguardError("every --weight must be a finite number.")
    if len(weights) != len(inputs):
        raise MergeguardError(f"--weight was given {len(weights)} times for {len(inputs)} inputs.")
    if method.needs_reference and reference is None:
        raise MergeguardError(f"{method.name} needs a reference vector: pass --reference PATH.")
    if reference is not None and not method.needs_reference:
        raise MergeguardError(f"{method.name} takes no --reference.")
    if method.name == "average" and sum(weights) == 0:
        raise MergeguardError("average needs weights that do not sum to zero.")
    return weights


def _state_report(state: Any, inputs: Sequence[Checkpoint]) -> dict[str, Any]:
    """What a method's first pass learned, per input (LATA's layer cosines, TIES's vector-wide thresholds)."""
    report = {}
    if state and "cosines" in state:
        report["layer_cosines"] = {inputs[i].spec: c for i, c in state["cosines"].items()}
    if state and "thresholds" in state:
        report["trim_thresholds"] = {inputs[i].spec: t for i, t in enumerate(state["thresholds"])}
    return report
