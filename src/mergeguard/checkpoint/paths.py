"""Where outputs go, checked before any work and without torch: the folders above an output (created when
it is written, refused when a file stands in the way) and the rule that an output never replaces or lands
inside an input."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from mergeguard.errors import MergeguardError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_REPO_ID = re.compile(r"^(?:hf-hub:)?([A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@([\w.\-/]+))?$")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """`owner/name[@revision]` (optionally `hf-hub:`-prefixed) -> (repo_id, revision), else None."""
    m = _REPO_ID.match(spec)
    if not m:
        return None
    return m.group(1), m.group(2)


def check_source(spec: str) -> None:
    """One sentence for a checkpoint that is neither on disk nor a Hub id (`owner/name[@revision]`): what
    `open_checkpoint` would say, checked before a command loads anything. A spec that looks local (`./x`,
    `a.safetensors`, a first folder that exists) is never sent to the Hub. `open_clip:NAME@TAG` is the
    encoder loader's to judge."""
    if spec.startswith("open_clip:") or Path(spec).expanduser().exists():
        return
    looks_local = spec.startswith(("./", "../", "/", "~")) or spec.endswith((".safetensors", *PICKLE_SUFFIXES)) \
        or Path(spec.split("/")[0]).exists()
    if parse_hub_id(spec) is None or looks_local:
        raise MergeguardError(f"{spec} does not exist (neither a file nor a folder).")


def check_parents(out: str | Path) -> None:
    """One sentence when an output cannot get its folder: a file stands where one of its folders must be.
    Missing folders are fine: `make_parents` creates them when the output is written (one rule for every
    command, as `mkdir -p` would)."""
    out = Path(out).expanduser()
    for folder in out.parents:
        if folder.exists():
            if not folder.is_dir():
                raise MergeguardError(f"cannot write {out}: {folder} is a file, not a folder.")
            return


def make_parents(out: str | Path) -> None:
    """Create the missing folders above an output, when it is written (after `check_parents`)."""
    check_parents(out)
    Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)


def refuse_writing_over(out: str | Path, inputs, names: Sequence[str] | None = None, flag: str = "--out") -> None:
    """One sentence, before any work, when writing `out` would replace, delete or add to an input: `out` is
    one of an input's files or folders, a folder that holds one, or lies inside an input folder (even
    --overwrite never allows that).
    With `names` (the files a command writes into the folder `out`), only OUT/name for each is checked.
    `inputs`: Checkpoints (their files and local spec) or paths. `flag` names the option in the sentence."""
    root = Path(out).expanduser().resolve()
    targets = [root / name for name in names] if names is not None else [root]
    for item in inputs:
        paths = [Path(p) for p in getattr(item, "files", None) or []]
        spec = getattr(item, "spec", item)
        if spec is not None and Path(str(spec)).expanduser().exists():
            paths.append(Path(str(spec)))
        for path in paths:
            path = path.expanduser().resolve()
            for target in targets:
                holds = target == path or target in path.parents  # the output is the input, or a folder holding it
                within = path.is_dir() and path in target.parents  # the output lies inside an input folder
                if holds or (within and target.exists()):
                    raise MergeguardError(f"the output {out} would replace the input {spec}; choose another {flag}.")
                if within:
                    raise MergeguardError(f"the output {out} would be written inside the input folder {spec}; "
                                          f"choose another {flag}.")
