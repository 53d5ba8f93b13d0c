"""Defenses: remove backdoors from a merged model (LFPM)."""

from mergeguard.defend.lfpm import LFPMConfig, defend_lfpm

__all__ = ["LFPMConfig", "defend_lfpm"]
