"""Peak resident memory of a command's whole process tree, sampled from /proc (Linux).

`/usr/bin/time -v` reports the largest single process it waited for ("Maximum resident set
size"); wandb runs separate processes (`wandb-core`, `wandb-symon`, in their own session),
so a run's footprint is the sum over the tree. This script starts the command and every
`--interval` seconds sums VmRSS over the command and all its descendants (a descendant
stays tracked after its parent exits). It also keeps each process's own high-water mark
(VmHWM, which the kernel tracks exactly between samples), the split of every process's
RSS at the tree's peak into anonymous and file-backed memory, and the rusage maximum that
`/usr/bin/time -v` would print.

    python results/memory/peak_rss.py --trace --label e1-wandb --json runs.jsonl -- \
        .venv/bin/python train.py trainer.max_epochs=1 hydra.run.dir=/tmp/mem/e1-wandb

Prints one summary line; `--json` appends the full record (per process, and with `--trace`
the timeline of (seconds, tree RSS in kB)) as one JSON line. `started_at` (Unix time)
lines the timeline up with a run's train.log. results/memory/README.md has the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _status(pid: int) -> dict[str, int] | None:
    """VmRSS, VmHWM (kB) and parent pid of `pid`, or None when it has gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {"VmRSS": 0, "VmHWM": 0, "PPid": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in out:
            out[key] = int(value.split()[0])
    return out


def _name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in argv if w]
    if not words:
        return "?"
    # The program and the first two arguments are enough to tell pip, train.py and wandb-core apart.
    return " ".join([os.path.basename(words[0]), *words[1:3]])[:120]


def measure(argv: list[str], interval: float, trace: bool) -> dict:
    """Run `argv` to completion and return its memory record."""
    start = time.monotonic()
    started_at = time.time()
    proc = subprocess.Popen(argv)
    root = proc.pid
    tracked: dict[int, dict] = {root: {"name": _name(root), "hwm_kb": 0, "rss_kb": 0}}
    peak_kb, peak_t, peak_parts = 0, 0.0, {}
    timeline = []
    rusage = None
    while True:
        # Children of any tracked process join the tree.
        parents: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = _status(int(entry.name))
                if st is not None:
                    parents[int(entry.name)] = st["PPid"]
        grew = True
        while grew:
            grew = False
            for pid, ppid in parents.items():
                if ppid in tracked and pid not in tracked:
                    tracked[pid] = {"name": _name(pid), "hwm_kb": 0, "rss_kb": 0}
                    grew = True
        total, parts = 0, {}
        for pid, rec in tracked.items():
            st = _status(pid) if pid in parents else None
            if st is None:
                continue
            rec["hwm_kb"] = max(rec["hwm_kb"], st["VmHWM"])
            rec["rss_kb"] = max(rec["rss_kb"], st["VmRSS"])
            # Refreshed while alive: a shim or `make` may exec another program.
            rec["name"] = _name(pid) if st["VmRSS"] else rec["name"]
            total += st["VmRSS"]
            parts[pid] = (st["VmRSS"], st["RssAnon"], st["RssFile"] + st["RssShmem"])
        now = time.monotonic() - start
        if total > peak_kb:
            peak_kb, peak_t, peak_parts = total, now, parts
        if trace:
            timeline.append([round(now, 2), total])
        if rusage is None:
            waited, status, ru = os.wait4(root, os.WNOHANG)
            if waited == root:
                rusage = (status, ru)
        if rusage is not None and not any(pid in parents for pid in tracked if pid != root):
            break
        time.sleep(interval)
    status, ru = rusage
    code = os.waitstatus_to_exitcode(status)
    return {
        "argv": argv,
        "exit_code": code,
        "wall_s": round(time.monotonic() - start, 1),
        "tree_peak_mb": round(peak_kb / 1024, 1),
        "tree_peak_at_s": round(peak_t, 1),
        "started_at": started_at,
        # Each process at the tree's peak: [RSS, anonymous, file-backed] MB.
        "tree_peak_parts_mb": {
            f"{p} {tracked[p]['name']}": [round(kb / 1024, 1) for kb in v] for p, v in peak_parts.items()
        },
        # What /usr/bin/time -v prints as "Maximum resident set size": the largest single process waited for.
        "time_v_max_rss_mb": round(ru.ru_maxrss / 1024, 1),
        "processes": [
            {"pid": pid, "name": rec["name"], "hwm_mb": round(rec["hwm_kb"] / 1024, 1)}
            for pid, rec in tracked.items()
            if rec["hwm_kb"]
        ],
        "timeline": timeline,
        "self_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--label", default="", help="a name stored with the record")
    parser.add_argument("--json", type=Path, help="append the record to this JSON-lines file")
    parser.add_argument("--trace", action="store_true", help="store the (time, tree RSS) timeline")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        parser.error("no command given (put it after --)")
    record = {"label": args.label, **measure(argv, args.interval, args.trace)}
    top = max(record["processes"], key=lambda p: p["hwm_mb"])
    sys.stderr.write(
        f"[peak_rss] {args.label}: exit {record['exit_code']}, {record['wall_s']} s, "
        f"tree peak {record['tree_peak_mb']} MB at {record['tree_peak_at_s']} s, "
        f"largest process {top['hwm_mb']} MB ({top['name']}), time -v {record['time_v_max_rss_mb']} MB\n"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
