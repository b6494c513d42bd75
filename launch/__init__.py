"""Launchers: sweeps, multi-process and cluster entry points (python -m launch.NAME)."""
