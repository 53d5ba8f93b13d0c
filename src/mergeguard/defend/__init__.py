"""Defenses: remove backdoors from a merged model (LFPM; IBVS as the baseline it is compared with).

`defend.lfpm` is LFPM's package (its `settings` and `report` import no torch); names are imported when first
used.
"""

from mergeguard.lazy import lazy_exports

_WHERE = {
    "defend_ibvs": "ibvs", "LFPMConfig": "lfpm.settings", "LFPMReport": "lfpm.report", "defend_lfpm": "lfpm.run",
    "defend_lfpm_scanned": "lfpm.scanned",
    "load_models": "outputs", "write_ibvs_outputs": "outputs", "write_lfpm_outputs": "outputs",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
