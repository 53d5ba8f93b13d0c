"""Scan: find a backdoor without its trigger or labels (`core`: trigger inversion against θ0, the score,
attribution; `config`: its settings and verdicts, which import no torch). Names are imported when first used.
"""

_CONFIG = ("VERDICTS", "ScanConfig", "check_config", "verdict_of")


def __getattr__(name: str):
    import importlib

    module = importlib.import_module("mergeguard.scan.config" if name in _CONFIG else "mergeguard.scan.core")
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'mergeguard.scan' has no attribute {name!r}") from None
