"""XO: offload live TCP (and kernel TLS) connections from a frontend to backends and back."""

__version__ = "0.1.0"
