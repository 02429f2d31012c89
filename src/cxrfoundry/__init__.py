"""CXR Foundry: a reproducible pipeline from public chest X-ray datasets to foundation models."""

__version__ = "0.1.0"
