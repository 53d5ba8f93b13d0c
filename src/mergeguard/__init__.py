"""mergeguard: secure merged model checkpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergeguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from mergeguard.errors import MergeguardError

__all__ = ["MergeguardError", "__version__"]
