"""Holds only the `__main__` of `python -m surgery.by_size`, the old name of `python -m lab.by_size`."""
