"""`mergeguard defend lfpm`: remove backdoors from a merged model with an anti-backdoor task vector.

    mergeguard defend lfpm --merged merged/ --base base/ --shadow shadow_images/ -o defended/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mergeguard.checkpoint.provenance import command_line
from mergeguard.checkpoint.writer import refuse_writing_over, staged_outputs
from mergeguard.cli.options import (
    AllowPickleOpt,
    ArchOpt,
    BaseOpt,
    BatchOpt,
    DeviceOpt,
    HeadsOpt,
    JsonOpt,
    MergedOpt,
    OutDirOpt,
    QuietOpt,
    RichProgress,
    ScaleOpt,
    SeedOpt,
    StepsOpt,
    TaskOpt,
    WorkersOpt,
    _jsonable,
    data_folders,
    err_console,
    examples,
    handle_errors,
    note_resume,
    out_console,
    require_empty,
    show_table,
    unfinished,
    write_json,
)

FEW_SHADOW = 1000  # the tiny zoo, clean merge, 3 seeds: 512 images cost 2.0-2.9 CA points, 2048 cost 1.3-1.8

EXAMPLES = [
    "mergeguard defend lfpm --merged merged/ --base base/ --shadow imagenet_10k/ -o defended/",
    "mergeguard defend lfpm --merged M --base B --shadow DIR -o OUT --epochs 20 --lr 1e-2 --path-points 4",
    "mergeguard defend lfpm --merged M --base B --shadow DIR -o OUT --resume    # after a killed run",
]

LFPM_OUTPUTS = ("model.safetensors", "anti_backdoor_tv.safetensors", "prompts.safetensors", "arch.json",
                "report.json", "README.md")
IBVS_OUTPUTS = ("model.safetensors", "ibvs_tv.safetensors", "arch.json", "report.json", "README.md")
IBVS_SETTINGS = ("steps", "lr", "weight_decay", "warmup", "batch_size", "logit_scale", "poison_fraction",
                 "trigger_area", "target_class", "seed")  # what its two fine-tunes use (the model card's list)

defend_app = typer.Typer(help="Remove backdoors from a merged model.", no_args_is_help=True)


def lfpm_command(
    merged: MergedOpt,
    base: BaseOpt,
    shadow: Annotated[Path, typer.Option(
        "--shadow", help="A folder of unlabeled images (any task, any depth); thousands of them.")],
    out: OutDirOpt,
    epochs: Annotated[int, typer.Option("--epochs", help=(
        "Passes over the shadow images; more of them win back clean accuracy (docs/lfpm.md, seventh round)."))] = 5,
    batch_size: BatchOpt = 128,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of the anti-backdoor vector.")] = 1e-4,
    path_points: Annotated[int, typer.Option("--path-points", help="K points of the loss path integral.")] = 4,
    beta: Annotated[float, typer.Option("--beta", help=(
        "Weight of clean-feature preservation: raise it if the defended model still loses too much accuracy "
        "after more --epochs, lower it if the trigger survives (docs/lfpm.md, sixth round)."))] = 1.0,
    rank: Annotated[int, typer.Option("--rank", help="Adversarial subspace rank (0: whole feature space).")] = 0,
    prompt: Annotated[str, typer.Option(
        "--prompt", help="Mined visual prompt: mask (pattern + soft mask, finds trigger-shaped backdoors), "
                         "patch (a square pasted at a random position) or tokens (VPT: learnable tokens "
                         "inserted after the class token).")] = "mask",
    prompt_tokens: Annotated[int, typer.Option(
        "--prompt-tokens", help="tokens: how many prompt tokens.")] = 4,
    prompts: Annotated[int, typer.Option("--prompts", help="Independently mined prompts, used in turn.")] = 4,
    mine_warmup: Annotated[int, typer.Option(
        "--mine-warmup", help="Ascent steps on each prompt before training (stage I).")] = 100,
    mask_penalty: Annotated[float, typer.Option(
        "--mask-penalty", help="mask: weight of the mask's area against the log excess reaction.")] = 10.0,
    reference: Annotated[float, typer.Option(
        "--reference", help="γ: suppress the reaction minus γ × θ0's reaction (1: the excess over θ0).")] = 1.0,
    adam_eps: Annotated[float, typer.Option(
        "--adam-eps", help="Adam's ε for τa's optimiser.")] = 1e-8,
    patch_fraction: Annotated[float, typer.Option(
        "--patch-fraction", help="patch: side of the patch as a fraction of the image side.")] = 0.1,
    patch_lr: Annotated[float, typer.Option("--patch-lr", help="Step of the prompt's ascent.")] = 0.1,
    mine_steps: Annotated[int, typer.Option("--mine-steps", help="Prompt ascent steps per training step.")] = 1,
    fresh_prompt_every: Annotated[int, typer.Option(
        "--fresh-prompt-every", help="Every E epochs, replace one prompt (in turn) by one mined anew from a random "
                                     "start, so a backdoor that returns late in a long run is found again "
                                     "(0: never; docs/lfpm.md).")] = 0,
    checkpoint_every: Annotated[int | None, typer.Option(
        "--checkpoint-every", help="Save the run's state to OUT/.partial every N steps (default: a tenth of the "
                                   "run).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue a killed run from OUT/.partial (same settings, same result).")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace files in a non-empty OUT.")] = False,
    arch: ArchOpt = None,
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """LFPM: optimise an anti-backdoor task vector in feature space on unlabeled images (no labels, no trigger)."""
    from mergeguard.checkpoint.writer import write_tensors
    from mergeguard.data.folders import unlabeled_folder
    from mergeguard.defend import LFPMConfig, defend_lfpm
    from mergeguard.models.encoder import save_encoder
    from mergeguard.trainer import distributed_rank, init_distributed

    partial = out / ".partial"
    refuse_writing_over(out, [merged, base, shadow], LFPM_OUTPUTS + (".partial",))
    note_resume(out, resume)
    if not (resume and unfinished(out)):
        require_empty(out, overwrite, resumable=True)
    (merged_enc, base_enc), inputs, dtype = load_inputs(allow_pickle, arch, merged=merged, base=base)
    images = unlabeled_folder(shadow, merged_enc.image_size)
    if len(images) < FEW_SHADOW and init_distributed()[0] == 0:  # once under torchrun (LFPM joins the group anyway)
        err_console.print(f"[yellow]warning:[/] only {len(images)} shadow images: with fewer than {FEW_SHADOW:,} the "
                          "clean-feature preservation fits them and the defended model loses more accuracy "
                          "(docs/lfpm.md; the paper uses 10,000).")
    cfg = LFPMConfig(epochs=epochs, batch_size=batch_size, lr=lr, path_points=path_points, beta=beta, rank=rank,
                     prompt=prompt, prompt_tokens=prompt_tokens, prompts=prompts, mine_warmup=mine_warmup,
                     mask_penalty=mask_penalty, reference=reference, adam_eps=adam_eps,
                     patch_fraction=patch_fraction, patch_lr=patch_lr, mine_steps=mine_steps,
                     fresh_prompt_every=fresh_prompt_every,
                     seed=seed, device=device, workers=workers, checkpoint_every=checkpoint_every)
    with RichProgress(enabled=not quiet) as progress:
        defended, tau, report = defend_lfpm(merged_enc, base_enc, images, cfg, progress,
                                            checkpoint=partial / "lfpm.pt", resume=resume)
    prompt_tensors = report.pop("prompt")
    if distributed_rank()[0] != 0:
        return  # under torchrun every process holds the same result; the first one writes it
    provenance = {"defense": "lfpm", "command": command_line(), "shadow": str(shadow), "shadow_images": len(images),
                  "inputs": inputs, "params": report["config"]}
    defended, merged_enc = defended.cpu(), merged_enc.cpu()
    lam_eff = [report["lambda_eff_start"], report["lambda_eff_end"]]
    results = {"λ_eff start → end": " → ".join("-" if v is None else f"{v:.4g}" for v in lam_eff),
               "‖τa‖": f"{report['tau_norm']:.4g}", "steps": report["steps"]}
    with staged_outputs(out) as stage:
        save_encoder(defended, stage / "model.safetensors", provenance, dtype=dtype)  # the merged model's dtype
        save_encoder(defended, stage / "anti_backdoor_tv.safetensors", provenance, base=merged_enc)  # τa, float32
        write_tensors(stage / "prompts.safetensors", prompt_tensors, overwrite=True)  # what stage I mined
        write_card(stage, "Defended model (LFPM)", "lfpm", defended, provenance, report, results,
                   "`anti_backdoor_tv.safetensors` is τa, the anti-backdoor task vector (defended = merged + τa); "
                   "`prompts.safetensors` holds the prompts stage I mined; `report.json` has every number.")
    report["out"] = str(out)
    write_json(json_out, report)
    if show_table(quiet, json_out):
        table = Table(title=f"LFPM → {out}", show_header=False)
        table.add_row("steps", str(report["steps"]))
        table.add_row("loss per epoch", ", ".join(f"{v:.4f}" for v in report["loss_per_epoch"]))
        table.add_row("λ_eff start → end", results["λ_eff start → end"])
        table.add_row("‖τa‖", f"{report['tau_norm']:.4g}")
        table.add_row("time", f"{report['seconds']:.1f} s ({report['images_per_second']:.0f} images/s)")
        out_console.print(table)


def ibvs_command(
    merged: MergedOpt,
    base: BaseOpt,
    data: Annotated[str, typer.Option("--data", help="train=DIR: labeled images of a task the defender has.")],
    heads: HeadsOpt,
    task: TaskOpt,
    out: OutDirOpt,
    lam: Annotated[float, typer.Option("--lam", help="λ in Δθm − λ (Vb − Vc).")] = 2.0,
    steps: StepsOpt = 2000,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate.")] = 1e-5,
    batch_size: BatchOpt = 128,
    logit_scale: ScaleOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace files in a non-empty OUT.")] = False,
    arch: ArchOpt = None,
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """IBVS: subtract λ × (the defender's own backdoored minus clean task vector) from the merge."""
    from mergeguard.attack import PoisonConfig
    from mergeguard.data.folders import labeled_folder
    from mergeguard.defend import defend_ibvs
    from mergeguard.models.encoder import save_encoder
    from mergeguard.models.heads import head_for, load_heads

    folder = data_folders([data], allowed=("train",))["train"]
    refuse_writing_over(out, [merged, base, heads, folder], IBVS_OUTPUTS + (".partial",))
    require_empty(out, overwrite)
    head = head_for(load_heads(heads), task, heads)
    (merged_enc, base_enc), inputs, dtype = load_inputs(allow_pickle, arch, merged=merged, base=base)
    dataset = labeled_folder(folder, head.classnames, base_enc.image_size)
    cfg = PoisonConfig(steps=steps, lr=lr, batch_size=batch_size, logit_scale=logit_scale, seed=seed, device=device)
    with RichProgress(enabled=not quiet) as progress:
        defended, report = defend_ibvs(merged_enc, base_enc, head, dataset, task, cfg, lam=lam,
                                       progress=progress)
    provenance = {"defense": "ibvs", "command": command_line(), "data": folder, "task": task, "inputs": inputs,
                  "params": {"lam": lam, **{k: v for k, v in report["config"].items() if k in IBVS_SETTINGS}}}
    with staged_outputs(out) as stage:
        save_encoder(defended, stage / "model.safetensors", provenance, dtype=dtype)
        save_encoder(defended, stage / "ibvs_tv.safetensors", provenance, base=merged_enc)  # −λ (Vb − Vc)
        write_card(stage, "Defended model (IBVS)", "ibvs", defended, provenance, report,
                   {"‖Vb − Vc‖": f"{report['vb_minus_vc_norm']:.4g}"},
                   "`ibvs_tv.safetensors` is the task vector IBVS added, −λ (Vb − Vc) (defended = merged + it); "
                   "`report.json` has every number.")
    report["out"] = str(out)
    write_json(json_out, report)
    if show_table(quiet, json_out):
        table = Table(title=f"IBVS → {out}", show_header=False)
        table.add_row("λ", f"{lam:g}")
        table.add_row("‖Vb − Vc‖", f"{report['vb_minus_vc_norm']:.4g}")
        out_console.print(table)


def load_inputs(allow_pickle: bool = False, arch: str | None = None, **specs: str) -> tuple[list, list[dict], Any]:
    """The encoders of the given checkpoints (computed in float32), each one's record (role, spec, digest)
    for the outputs, and the first one's float dtype (the defended model is saved in the merged model's)."""
    from collections import Counter

    import torch

    from mergeguard.checkpoint.provenance import input_record
    from mergeguard.checkpoint.resolve import open_checkpoint
    from mergeguard.models.encoder import load_encoder

    # open_clip:NAME@TAG comes from open_clip's own cache: no checkpoint file to record or take a dtype from
    ckpts = {role: spec if spec.startswith("open_clip:") else open_checkpoint(spec, allow_pickle=allow_pickle)
             for role, spec in specs.items()}
    first = next(iter(ckpts.values()))
    floats = Counter() if isinstance(first, str) else \
        Counter(first.info(k).dtype for k in first.keys() if first.info(k).dtype.is_floating_point)
    dtype = floats.most_common(1)[0][0] if floats else torch.float32
    records = [{"role": role, "spec": c} if isinstance(c, str) else input_record(c, role) for role, c in ckpts.items()]
    return [load_encoder(c, arch=arch, allow_pickle=allow_pickle) for c in ckpts.values()], records, dtype


def write_card(stage: Path, title: str, method: str, model, provenance: dict, report: dict, results: dict,
               files: str) -> None:
    """arch.json, report.json and the model card (README.md) of a defended model."""
    from mergeguard.checkpoint.provenance import model_card

    (stage / "arch.json").write_text(json.dumps(model.arch, indent=2) + "\n")
    (stage / "report.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    lines = ["## Results", "", *(f"- {k}: {v}" for k, v in results.items()), "", files]
    (stage / "README.md").write_text(model_card(title, {**provenance, "method": method}, "\n".join(lines)))


def register(app: typer.Typer) -> None:
    defend_app.command("lfpm", epilog=examples(*EXAMPLES))(handle_errors(lfpm_command))
    defend_app.command("ibvs", epilog=examples(
        "mergeguard defend ibvs --merged M --base B --data train=data/cars/train --heads H --task cars -o OUT/"))(
        handle_errors(ibvs_command))
    app.add_typer(defend_app, name="defend")
