"""Pins: what `mergeguard lock` writes and `mergeguard gate` checks, so the checkpoint merged today is the one
reviewed last week.

A lock file (YAML) holds, for the base and each input, what it was resolved to and the sha256 of every file
read from it: the weights (every shard), and the JSON files beside them that the loaders read (a LoRA
adapter's config, a Hugging Face config, a shard index). A Hub input is pinned to the commit it resolved to,
and the gate opens that commit, not the branch.

```yaml
mergeguard_lock: 1
base:
  spec: openai/clip-vit-base-patch32@main
  hub: openai/clip-vit-base-patch32
  revision: main
  commit: 3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268
  files: {config.json: 5b8c…, model.safetensors: 1f4e…}
inputs:
- spec: tv/cars.safetensors               # a local path, relative to the lock file's folder
  files: {cars.safetensors: 9a0d…}
```
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergeguard.errors import MergeguardError
from mergeguard.yamlfile import read_yaml

LOCK_VERSION = 1


@dataclass(frozen=True)
class Pin:
    """One pinned checkpoint: what the user named (`spec`, a local path relative to the lock's folder), the Hub
    repo and commit it resolved to (None for a local one), and the sha256 of each file read, by its name inside
    the checkpoint's folder."""

    spec: str
    files: dict[str, str]
    hub: str | None = None
    revision: str | None = None
    commit: str | None = None

    def source(self, root: Path) -> str:
        """What to open: the pinned commit of a Hub repo, or the local path (relative to `root`)."""
        if self.hub is not None:
            return f"{self.hub}@{self.commit}"
        path = Path(self.spec).expanduser()
        return str(path if path.is_absolute() else root / path)

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec}
        if self.hub is not None:
            out.update(hub=self.hub, revision=self.revision, commit=self.commit)
        out["files"] = dict(sorted(self.files.items()))
        return out


def files_read(ckpt: Any) -> dict[str, Path]:
    """The files a checkpoint is read from, by name inside its folder: its weights (every shard) and the JSON
    files beside them that a loader may read (an adapter's config, a Hugging Face config, a shard index)."""
    files = [Path(f) for f in ckpt.files]
    folder = files[0].parent if files else None
    if folder is not None and (ckpt.provenance.get("hub") or Path(str(ckpt.provenance.get("path", ""))).is_dir()):
        files += sorted(folder.glob("*.json"))
    return {f.name: f for f in dict.fromkeys(files)}


def pin(spec: str, root: Path, *, allow_pickle: bool = False) -> Pin:
    """Resolve `spec` (a Hub id is downloaded, or read from the Hugging Face cache) and hash what it is read from.
    A local path is kept relative to `root` (the lock file's folder) when it lies below it."""
    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.checkpoint.provenance import file_sha256

    ckpt = open_checkpoint(spec, allow_pickle=allow_pickle)
    files = {name: file_sha256(path, fresh=True) for name, path in files_read(ckpt).items()}
    if not files:
        raise MergeguardError(f"{spec} is read from no file that can be pinned.")
    if "hub" in ckpt.provenance:
        p = ckpt.provenance
        return Pin(spec, files, hub=p["hub"], revision=p["revision"], commit=p["commit"])
    path = Path(spec).expanduser().resolve()
    try:
        shown = os.path.relpath(path, root.resolve()) if root.resolve() in path.parents else str(path)
    except ValueError:  # another drive
        shown = str(path)
    return Pin(shown, files)


def verify(p: Pin, root: Path, where: str, *, allow_pickle: bool = False) -> str:
    """Open a pinned checkpoint and check every file it is read from against its pin (hashed anew, not from the
    digest cache); one sentence naming the file when a byte differs, a file is missing or one was added. Returns
    what a command should be given to read exactly those bytes (`Pin.source`)."""
    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.checkpoint.provenance import file_sha256

    source = p.source(root)
    ckpt = open_checkpoint(source, allow_pickle=allow_pickle)
    now = files_read(ckpt)
    redo = "run `mergeguard lock` again if the change is intended"
    for name in sorted(set(p.files) | set(now)):
        if name not in now:
            raise MergeguardError(f"{p.spec}: {name} is pinned in {where} but is no longer there; {redo}.")
        if name not in p.files:
            raise MergeguardError(f"{p.spec}: {name} is read from it now but is not pinned in {where}; {redo}.")
        digest = file_sha256(now[name], fresh=True)
        if digest != p.files[name]:
            raise MergeguardError(f"{p.spec}: {now[name]} does not match its pin in {where} (sha256 "
                                  f"{p.files[name][:12]}… pinned, {digest[:12]}… now); {redo}.")
    return source


@dataclass(frozen=True)
class Lock:
    """A lock file's content: the base and the inputs, each pinned."""

    base: Pin
    inputs: tuple[Pin, ...]
    created: str = ""

    def to_yaml(self) -> str:
        data = {"mergeguard_lock": LOCK_VERSION, "created": self.created, "base": self.base.to_yaml(),
                "inputs": [p.to_yaml() for p in self.inputs]}
        return yaml.safe_dump(data, sort_keys=False)


def make_lock(base: str, inputs: list[str], out: Path, *, allow_pickle: bool = False,
              progress: Any = None) -> Lock:
    """Pin the base and every input (paths relative to `out`'s folder)."""
    root = out.expanduser().resolve().parent
    specs = [base, *inputs]
    if progress is not None:
        progress.stage("pinning (sha256 of every file read)", len(specs))
    pins = []
    for spec in specs:
        pins.append(pin(spec, root, allow_pickle=allow_pickle))
        if progress is not None:
            progress.advance()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return Lock(pins[0], tuple(pins[1:]), created)


def _pin_from(entry: Any, where: str) -> Pin:
    if not isinstance(entry, dict) or not isinstance(entry.get("spec"), str) \
            or not isinstance(entry.get("files"), dict) or not entry["files"]:
        raise MergeguardError(f"{where} is not a mergeguard lock file: each pin needs a 'spec' and its 'files'.")
    if any(not isinstance(v, str) or len(v) != 64 for v in entry["files"].values()):
        raise MergeguardError(f"{where}: the pin of {entry['spec']} has a file digest that is not a sha256.")
    if entry.get("hub") is not None and not isinstance(entry.get("commit"), str):
        raise MergeguardError(f"{where}: the pin of {entry['spec']} names a Hub repo but no commit.")
    return Pin(entry["spec"], {str(k): v for k, v in entry["files"].items()}, entry.get("hub"),
               entry.get("revision"), entry.get("commit"))


def read_lock(path: Path) -> Lock:
    """A lock file, checked: one sentence for anything that is not one."""
    data = read_yaml(path, "the lock file")
    if not isinstance(data, dict) or data.get("mergeguard_lock") != LOCK_VERSION:
        raise MergeguardError(f"{path} is not a mergeguard lock file (version {LOCK_VERSION}); write one with "
                              "`mergeguard lock`.")
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise MergeguardError(f"{path} pins no inputs.")
    return Lock(_pin_from(data.get("base"), str(path)), tuple(_pin_from(e, str(path)) for e in inputs),
                str(data.get("created", "")))
