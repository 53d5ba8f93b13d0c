"""Defenses: remove backdoors from a merged model (LFPM; IBVS as the baseline it is compared with).

`defend.settings` (LFPM's settings) imports no torch; the other names are imported when first used.
"""

_WHERE = {
    "defend_ibvs": "ibvs", "LFPMConfig": "settings", "defend_lfpm": "lfpm", "defend_lfpm_scanned": "lfpm",
    "load_models": "outputs", "write_ibvs_outputs": "outputs", "write_lfpm_outputs": "outputs",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"mergeguard.defend.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mergeguard.defend' has no attribute {name!r}")
