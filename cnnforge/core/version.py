"""The package version, importable without the rest of cnnforge."""

__version__ = "0.1.0"
