"""Where mergeguard keeps what it can rebuild: input digests, the tiny zoo."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder: $MERGEGUARD_CACHE, else $XDG_CACHE_HOME/mergeguard, else ~/.cache/mergeguard."""
    explicit = os.environ.get("MERGEGUARD_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "mergeguard"
