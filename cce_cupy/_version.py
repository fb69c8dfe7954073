"""The package version, in a module of its own so that cce_cupy.cuda can read it without importing cce_cupy."""

__version__ = "0.1.0"
