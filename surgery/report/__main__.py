"""`python -m surgery.report`: the old name of `python -m lab.report`, kept as an entry point."""

import sys

from lab.report import main

if __name__ == "__main__":
    sys.exit(main())
