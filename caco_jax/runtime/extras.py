"""Optional dependencies: import one, or fail with one line naming the pip extra that brings it."""

from __future__ import annotations

import importlib

# extra -> what it is for, as the error says it
EXTRAS = {
    "torch": "reading and writing PyTorch weights",
    "earthengine": "downloading Sentinel-2 images from Earth Engine",
    "sampling": "sampling locations near the world's most populous cities",
    "cloud": "gs:// workdirs",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(module: str, extra: str):
    """``importlib.import_module(module)``, or MissingExtraError naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise MissingExtraError(
            f"{EXTRAS[extra]} needs {package}, which is not installed: pip install "
            f"'caco_jax[{extra}]' (in a checkout: pip install -r requirements-{extra}.txt)"
        ) from error
