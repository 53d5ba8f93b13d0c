"""`merge --method regmean | adamerging`: the merges that need a model in memory and images (`mergeguard.datamerge`),
run from the merge command once its flags are checked: the inputs as models, the images of each task, the
merged tower written with what the method learned (metadata and model card)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from mergeguard.cli._output import RichProgress, out_console, show_table, write_json
from mergeguard.errors import MergeguardError


def _images(folder: str, size: int, limit: int | None, seed: int) -> Any:
    """The unlabeled images of a folder (a seeded random `limit` of them) as one tensor."""
    import torch
    from torch.utils.data import Subset

    from mergeguard.data import stack_images
    from mergeguard.data.folders import unlabeled_folder

    dataset = unlabeled_folder(folder, size)
    if limit is not None and len(dataset) > limit:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
        dataset = Subset(dataset, order.tolist())
    return stack_images(dataset)


def _card_extra(name: str, report: dict[str, Any], inputs: list[str]) -> str:
    if name != "adamerging":
        return f"RegMean solved {len(report['solved'])} linear maps (alpha {report['alpha']:g}); every other " \
               "tensor is the weighted mean of the inputs."
    lines = ["## What AdaMerging learned", "",
             f"Entropy {report['entropy_first']:.4f} → {report['entropy_last']:.4f} in {report['steps']} steps.",
             "", "| tensor | " + " | ".join(f"λ {Path(i).name}" for i in inputs) + " |",
             "|---|" + "---|" * len(inputs)]
    lines += [f"| `{t}` | " + " | ".join(f"{v:.3f}" for v in lams) + " |" for t, lams in report["lambdas"].items()]
    lines += ["| **mean** | " + " | ".join(f"{v:.3f}" for v in report["lambda_mean_per_input"]) + " |"]
    return "\n".join(lines)


def data_merge(method: Any, params: dict[str, Any], settings: dict[str, Any], heads: str | None,
               folders: dict[str, str], *, allow_pickle: bool, overwrite: bool, json_out: str | None,
               quiet: bool) -> None:
    """Run RegMean or AdaMerging and write OUT (a folder, or a .safetensors file), nothing until it is done."""
    from mergeguard import datamerge
    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.checkpoint.paths import make_parents, refuse_writing_over
    from mergeguard.checkpoint.provenance import command_line, input_record, model_card
    from mergeguard.checkpoint.writer import staged_outputs
    from mergeguard.models.encoder import load_encoder, save_encoder
    from mergeguard.models.heads import head_for, load_heads
    from mergeguard.scan.core import model_of
    from mergeguard.trainer import resolve_device

    out = Path(settings["out"])
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise MergeguardError(f"{out} exists; choose another --out or pass --overwrite.")
    weights = [float(w) for w in settings["weight"]]
    if any(w <= 0 for w in weights):
        raise MergeguardError(f"{method.name} takes positive weights (a task it subtracts has no images to fit).")
    head_map = load_heads(heads) if heads else None
    task_heads = [head_for(head_map, name, heads) for name in folders] if head_map is not None else []
    base_ckpt = open_checkpoint(settings["base"], allow_pickle=allow_pickle)
    srcs = [open_checkpoint(s, allow_pickle=allow_pickle) for s in settings["inputs"]]
    refuse_writing_over(out, [base_ckpt, *srcs])
    base = load_encoder(base_ckpt)
    seed = int(settings.get("seed", 0))
    limit = params.get("images")
    images = [_images(folder, base.image_size, limit, seed) for folder in folders.values()]
    device = resolve_device(params["device"])
    with RichProgress(enabled=not quiet) as progress, tempfile.TemporaryDirectory(prefix="mergeguard-") as tmp:
        models = [model_of(base_ckpt, s, 1.0, None, Path(tmp)) for s in srcs]
        if method.name == "regmean":
            result = datamerge.regmean(base, models, images, weights, alpha=params["alpha"],
                                       batch_size=params["batch_size"], device=device, progress=progress)
        else:
            result = datamerge.adamerging(base, models, task_heads, images, weights, steps=params["steps"],
                                          lr=params["lr"], init_lam=params["init_lam"],
                                          batch_size=params["batch_size"], device=device, seed=seed,
                                          progress=progress)
    provenance = {"command": command_line(), "method": method.name, "params": params, "seed": seed,
                  "tasks": folders, "learned": result.report,
                  "inputs": [input_record(base_ckpt, "base")]
                  + [{**input_record(c, "input"), "weight": w} for c, w in zip(srcs, weights)]}
    card = model_card(f"Merged model ({method.name})", provenance, _card_extra(method.name, result.report,
                                                                               settings["inputs"]))
    if out.suffix == ".safetensors":
        make_parents(out)
        save_encoder(result.encoder, out, provenance)
    else:
        with staged_outputs(out) as stage:
            save_encoder(result.encoder, stage / "model.safetensors", provenance)
            (stage / "README.md").write_text(card)
    payload = {"out": str(out), "method": method.name, "params": params, "inputs": settings["inputs"],
               "weights": weights, "tasks": folders, "seconds": round(result.seconds, 3), "learned": result.report}
    write_json(json_out, payload)
    if show_table(quiet, json_out):
        table = Table(title=f"merged with {method.name}", show_header=False)
        table.add_row("output", str(out))
        table.add_row("parameters", ", ".join(f"{k}={v}" for k, v in params.items()))
        table.add_row("inputs", str(len(srcs)))
        if method.name == "adamerging":
            table.add_row("entropy", f"{result.report['entropy_first']:.4f} → {result.report['entropy_last']:.4f}")
            table.add_row("mean λ per input", ", ".join(f"{v:.3f}" for v in result.report["lambda_mean_per_input"]))
        table.add_row("time", f"{result.seconds:.1f} s")
        out_console.print(table)
