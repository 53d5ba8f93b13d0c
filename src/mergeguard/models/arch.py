"""Architecture descriptions: the small JSON that turns a bare state dict into a runnable encoder.

Every model mergeguard writes carries one in its safetensors metadata (`mergeguard.arch`),
copied from its base, so any later command can take the file alone.

```json
{"family": "open_clip", "name": "ViT-B-32", "embed_dim": 512,
 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
 "quick_gelu": true, "mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]}
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergeguard.checkpoint import Checkpoint
from mergeguard.checkpoint.provenance import ARCH_KEY
from mergeguard.errors import MergeguardError

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
# open_clip's OpenAI-pretrained ViTs use QuickGELU; the plain names default to GELU.
QUICK_GELU_NAMES = ("ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu")


def arch_from_name(name: str, *, quick_gelu: bool | None = None) -> dict[str, Any]:
    """The description of an open_clip model by name (e.g. ViT-B-32)."""
    import open_clip

    cfg = _hub_model_config(name) if name.startswith("hf-hub:") else open_clip.get_model_config(name)
    if cfg is None or "vision_cfg" not in cfg:
        raise MergeguardError(
            f"unknown open_clip architecture {name!r}; see open_clip.list_models(), or pass an arch JSON file."
        )
    return {
        "family": "open_clip",
        "name": name,
        "embed_dim": cfg["embed_dim"],
        "vision_cfg": dict(cfg["vision_cfg"]),
        "text_cfg": dict(cfg.get("text_cfg", {})),
        "quick_gelu": bool(cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu,
        "mean": OPENAI_MEAN,
        "std": OPENAI_STD,
    }


def _hub_model_config(name: str) -> dict[str, Any] | None:
    """The model config of an open_clip model on the Hub (`hf-hub:org/repo`), through the Hub cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(name.removeprefix("hf-hub:"), "open_clip_config.json")
        return json.loads(Path(path).read_text())["model_cfg"]
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, KeyError, ValueError) as exc:
        raise MergeguardError(f"cannot read the open_clip config of {name} from the Hub or its cache: {exc}") from exc


def arch_from_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """The description of a Hugging Face CLIPVisionModel / CLIPModel from its config.json."""
    vision = config.get("vision_config", config)
    width = vision["hidden_size"]
    heads = vision["num_attention_heads"]
    return {
        "family": "open_clip",
        "name": config.get("_name_or_path") or "hf-clip",
        "embed_dim": config.get("projection_dim", vision.get("projection_dim", width)),
        "vision_cfg": {
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
            "width": width,
            "layers": vision["num_hidden_layers"],
            "head_width": width // heads,
            "mlp_ratio": vision["intermediate_size"] / width,
        },
        "quick_gelu": vision.get("hidden_act", "quick_gelu") == "quick_gelu",
        "mean": OPENAI_MEAN,
        "std": OPENAI_STD,
        "hf": True,
    }


def load_arch_arg(arch: str) -> dict[str, Any]:
    """`--arch`: an open_clip name, or a path to an architecture JSON file."""
    path = Path(arch)
    if path.suffix == ".json" or path.exists():
        try:
            description = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise MergeguardError(f"cannot read the architecture file {arch}: {exc}.") from exc
        if not (isinstance(description, dict) and isinstance(description.get("vision_cfg"), dict)):
            raise MergeguardError(f"{arch} is not an architecture JSON (an object with a 'vision_cfg', as a "
                                  "checkpoint's arch.json holds).")
        return description
    return arch_from_name(arch)


def arch_of(ckpt: Checkpoint, arch: str | dict | None = None) -> dict[str, Any]:
    """The architecture of a checkpoint: `--arch` if given, else its metadata, else an HF config.json beside it."""
    if isinstance(arch, dict):
        return arch
    if arch:
        return load_arch_arg(arch)
    if ARCH_KEY in ckpt.metadata:
        return json.loads(ckpt.metadata[ARCH_KEY])
    for folder in {f.parent for f in ckpt.files}:
        cfg = folder / "config.json"
        if cfg.exists():
            try:
                return arch_from_hf_config(json.loads(cfg.read_text()))
            except (KeyError, ValueError):
                pass
    raise MergeguardError(
        f"{ckpt.spec} does not say which architecture it is; pass --arch (an open_clip name such as "
        "ViT-B-32, or an architecture JSON file)."
    )


def arch_json(arch: dict[str, Any]) -> str:
    return json.dumps(arch, sort_keys=True)
