"""Red-teaming: fine-tune a task vector clean or poisoned on the one trainer core.

Each attack is a settings class (`attack.settings`, no torch: the CLI's options come from it) and one
module with its strategy (`attack.base.Attack`); `ATTACKS` lists the strategies by the name
`mergeguard attack NAME` uses, `attack.settings.SETTINGS` their settings. Names are imported when first used.
"""

_WHERE = {
    "BadMerging": "badmerging", "BadNets": "badnets", "BadTV": "badtv", "Clean": "clean", "LoBAM": "lobam",
    "Attack": "base", "finetune": "base", "shadow_head": "base", "TrainSettings": "settings",
    "run_attack": "run", "train_attack": "run",
}
__all__ = sorted([*_WHERE, "ATTACKS"])


def __getattr__(name: str):
    import importlib

    if name == "ATTACKS":
        strategies = [__getattr__(n) for n in ("Clean", "BadNets", "BadMerging", "LoBAM", "BadTV")]
        return {cls.name: cls for cls in strategies}
    if name in _WHERE:
        return getattr(importlib.import_module(f"mergeguard.attack.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mergeguard.attack' has no attribute {name!r}")
