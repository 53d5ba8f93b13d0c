"""What a defense reads and writes: its input models, and its output folder (model, the task vector it
added, arch.json, report.json, a model card; LFPM's mined prompts too).

The CLI and the demo write the same folder through these functions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mergeguard.checkpoint.provenance import input_record, jsonable, model_card
from mergeguard.checkpoint.resolve import open_checkpoint
from mergeguard.checkpoint.writer import write_tensors
from mergeguard.data.pictures import prompt_pictures
from mergeguard.defend.lfpm.report import LFPMReport
from mergeguard.models.encoder import ImageEncoder, load_encoder, save_encoder

LFPM_OUTPUTS = ("model.safetensors", "anti_backdoor_tv.safetensors", "prompts.safetensors", "arch.json",
                "report.json", "README.md")  # and prompt_<i>.png, one per mined mask or patch prompt
IBVS_OUTPUTS = ("model.safetensors", "ibvs_tv.safetensors", "arch.json", "report.json", "README.md")


def load_models(allow_pickle: bool = False, arch: str | None = None,
                **specs: str) -> tuple[list[ImageEncoder], list[dict], torch.dtype]:
    """The encoders of the given checkpoints (computed in float32), each one's record (role, spec, digest)
    for the outputs, and the first one's float dtype, by majority of its tensors (a defended model is saved
    in the merged model's)."""
    # open_clip:NAME@TAG comes from open_clip's own cache: no checkpoint file to record or take a dtype from
    ckpts = {role: spec if spec.startswith("open_clip:") else open_checkpoint(spec, allow_pickle=allow_pickle)
             for role, spec in specs.items()}
    first = next(iter(ckpts.values()))
    floats = Counter() if isinstance(first, str) else \
        Counter(first.info(k).dtype for k in first.keys() if first.info(k).dtype.is_floating_point)
    dtype = floats.most_common(1)[0][0] if floats else torch.float32
    records = [{"role": role, "spec": c} if isinstance(c, str) else input_record(c, role) for role, c in ckpts.items()]
    return [load_encoder(c, arch=arch, allow_pickle=allow_pickle) for c in ckpts.values()], records, dtype


def write_card(folder: Path, title: str, method: str, model: ImageEncoder, provenance: dict, report: dict,
               results: dict, files: str) -> None:
    """arch.json, report.json and the model card (README.md) of a defended model."""
    (folder / "arch.json").write_text(json.dumps(model.arch, indent=2) + "\n")
    (folder / "report.json").write_text(json.dumps(jsonable(report), indent=2) + "\n")
    lines = ["## Results", "", *(f"- {k}: {v}" for k, v in results.items()), "", files]
    (folder / "README.md").write_text(model_card(title, {**provenance, "method": method}, "\n".join(lines)))


def lfpm_results(report: dict[str, Any]) -> dict[str, Any]:
    """The model card's and the table's summary of an LFPM report."""
    lam_eff = [report["lambda_eff_start"], report["lambda_eff_end"]]
    out = {"λ_eff start → end": " → ".join("-" if v is None else f"{v:.4g}" for v in lam_eff),
           "‖τa‖": f"{report['tau_norm']:.4g}", "steps": report["steps"]}
    if "stopped" in report:  # the epochs it ran and why it stopped
        out["stopped"] = f"after {report['epochs_run']} epochs: {report['stopped']}"
    for name, c in report.get("chosen", {}).items():  # what LFPM set by itself, and why
        v = c["value"]
        shown = f"{v:.3g}" if isinstance(v, float) else ", ".join(map(str, v)) if isinstance(v, list) else str(v)
        out[f"{name} (chosen)"] = f"{shown}: {c['why']}"
    if report.get("drift") is not None:
        out["clean-feature drift"] = (f"{report['drift']:.1%} of the merge's own shift from θ0, on "
                                      f"{report['held_out_images']} held-out shadow images")
    return out


def write_lfpm_outputs(folder: Path, defended: ImageEncoder, merged: ImageEncoder, report: LFPMReport,
                       provenance: dict[str, Any], dtype: torch.dtype | None = None,
                       examples: torch.Tensor | None = None) -> None:
    """LFPM's output folder (`LFPM_OUTPUTS`): the defended model (in `dtype`, the merged model's), τa =
    defended − merged in float32, the prompts stage I mined (and one `prompt_<i>.png` per mask or patch prompt:
    mask, pattern, and pasted on `examples`, a few shadow images), arch.json, report.json and the model card."""
    defended, merged = defended.cpu(), merged.cpu()
    save_encoder(defended, folder / "model.safetensors", provenance, dtype=dtype)
    save_encoder(defended, folder / "anti_backdoor_tv.safetensors", provenance, base=merged)  # τa, float32
    write_tensors(folder / "prompts.safetensors", report.prompts, overwrite=True)
    prompt_pictures(folder, report.prompts, examples)
    data = report.to_json()
    write_card(folder, "Defended model (LFPM)", "lfpm", defended, provenance, data, lfpm_results(data),
               "`anti_backdoor_tv.safetensors` is τa, the anti-backdoor task vector (defended = merged + τa); "
               "`prompts.safetensors` holds the prompts stage I mined (`prompt_<i>.png` shows each: its mask, its "
               "pattern, and a few shadow images with it pasted); `report.json` has every number.")


def write_ibvs_outputs(folder: Path, defended: ImageEncoder, merged: ImageEncoder, report: dict[str, Any],
                       provenance: dict[str, Any], dtype: torch.dtype | None = None) -> None:
    """IBVS's output folder (`IBVS_OUTPUTS`)."""
    defended, merged = defended.cpu(), merged.cpu()
    save_encoder(defended, folder / "model.safetensors", provenance, dtype=dtype)
    save_encoder(defended, folder / "ibvs_tv.safetensors", provenance, base=merged)  # −λ (Vb − Vc)
    write_card(folder, "Defended model (IBVS)", "ibvs", defended, provenance, report,
               {"‖Vb − Vc‖": f"{report['vb_minus_vc_norm']:.4g}"},
               "`ibvs_tv.safetensors` is the task vector IBVS added, −λ (Vb − Vc) (defended = merged + it); "
               "`report.json` has every number.")
