"""edgestream's shared library: the worker protocol, media helpers and client SDKs."""

__version__ = "0.1.0"
