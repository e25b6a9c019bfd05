"""sdrt's runtime: models, checkpoint loading, tokenizer, samplers, pipeline and CLI.

``Pipeline`` is imported on first use (PEP 562), not with the package: it brings torch, and
the CLI checks its arguments before paying for that (about 1.5 s and 350 MB).
"""
import importlib

from .errors import SdrtError

# The version when sdrt is not installed (run from a source tree); the CLI's --version prefers
# the installed distribution's metadata.
__version__ = "0.1.0"
__all__ = ["Pipeline", "SdrtError"]

_LAZY = {"Pipeline": ".pipeline"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
