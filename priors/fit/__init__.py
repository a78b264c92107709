"""`python -m priors.fit`: the old name of the post-hoc fitting command (surgery/fit.py), kept as an entry point.

The work lives above the priors (it loads checkpoints and runs the surgery); this package
holds only the `__main__` that runs it, so no module of `priors` imports upward.
"""
