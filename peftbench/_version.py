"""The package version (a leaf module: provenance and the CLI read it without importing the API)."""
__version__ = "0.2.0"
