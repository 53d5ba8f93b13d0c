"""What made an output: tool version, command, parameters, and a digest of every input.

Digests are sha256 of each input file (cached by path, size and mtime, so a file is
hashed once), or the Hub commit for inputs resolved from the Hub.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any

from mergeguard.cache import cache_dir
from mergeguard.checkpoint.reader import KIND_KEY, Checkpoint

PROVENANCE_KEY = "mergeguard.provenance"
VERSION_KEY = "mergeguard.version"
ARCH_KEY = "mergeguard.arch"
_CHUNK = 16 * 2**20
_lock = threading.Lock()


def _digest_cache_path() -> Path:
    return cache_dir() / "sha256.json"


def file_sha256(path: Path, *, fresh: bool = False) -> str:
    """sha256 of a file, remembered by (real path, size, mtime) in the cache folder; `fresh`: hashed anew
    whatever the cache says (a pin's check: a file rewritten with its old size and mtime is still caught)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _digest_cache_path()
    with _lock:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    if key in cache and not fresh:
        return cache[key]
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    digest = h.hexdigest()
    with _lock:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        cache[key] = digest
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only costs time
    return digest


def input_record(ckpt: Checkpoint, role: str) -> dict:
    """How an input is identified in an output's metadata."""
    record = {"role": role, "spec": ckpt.spec, "kind": ckpt.kind}
    if "hub" in ckpt.provenance:
        record.update(hub=ckpt.provenance["hub"], commit=ckpt.provenance["commit"])
    elif ckpt.files:
        record["sha256"] = {f.name: file_sha256(f) for f in ckpt.files}
    return record


def command_line() -> str:
    """The command as the user typed it (for the metadata and the model card)."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    return " ".join(argv)


def build_metadata(kind: str, provenance: dict, inherit_from: Checkpoint | None = None) -> dict[str, str]:
    """safetensors `__metadata__` for an output: kind, version, provenance, and the base's architecture."""
    from mergeguard import __version__

    meta = {
        KIND_KEY: kind,
        VERSION_KEY: __version__,
        PROVENANCE_KEY: json.dumps(
            {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **provenance},
            sort_keys=True,
        ),
    }
    if inherit_from is not None and ARCH_KEY in inherit_from.metadata:
        meta[ARCH_KEY] = inherit_from.metadata[ARCH_KEY]
    return meta


def model_card(title: str, provenance: dict, extra: str = "") -> str:
    """A README.md for a merged or defended model: what made it, from what."""
    from mergeguard import __version__

    lines = [f"# {title}", "", f"Written by mergeguard {__version__}.", ""]
    if provenance.get("command"):
        lines += ["```", provenance["command"], "```", ""]
    if provenance.get("method"):
        lines += [f"- method: `{provenance['method']}`"]
    for k, v in sorted((provenance.get("params") or {}).items()):
        lines.append(f"- {k}: `{v}`")
    if "seed" in provenance:
        lines.append(f"- seed: `{provenance['seed']}`")
    lines += ["", "## Inputs", "", "| role | input | weight | digest |", "|---|---|---|---|"]
    for rec in provenance.get("inputs", []):
        if "commit" in rec:
            digest = f"{rec['hub']}@{rec['commit']}"
        else:
            digest = ", ".join(f"{n}: sha256 {d[:16]}…" for n, d in rec.get("sha256", {}).items())
        lines.append(f"| {rec['role']} | `{rec['spec']}` | {rec.get('weight', '')} | {digest} |")
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def jsonable(value: Any) -> Any:
    """`value` with NaN/Inf as None, paths as strings and tuples as lists: what `json.dumps` writes as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
