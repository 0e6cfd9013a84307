"""repro-merge: reproducible, streaming rebuild of the Chinese-LLaMA/Alpaca full weights."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("repro-merge")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
