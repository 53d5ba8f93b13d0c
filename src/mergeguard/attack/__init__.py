"""Red-teaming: fine-tune a task vector clean or poisoned on the one trainer core.

Each attack is a settings class (`attack.settings`, no torch: the CLI's options come from it) and one
module with its strategy (`attack.base.Attack`); `ATTACKS` lists the strategies by the name
`mergeguard attack NAME` uses, `attack.settings.SETTINGS` their settings. Names are imported when first used.
"""

from mergeguard.lazy import lazy_exports

_WHERE = {
    "BadMerging": "badmerging", "BadNets": "badnets", "BadTV": "badtv", "Clean": "clean", "LoBAM": "lobam",
    "Attack": "base", "finetune": "base", "shadow_head": "base", "TrainSettings": "settings",
    "run_attack": "run", "train_attack": "run",
}
__all__ = sorted([*_WHERE, "ATTACKS"])
_lazy = lazy_exports(__name__, _WHERE)


def __getattr__(name: str):
    if name == "ATTACKS":
        return {cls.name: cls for cls in map(_lazy, ("Clean", "BadNets", "BadMerging", "LoBAM", "BadTV"))}
    return _lazy(name)
