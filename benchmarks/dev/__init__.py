"""Kernel-development scripts: run on the device from the repository root as `python -m benchmarks.dev.NAME`."""
