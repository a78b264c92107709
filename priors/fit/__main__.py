"""`python -m priors.fit`: the old name of `python -m lab.fit`, kept as an entry point."""

from lab.fit import main

if __name__ == "__main__":
    main()
