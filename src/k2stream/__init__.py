"""k2stream: capture Binance trades completely and exactly once."""

from importlib.metadata import PackageNotFoundError, version


try:
    __version__ = version("k2stream")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
