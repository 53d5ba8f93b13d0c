"""Red-teaming: fine-tune a task vector clean or poisoned (BadNets, BadMerging) on the trainer core."""

from mergeguard.attack.poison import KINDS, PoisonConfig, poison_finetune, run_attack

__all__ = ["KINDS", "PoisonConfig", "poison_finetune", "run_attack"]
