"""Defenses: remove backdoors from a merged model (LFPM; IBVS as the baseline it is compared with).

`defend.settings` (LFPM's settings) imports no torch; the other names are imported when first used.
"""

from mergeguard.lazy import lazy_exports

_WHERE = {
    "defend_ibvs": "ibvs", "LFPMConfig": "settings", "defend_lfpm": "lfpm", "defend_lfpm_scanned": "lfpm",
    "load_models": "outputs", "write_ibvs_outputs": "outputs", "write_lfpm_outputs": "outputs",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
