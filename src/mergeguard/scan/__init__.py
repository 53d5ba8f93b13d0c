"""Scan: find a backdoor without its trigger or labels (`core`: trigger inversion against θ0, the score,
attribution; `config`: its settings and verdicts, which import no torch). Names are imported when first used.
"""

from mergeguard.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, dict.fromkeys(("VERDICTS", "ScanConfig", "check_config", "verdict_of"),
                                                   "config"), default="core")
