"""Holds only the `__main__` of `python -m priors.fit`, the old name of `python -m lab.fit`."""
