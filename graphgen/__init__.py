"""graphgen: classic CNNs from the paper to a compiled library for an embedded board."""

__version__ = "0.1.0"

from graphgen.api import build, export, list_models, load_model  # noqa: E402

__all__ = ["build", "export", "list_models", "load_model", "__version__"]
