"""LFPM guided and checked by the scan (`defend lfpm --heads`): the scan of the merged model decides whether LFPM
runs, its recovered triggers start LFPM's prompts, and the defended model is scanned again. With `restore`, the
clean features along the most suspicious trigger's direction are preserved as θ0's (`restore_decision`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mergeguard.data import stack_images
from mergeguard.data.triggers import Trigger
from mergeguard.defend.lfpm.run import choose, defend_lfpm, keep_base_along, unchanged
from mergeguard.defend.lfpm.settings import LFPMConfig
from mergeguard.models.encoder import ImageEncoder
from mergeguard.models.heads import Head
from mergeguard.progress import ProgressSink
from mergeguard.scan import Scanner


def trigger_direction(merged: ImageEncoder, base: ImageEncoder, images: torch.Tensor,
                      apply: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The unit feature direction a trigger moves the merge's features in, beyond θ0's reaction to it: the mean
    of (f_θm(x⊕t) − f_θm(x)) − (f_θ0(x⊕t) − f_θ0(x)) over `images`, normalised (fp32)."""
    total, dev = None, next(merged.parameters()).device
    for chunk in images.split(256):
        chunk = chunk.to(dev)
        xp = apply(chunk)
        excess = ((merged(xp) - merged(chunk)) - (base(xp) - base(chunk))).float().sum(0)
        total = excess if total is None else total + excess
    return total / total.norm().clamp_min(1e-12)


def restore_decision(merged: ImageEncoder, base: ImageEncoder, images: torch.Tensor, trigger: Trigger,
                     head: Head) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Whether to give the merge's move along the trigger's direction back to θ0, decided on the shadow images
    under the suspected target's head: yes when θ0's component there sends fewer of them to the target class
    than the merge's does (the move was towards the target: a poisoned vector's confusion), no otherwise (the
    move carries the task's own learning, as when the poisoned vector is the target task's). Returns
    (direction or None, {value, why})."""
    with torch.no_grad():
        direction = trigger_direction(merged, base, images, trigger.apply)
        dev = direction.device
        hits_m = hits_r = 0  # shadow images sent to the target: by the merge's features, by the restored ones
        for chunk in images.split(256):
            chunk = chunk.to(dev)
            f_m, f_0 = merged(chunk).float(), base(chunk).float()
            hits_m += int((head.logits(f_m).argmax(1) == trigger.target_class).sum())
            hits_r += int((head.logits(keep_base_along(f_m, f_0, direction)).argmax(1) == trigger.target_class).sum())
    share_m, share_r = hits_m / len(images), hits_r / len(images)
    name = f"{trigger.target_task}:{trigger.target_class}"
    if share_r < share_m:
        return direction, {"value": name, "why": f"the scan's most suspicious target; along its trigger's direction "
                                                 f"the clean features are kept as θ0's: that sends {share_r:.1%} of "
                                                 f"the shadow images to it, the merge's {share_m:.1%}"}
    return None, {"value": None, "why": f"not restored: along the direction of {name}'s trigger θ0's features would "
                                        f"send {share_r:.1%} of the shadow images to it, not fewer than the merge's "
                                        f"{share_m:.1%}"}


def defend_lfpm_scanned(merged: ImageEncoder, base: ImageEncoder, shadow: Dataset, cfg: LFPMConfig,
                        heads: dict[str, Head], progress: ProgressSink | None = None, *,
                        checkpoint: Path | None = None, resume: bool = False) -> tuple[ImageEncoder, dict, Any]:
    """LFPM guided and checked by the scan (the user's heads, `cfg.scan`'s settings): the merged model is scanned
    first, the triggers it recovered for the `cfg.prompts` most suspicious targets join LFPM's mined prompts (as
    fixed prompts), and the defended model is scanned again; the report's `scan` holds both and `chosen` the
    added prompts."""
    scan_cfg = cfg.scan
    images = stack_images(shadow, cfg.workers)  # decoded once, for the scan and for LFPM
    scanner = Scanner(base, images, heads, scan_cfg, progress)
    before = scanner.scan(merged, "the merged model")
    # the targets the scan finds suspicious on their own (log area ratio over its `suspicious` threshold, which
    # was calibrated on clean vectors), the most suspicious first, as many as mined prompts
    ranked = before.suspects
    suspects = [t for r, t in ranked if r >= scan_cfg.suspicious][: cfg.prompts] if cfg.prompt == "mask" else []
    largest = ranked[0][0] if ranked else float("-inf")
    if largest < scan_cfg.suspicious and not cfg.force:  # the scan finds nothing to remove: stop before training
        why = (f"the scan finds no suspicious target in the merged model (largest log area ratio {largest:.2f} < "
               f"{scan_cfg.suspicious:g}): nothing to remove, the merge is returned unchanged (--force runs anyway)")
        defended, tau, report = unchanged(merged, cfg, choose(cfg, merged, base), why)
        after = before
    else:
        direction, restored = None, None
        if cfg.restore and suspects:
            direction, restored = restore_decision(merged.to(scanner.dev), base.to(scanner.dev), images, suspects[0],
                                                   heads[suspects[0].target_task])
        defended, tau, report = defend_lfpm(merged, base, images, cfg, progress, checkpoint=checkpoint,
                                            resume=resume, starts=[(t.mask, t.pattern) for t in suspects],
                                            restore=direction)
        if restored:
            report.chosen["restore"] = restored
        after = scanner.scan(defended, "the defended model")
    if cfg.prompt == "mask":
        report.chosen["scan_prompts"] = _scan_prompts(suspects, scan_cfg.suspicious, largest)
    report.scan = {"before": before.summary(), "after": after.summary(), "config": scanner.report_config()}
    return defended, tau, report


def _scan_prompts(suspects: list[Trigger], threshold: float, largest: float) -> dict[str, Any]:
    """The report's word on the prompts the scan added: which, and why."""
    if suspects:
        return {"value": [f"{t.target_task}:{t.target_class}" for t in suspects],
                "why": "the triggers the scan recovered from the merged model whose log area ratio reached the "
                       f"scan's suspicious threshold {threshold:g}, most suspicious first"}
    return {"value": [], "why": f"no target of the merged model reached the scan's suspicious threshold "
                                f"{threshold:g} (largest log area ratio {largest:.2f})"}
