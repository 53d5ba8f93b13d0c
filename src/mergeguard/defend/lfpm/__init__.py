"""LFPM, an anti-backdoor task vector optimised in feature space (docs/lfpm.md):

- `settings.py`: `LFPMConfig`, every setting declared once (no torch); what `--heads` gives its scan;
- `prompts.py`: the visual prompts mined against the merge (mask, patch, tokens);
- `run.py`: `LFPMRun`, one run's state and steps; `defend_lfpm`, the run from start to report;
- `report.py`: `LFPMReport`, what a run reports (no torch);
- `scanned.py`: `defend_lfpm_scanned`, LFPM started, stopped and checked by the scan (`defend lfpm --heads`).

Names are imported when first used.
"""

from mergeguard.lazy import lazy_exports

_WHERE = {
    "LFPMConfig": "settings", "PROMPTS": "settings", "LFPMReport": "report", "LFPMRun": "run",
    "defend_lfpm": "run", "defend_lfpm_scanned": "scanned", "restore_decision": "scanned",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
