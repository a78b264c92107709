"""The manifest of checkpoints kept in the repository: one line per file (path, SHA-256, bytes, run, kind).

Git is not a weight store: `*.pt` is ignored, and a checkpoint enters the repository only
with a line here (`python -m lab.export RUN_DIR` writes both). The manifest test checks that
every tracked `.pt` file has a line, that every line's file exists with its checksum and
size, and that it loads.

    python -m lab.manifest add --kind training FILE...   # write (or refresh) their lines
    python -m lab.manifest drop FILE...                  # remove their lines
    python -m lab.manifest check                         # every line against its file

`add --kind training` is how a running run's safeguard enters (docs/experiments.md); `drop`
retires it once the run's weights are exported. Paths are relative to the working directory.

Kinds:

* `weights`: a weights-only export (model state and config; no optimizer or RNG state),
  what a finished run keeps;
* `training`: a full training checkpoint (optimizer and RNG state too) of a run still
  training, committed as a safeguard, or one committed before the exports existed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The manifest, relative to the repository root.
MANIFEST = Path("results") / "checkpoints.tsv"
COLUMNS = ("path", "sha256", "bytes", "run", "kind")
KINDS = ("weights", "training")


@dataclass(frozen=True)
class Entry:
    """One committed checkpoint.

    Args:
        path: the file, relative to the repository root (posix separators).
        sha256: hex digest of its bytes.
        bytes: its size.
        run: the run directory it belongs to, relative to the repository root.
        kind: `weights` or `training` (see the module docstring).
    """

    path: str
    sha256: str
    bytes: int
    run: str
    kind: str


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(path: Path, root: Path, kind: str) -> Entry:
    """The manifest entry of `path` (inside `root`) as it is on disk now."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    relative = path.resolve().relative_to(root.resolve())
    run = relative.parent.parent if relative.parent.name == "checkpoints" else relative.parent
    return Entry(relative.as_posix(), sha256_of(path), path.stat().st_size, run.as_posix(), kind)


def read(root: Path) -> list[Entry]:
    """The entries of `root`'s manifest, in file order (none if it does not exist)."""
    path = root / MANIFEST
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader((line for line in f if not line.startswith("#")), delimiter="\t"))
    return [Entry(r["path"], r["sha256"], int(r["bytes"]), r["run"], r["kind"]) for r in rows]


def write(root: Path, entries: list[Entry]) -> Path:
    """Write `entries`, sorted by path, as `root`'s manifest."""
    path = root / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write("# Checkpoints kept in git (python -m lab.export RUN_DIR adds a run's weights; docs/checkpoints.md)\n")
        out = csv.writer(f, delimiter="\t", lineterminator="\n")
        out.writerow(COLUMNS)
        for e in sorted(entries, key=lambda e: e.path):
            out.writerow([e.path, e.sha256, e.bytes, e.run, e.kind])
    return path


def upsert(root: Path, new: Entry, drop: tuple[str, ...] = ()) -> list[Entry]:
    """The manifest with `new` added (replacing a line of the same path) and the paths in `drop` removed."""
    kept = [e for e in read(root) if e.path != new.path and e.path not in drop]
    return [*kept, new]


def problems(root: Path, entries: list[Entry]) -> list[str]:
    """What does not match on disk: a missing file, a wrong size or checksum. Empty when all match."""
    out = []
    for e in entries:
        path = root / e.path
        if not path.is_file():
            out.append(f"{e.path}: listed in {MANIFEST} but missing")
        elif path.stat().st_size != e.bytes:
            out.append(f"{e.path}: {path.stat().st_size} bytes, the manifest says {e.bytes}")
        elif sha256_of(path) != e.sha256:
            out.append(f"{e.path}: SHA-256 differs from the manifest's")
    return out


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.manifest", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="write the lines of these checkpoint files")
    add.add_argument("--kind", choices=KINDS, required=True)
    add.add_argument("files", nargs="+", type=Path)
    drop = commands.add_parser("drop", help="remove the lines of these paths")
    drop.add_argument("files", nargs="+", type=Path)
    commands.add_parser("check", help="check every line against its file")
    args = parser.parse_args(argv)
    root = root.resolve()
    try:
        if args.command == "check":
            entries = read(root)
            found = problems(root, entries)
            for problem in found:
                print(problem)
            print(f"{MANIFEST}: {len(entries)} lines, {len(found)} problems")
            return 1 if found else 0
        paths = [path.resolve() for path in args.files]
        outside = [str(path) for path in paths if not path.is_relative_to(root)]
        if outside:
            raise ValueError(f"not inside the repository {root}: {', '.join(outside)}")
        if args.command == "add":
            missing = [str(path) for path in paths if not path.is_file()]
            if missing:
                raise ValueError(f"not a file: {', '.join(missing)}")
            for path in paths:
                entries = upsert(root, describe(path, root, args.kind))
                write(root, entries)
        else:
            names = {path.relative_to(root).as_posix() for path in paths}
            unknown = names - {e.path for e in read(root)}
            if unknown:
                raise ValueError(f"not in {MANIFEST}: {', '.join(sorted(unknown))}")
            entries = [e for e in read(root) if e.path not in names]
            write(root, entries)
    except (ValueError, OSError) as e:
        print(f"lab.manifest: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"{MANIFEST}: {len(entries)} lines ({args.command} {len(paths)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
