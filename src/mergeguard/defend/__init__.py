"""Defenses: remove backdoors from a merged model (LFPM; IBVS as the baseline it is compared with)."""

from mergeguard.defend.ibvs import defend_ibvs
from mergeguard.defend.lfpm import LFPMConfig, defend_lfpm, defend_lfpm_scanned
from mergeguard.defend.outputs import load_models, write_ibvs_outputs, write_lfpm_outputs

__all__ = ["LFPMConfig", "defend_ibvs", "defend_lfpm", "defend_lfpm_scanned", "load_models",
           "write_ibvs_outputs", "write_lfpm_outputs"]
