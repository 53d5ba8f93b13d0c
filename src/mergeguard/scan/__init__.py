"""Scan: find a backdoor without its trigger or labels (`core`: trigger inversion against θ0, the score,
attribution; `config`: its settings and verdicts, which import no torch). Names are imported when first used.
"""

from mergeguard.lazy import lazy_exports

_CONFIG = ("VERDICTS", "ScanConfig", "check_config", "check_fail_on", "reaches", "verdict_of")
__getattr__ = lazy_exports(__name__, dict.fromkeys(_CONFIG, "config"), default="core")
