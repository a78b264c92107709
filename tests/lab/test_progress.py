"""lab.progress: the log lines of a long pass, on a clock the test drives."""

from __future__ import annotations

import logging

import pytest

from lab.progress import PassProgress, format_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0 s"),
        (42.0, "42 s"),
        (59.4, "59 s"),
        (60.0, "1 min"),
        (749.0, "12 min"),
        (3600.0, "1 h 00 min"),
        (6300.0, "1 h 45 min"),
        (90000.0, "25 h 00 min"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_line_every_interval_with_the_time_left(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="lab.progress")
    bar = PassProgress(10_000, "log p(x), K = 5000", every_s=300, clock=clock)
    clock.now += 299
    bar.update(1_000)  # before the first interval: nothing
    assert caplog.messages == []
    clock.now += 1
    bar.update(1_000)  # 2,000 points in 300 s: 8,000 left take 1,200 s
    assert caplog.messages == ["log p(x), K = 5000: 2,000 of 10,000 points in 5 min, about 20 min left"]
    clock.now += 200
    bar.update(3_000)  # 200 s since the last line: none
    assert len(caplog.messages) == 1
    clock.now += 100
    bar.update(5_000)  # done: the closing line says it, not a line with nothing left
    assert len(caplog.messages) == 1
    bar.close()
    assert caplog.messages[-1] == "log p(x), K = 5000: 10,000 points in 10 min"


def test_a_continued_pass_counts_from_where_it_was_and_times_the_rest(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="lab.progress")
    bar = PassProgress(10_000, "log p(x), K = 5000", every_s=300, clock=clock, initial=4_000)
    assert bar.bar.n == 4_000
    clock.now += 300
    bar.update(2_000)  # 2,000 points in 300 s since the restart: 4,000 left take 600 s
    assert caplog.messages == [
        "log p(x), K = 5000: 6,000 of 10,000 points (4,000 before a restart) in 5 min, about 10 min left"
    ]
    clock.now += 600
    bar.update(4_000)
    bar.close()
    assert caplog.messages[-1] == "log p(x), K = 5000: 10,000 points (4,000 before a restart) in 15 min"


def test_a_short_pass_logs_nothing(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="lab.progress")
    bar = PassProgress(10, "log p(x), K = 5", every_s=300, clock=clock)
    clock.now += 299
    bar.update(10)
    bar.close()
    assert caplog.messages == []
