"""graphgen: classic CNNs from the paper to a compiled library for an embedded board."""

__version__ = "0.1.0"
