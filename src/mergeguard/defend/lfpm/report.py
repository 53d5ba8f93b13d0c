"""What an LFPM run reports (`LFPMReport`), written in one place for a run that trained and one that stopped
before training. Imports no torch: the prompts it carries are an artefact field, never part of `to_json()`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class LFPMReport:
    config: dict[str, Any]  # the settings it ran with (`LFPMConfig`, as a dict)
    chosen: dict[str, dict[str, Any]]  # the settings LFPM derived from the inputs: {name: {value, why}}
    steps: int = 0
    epochs_run: int = 0
    stopped: str = ""  # why it stopped
    resumed_at_step: int = 0  # 0: one uninterrupted run; `seconds` counts this process only
    loss_per_epoch: list[float] = field(default_factory=list)
    mined_excess_start: list[float] | None = None  # E‖D‖² of each prompt after stage I
    mined_excess_end: list[float] = field(default_factory=list)  # the final prompts' excess on the defended model
    fresh_prompts: int = 0  # prompts mined anew during stage II
    prompt_area: list[float | None] = field(default_factory=list)
    lambda_eff_start: float | None = None
    lambda_eff_end: float | None = None
    drift: float | None = 0.0  # clean-feature drift on the held-out shadow images, relative to the merge's shift
    drift_per_epoch: list[float | None] = field(default_factory=list)  # after each epoch but the last
    held_out_images: int = 0
    restored_directions: int = 0  # 1: clean features kept as θ0's along one direction
    tau_norm: float = 0.0
    idle_steps: int = 0  # steps with nothing to remove, which left τa as it was
    seconds: float = 0.0
    images_per_second: float = 0.0
    peak_gpu_memory_bytes: int | None = None
    peak_rss_bytes: int | None = None
    scan: dict[str, Any] | None = None  # with the scan (`defend lfpm --heads`): its result before and after
    prompts: dict[str, Any] = field(default_factory=dict, repr=False)  # the prompts as tensors ("<i>.mask", ...)

    def to_json(self) -> dict[str, Any]:
        """The report as report.json and `--json` hold it (no tensors; "scan" only when there was one)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("prompts", "scan")}
        if self.scan is not None:
            out["scan"] = self.scan
        return out
