"""Commands that work on run directories: exporting weights and the manifest of committed checkpoints.

This package sits above `priors`, `vae` and `surgery` and imports from them; nothing below
imports it (docs/layout.md).
"""
