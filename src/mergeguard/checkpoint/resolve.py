"""Turn what the user typed (a file, a folder, a Hub repo id) into an open Checkpoint."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from mergeguard.checkpoint.paths import PICKLE_SUFFIXES, check_source, parse_hub_id
from mergeguard.checkpoint.reader import Checkpoint, TensorInfo, from_tensors, read_header
from mergeguard.errors import MergeguardError, reason

ADAPTER_CONFIG = "adapter_config.json"
HUB_PATTERNS = ["*.safetensors", "*.json", "*.md"]
HUB_PICKLE_PATTERNS = [f"*{s}" for s in PICKLE_SUFFIXES]
def open_checkpoint(spec: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a `.safetensors` file, a folder (single file, shards + index, or LoRA adapter) or a Hub repo."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return _open_local(spec, path, allow_pickle=allow_pickle, provenance={"path": str(path.resolve())})
    check_source(spec)
    hub = parse_hub_id(spec)
    if hub is None:  # `open_clip:NAME@TAG`, which only the encoder loader takes
        raise MergeguardError(f"{spec} does not exist (neither a file nor a folder).")
    repo_id, revision = hub
    folder, commit = _hub_snapshot(spec, repo_id, revision, allow_pickle)
    provenance = {"hub": repo_id, "revision": revision or "main", "commit": commit}
    return _open_local(spec, folder, allow_pickle=allow_pickle, provenance=provenance)


_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's endpoint takes a connection within `timeout` seconds, asked once per process, so a
    machine without a network says so at once instead of after the Hub client's timeouts and retries (about
    30 s). HF_HUB_OFFLINE=1: no. Behind a proxy the endpoint is not dialled directly: assumed reachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in _PROXIES):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_snapshot(spec: str, repo_id: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str]:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = HUB_PATTERNS + (HUB_PICKLE_PATTERNS if allow_pickle else [])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                        local_files_only=not hub_reachable()))
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise MergeguardError(
                f"{spec} is not a local path and the Hub repo {repo_id} is not in the Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1; download it first "
                f"(`hf download {repo_id}`) or give a local path."
            ) from exc
        raise MergeguardError(
            f"{spec} is not a local path and the Hub could not be reached to download {repo_id}; "
            "check the network, or give a local path."
        ) from exc
    except GatedRepoError as exc:
        raise MergeguardError(f"the Hub repo {repo_id} is gated: log in with `hf auth login`.") from exc
    except RevisionNotFoundError as exc:
        raise MergeguardError(f"the Hub repo {repo_id} has no revision {revision!r}.") from exc
    except RepositoryNotFoundError as exc:
        raise MergeguardError(
            f"{spec} is neither a local path nor a Hub repo that exists (or you lack access)."
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise MergeguardError(f"could not download {repo_id} from the Hub: {exc}.") from exc
    return folder, folder.name


def _open_local(spec: str, path: Path, *, allow_pickle: bool, provenance: dict) -> Checkpoint:
    if path.is_dir():
        return _open_folder(spec, path, allow_pickle=allow_pickle, provenance=provenance)
    if path.suffix in PICKLE_SUFFIXES:
        return _open_pickle(spec, path, allow_pickle=allow_pickle, provenance=provenance)
    if path.suffix != ".safetensors":
        raise MergeguardError(
            f"{spec} is not a .safetensors file, a folder, or a pickle (.bin/.pt) file."
        )
    infos, metadata = read_header(path)
    return Checkpoint(spec, infos, metadata, [path], provenance)


def _open_folder(spec: str, folder: Path, *, allow_pickle: bool, provenance: dict) -> Checkpoint:
    adapter_cfg = folder / ADAPTER_CONFIG
    if adapter_cfg.exists():
        return _open_adapter(spec, folder, allow_pickle=allow_pickle, provenance=provenance)

    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = folder / "model.safetensors.index.json"
        return _open_sharded(spec, index if index in indexes else indexes[0], provenance)

    files = sorted(folder.glob("*.safetensors"))
    if (folder / "model.safetensors") in files:
        files = [folder / "model.safetensors"]
    if len(files) == 1:
        infos, metadata = read_header(files[0])
        return Checkpoint(spec, infos, metadata, files, provenance)
    if len(files) > 1:
        names = ", ".join(f.name for f in files[:5])
        raise MergeguardError(
            f"{spec} holds {len(files)} .safetensors files ({names}) but no "
            "model.safetensors.index.json; point at one file instead."
        )
    pickles = sorted(p for s in PICKLE_SUFFIXES for p in folder.glob(f"*{s}"))
    if len(pickles) == 1:
        return _open_pickle(spec, pickles[0], allow_pickle=allow_pickle, provenance=provenance)
    if pickles:
        raise MergeguardError(f"{spec} holds several pickle files and no safetensors; point at one file.")
    raise MergeguardError(f"{spec} contains no .safetensors checkpoint.")


def _open_sharded(spec: str, index: Path, provenance: dict) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeguardError(f"{index} is not a valid safetensors index (no weight_map).") from exc
    shard_names = list(dict.fromkeys(weight_map.values()))
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    files = []
    for shard in shard_names:
        path = index.parent / shard
        if not path.exists():
            raise MergeguardError(f"shard {shard} listed in {index} is missing.")
        shard_infos, shard_meta = read_header(path)
        metadata = metadata or shard_meta
        infos.update(shard_infos)
        files.append(path)
    missing = [k for k in weight_map if k not in infos]
    if missing:
        raise MergeguardError(
            f"{index} lists tensor {missing[0]!r} in {weight_map[missing[0]]}, but that shard lacks it."
        )
    return Checkpoint(spec, infos, metadata, files, provenance)


def _open_adapter(spec: str, folder: Path, *, allow_pickle: bool, provenance: dict) -> Checkpoint:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise MergeguardError(f"{folder / ADAPTER_CONFIG} is not valid JSON.") from exc
    weights = folder / "adapter_model.safetensors"
    if weights.exists():
        infos, metadata = read_header(weights)
        ckpt = Checkpoint(spec, infos, metadata, [weights], provenance)
    else:
        pickles = [folder / f"adapter_model{s}" for s in PICKLE_SUFFIXES]
        found = [p for p in pickles if p.exists()]
        if not found:
            raise MergeguardError(f"{spec} has {ADAPTER_CONFIG} but no adapter_model.safetensors.")
        ckpt = _open_pickle(spec, found[0], allow_pickle=allow_pickle, provenance=provenance)
    ckpt.adapter_config = config
    return ckpt


def _open_pickle(spec: str, path: Path, *, allow_pickle: bool, provenance: dict) -> Checkpoint:
    if not allow_pickle:
        raise MergeguardError(
            f"{path} is a pickle file, which can run code when loaded; convert it to safetensors, "
            "or pass --allow-pickle to load it with torch.load(weights_only=True)."
        )
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (pre-zip) format cannot be memory-mapped: read it whole
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unsafe or corrupt pickles
        raise MergeguardError(f"{path} could not be loaded safely with weights_only=True ({reason(exc)}).") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MergeguardError(f"{path} does not hold a state dict of tensors.")
    ckpt = from_tensors(spec, obj, provenance=provenance)
    ckpt.files = [path]  # digested for the provenance like any file
    return ckpt
