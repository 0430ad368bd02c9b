"""ringfence host agent: transparent, identity-aware interception of protected ports."""

__version__ = "0.1.0"
