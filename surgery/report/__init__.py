"""Holds only the `__main__` of `python -m surgery.report`, the old name of `python -m lab.report`."""
