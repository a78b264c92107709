"""`python -m surgery`: the old name of `python -m lab.surgery`, kept as an entry point."""

from lab.surgery import main

if __name__ == "__main__":
    main()
