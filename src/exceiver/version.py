"""The package version (its own module, so that modules writing it need not import the package root)."""

__version__ = "0.2.0"
