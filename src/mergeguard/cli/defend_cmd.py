"""`mergeguard defend lfpm`: remove backdoors from a merged model with an anti-backdoor task vector.

    mergeguard defend lfpm --merged merged/ --base base/ --shadow shadow_images/ -o defended/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mergeguard.cli.options import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    RichProgress,
    SeedOpt,
    examples,
    handle_errors,
    out_console,
    show_table,
    write_json,
)
from mergeguard.errors import MergeguardError

EXAMPLES = [
    "mergeguard defend lfpm --merged merged/ --base base/ --shadow imagenet_10k/ -o defended/",
    "mergeguard defend lfpm --merged M --base B --shadow DIR -o OUT --epochs 20 --lr 1e-2 --path-points 4",
]

defend_app = typer.Typer(help="Remove backdoors from a merged model.", no_args_is_help=True)


def lfpm_command(
    merged: Annotated[str, typer.Option("--merged", help="The (possibly backdoored) merged model.")],
    base: Annotated[str, typer.Option("--base", help="The pre-trained model the merge started from.")],
    shadow: Annotated[Path, typer.Option("--shadow", help="A folder of unlabeled images (any task, any depth).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the shadow images.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Shadow images per step.")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of the anti-backdoor vector.")] = 1e-4,
    path_points: Annotated[int, typer.Option("--path-points", help="K points of the loss path integral.")] = 4,
    beta: Annotated[float, typer.Option("--beta", help="Weight of clean-feature preservation.")] = 1.0,
    rank: Annotated[int, typer.Option("--rank", help="Adversarial subspace rank (0: whole feature space).")] = 0,
    patch_fraction: Annotated[float, typer.Option(
        "--patch-fraction", help="Side of the mined patch as a fraction of the image side.")] = 0.1,
    patch_lr: Annotated[float, typer.Option("--patch-lr", help="Sign-ascent step of the mined patch.")] = 0.1,
    mine_steps: Annotated[int, typer.Option("--mine-steps", help="Patch ascent steps per training step.")] = 1,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    workers: Annotated[int, typer.Option("--workers", help="Data-loading worker processes.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace files in a non-empty OUT.")] = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """LFPM: optimise an anti-backdoor task vector in feature space on unlabeled images (no labels, no trigger)."""
    from mergeguard.checkpoint.provenance import model_card
    from mergeguard.data.folders import unlabeled_folder
    from mergeguard.defend import LFPMConfig, defend_lfpm
    from mergeguard.models.encoder import load_encoder, save_encoder

    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeguardError(f"{out} is not empty; choose another --out or pass --overwrite.")
    merged_enc = load_encoder(merged)
    base_enc = load_encoder(base)
    images = unlabeled_folder(shadow, merged_enc.image_size)
    cfg = LFPMConfig(epochs=epochs, batch_size=batch_size, lr=lr, path_points=path_points, beta=beta, rank=rank,
                     patch_fraction=patch_fraction, patch_lr=patch_lr, mine_steps=mine_steps, seed=seed, device=device,
                     workers=workers)
    with RichProgress(enabled=not quiet) as progress:
        defended, tau, report = defend_lfpm(merged_enc, base_enc, images, cfg, progress)
    provenance = {"defense": "lfpm", "merged": merged, "base": base, "shadow": str(shadow), "params": report["config"]}
    out.mkdir(parents=True, exist_ok=True)
    defended, merged_enc = defended.cpu(), merged_enc.cpu()
    save_encoder(defended, out / "model.safetensors", provenance)
    save_encoder(defended, out / "anti_backdoor_tv.safetensors", provenance, base=merged_enc)  # τa = θ − θm
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "README.md").write_text(model_card("Defended model (LFPM)", {**provenance, "method": "lfpm"}))
    report["out"] = str(out)
    write_json(json_out, report)
    if show_table(quiet, json_out):
        table = Table(title=f"LFPM → {out}", show_header=False)
        table.add_row("steps", str(report["steps"]))
        table.add_row("loss per epoch", ", ".join(f"{v:.4f}" for v in report["loss_per_epoch"]))
        lam = [report["lambda_eff_start"], report["lambda_eff_end"]]
        table.add_row("λ_eff start → end", " → ".join("-" if v is None else f"{v:.4g}" for v in lam))
        table.add_row("‖τa‖", f"{report['tau_norm']:.4g}")
        table.add_row("time", f"{report['seconds']:.1f} s ({report['images_per_second']:.0f} images/s)")
        out_console.print(table)


def register(app: typer.Typer) -> None:
    defend_app.command("lfpm", epilog=examples(*EXAMPLES))(handle_errors(lfpm_command))
    app.add_typer(defend_app, name="defend")
