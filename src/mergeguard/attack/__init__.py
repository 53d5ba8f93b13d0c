"""Red-teaming: fine-tune a task vector clean or poisoned on the one trainer core.

Each attack is one module with one class (its settings and its strategy, `attack.base.Attack`); `ATTACKS`
lists them by the name `mergeguard attack NAME` uses.
"""

from mergeguard.attack.badmerging import BadMerging
from mergeguard.attack.badnets import BadNets
from mergeguard.attack.badtv import BadTV
from mergeguard.attack.base import Attack, TrainSettings, finetune, shadow_head
from mergeguard.attack.clean import Clean
from mergeguard.attack.lobam import LoBAM
from mergeguard.attack.run import run_attack, train_attack

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (Clean, BadNets, BadMerging, LoBAM, BadTV)}

__all__ = ["ATTACKS", "Attack", "BadMerging", "BadNets", "BadTV", "Clean", "LoBAM", "TrainSettings", "finetune",
           "run_attack", "shadow_head", "train_attack"]
