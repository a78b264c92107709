"""Copy results/literature/headline.md (written by the report) into README.md between its markers.

    python scripts/headline.py          # rewrite README.md's headline block
    python scripts/headline.py --check  # exit 1 if README.md's block differs from the file

`make headline` regenerates the report, then runs this; tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADLINE = ROOT / "results" / "literature" / "headline.md"
BLOCK = re.compile(r"(<!-- headline:start[^\n]*-->\n)(.*?)(<!-- headline:end -->)", re.S)


def splice(readme: str, headline: str) -> str:
    """`readme` with the text between its headline markers replaced by `headline`."""
    if not BLOCK.search(readme):
        raise ValueError("README.md has no <!-- headline:start ... --> / <!-- headline:end --> block")
    return BLOCK.sub(lambda m: m.group(1) + headline.rstrip("\n") + "\n" + m.group(3), readme, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    readme = README.read_text()
    wanted = splice(readme, HEADLINE.read_text())
    if args.check:
        if wanted != readme:
            print("README.md's headline differs from results/literature/headline.md: run `make headline`")
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
