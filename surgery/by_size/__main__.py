"""`python -m surgery.by_size`: the old name of `python -m lab.by_size`, kept as an entry point."""

from lab.by_size import main

if __name__ == "__main__":
    main()
