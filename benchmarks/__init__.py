"""Carapace benchmarks: every scenario against a direct connection, an ``ssh -L``
forward and the Carapace tunnel, side by side in one run. ``make bench``."""
