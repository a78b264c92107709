"""The progress of a long pass over points: a bar on a terminal, log lines in a background run.

`surgery.decomposition` stays free of output: it takes a progress factory, called like
tqdm (`factory(total=..., desc=..., unit=...)`) and returning an object with `update(n)`
and `close()`. `PassProgress` is priorlab's: a tqdm bar where stderr is a terminal (none in a
log file), and a log line every `every_s` seconds with the points done and the time left,
so that a run's train.log shows how far an hours-long evaluation has come. A pass shorter
than `every_s` logs nothing. A pass that continues a stopped one starts at `initial` points
done, and its time left comes from the points done since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: Seconds between two log lines of a pass.
LOG_EVERY_S = 300.0


def format_duration(seconds: float) -> str:
    """`42 s`, `12 min`, `1 h 05 min`: to the second below a minute, then to the minute."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class PassProgress:
    """A tqdm bar (shown only on a terminal) and a log line every `every_s` seconds of the pass."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "points",
        every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        initial: int = 0,
    ) -> None:
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.every_s = float(every_s)
        self.clock = clock
        self.initial = self.done = int(initial)
        self.started = self.last_line = clock()
        self.bar = tqdm(
            total=self.total,
            initial=self.initial,
            desc=desc,
            unit=f" {unit}",
            disable=None,
            leave=False,
            dynamic_ncols=True,
        )

    def update(self, n: int) -> None:
        self.done += int(n)
        self.bar.update(n)
        now = self.clock()
        if now - self.last_line >= self.every_s and self.initial < self.done < self.total:
            elapsed = now - self.started
            left = elapsed / (self.done - self.initial) * (self.total - self.done)
            log.info(
                "%s: %s of %s %s%s in %s, about %s left",
                self.desc,
                f"{self.done:,}",
                f"{self.total:,}",
                self.unit,
                self._before(),
                format_duration(elapsed),
                format_duration(left),
            )
            self.last_line = now

    def _before(self) -> str:
        return f" ({self.initial:,} before a restart)" if self.initial else ""

    def close(self) -> None:
        self.bar.close()
        elapsed = self.clock() - self.started
        if elapsed >= self.every_s:
            log.info(
                "%s: %s %s%s in %s", self.desc, f"{self.done:,}", self.unit, self._before(), format_duration(elapsed)
            )
