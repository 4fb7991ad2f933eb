"""Tests of femkin.progress: plain log lines, terminal redraws, quiet and rank != 0 silence, ETA."""

from __future__ import annotations

import io
import types

import pytest

from femkin.progress import Progress, format_seconds


class Clock:
    """A clock the test advances by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run(total, n, *, step=2.0, **kwargs):
    clock, out = Clock(), io.StringIO()
    bar = Progress("phase", total, stream=out, clock=clock, **kwargs)
    for _ in range(n):
        clock.now += step
        bar.update()
    bar.close()
    return out.getvalue()


def test_plain_lines_one_per_tenth():
    text = _run(40, 40, tty=False)
    lines = text.splitlines()
    assert len(lines) == 10
    assert lines[0] == "phase  4/40   10%  elapsed 8.0 s  ETA 1 min 12 s"
    assert lines[4].startswith("phase  20/40   50%  elapsed 40.0 s  ETA 40.0 s")
    assert lines[-1] == "phase  40/40  100%  elapsed 1 min 20 s"
    assert "\r" not in text


def test_plain_lines_fewer_items_than_steps_and_early_stop():
    lines = _run(3, 3, tty=False).splitlines()
    assert [ln.split()[1] for ln in lines] == ["1/3", "2/3", "3/3"]
    # Stopped at 7 of 40: lines at 4 (10%) and the final count on close.
    lines = _run(40, 7, tty=False).splitlines()
    assert [ln.split()[1] for ln in lines] == ["4/40", "7/40"]


def test_unknown_total_prints_at_powers_of_two():
    lines = _run(None, 11, tty=False).splitlines()
    assert [int(ln.split()[1]) for ln in lines] == [1, 2, 4, 8, 11]
    assert all("ETA" not in ln and "%" not in ln for ln in lines)


def test_tty_redraws_in_place_and_ends_with_newline():
    text = _run(4, 4, tty=True, width=4, min_interval=0.0)
    assert text.count("\r") == 5  # four updates and the final redraw
    assert text.endswith("\n") and text.count("\n") == 1
    assert "\rphase  [##--]  2/4   50%  elapsed 4.0 s  ETA 4.0 s" in text


def test_tty_throttles_redraws():
    text = _run(100, 100, step=0.01, tty=True, min_interval=0.2)
    # 1 s in all: one redraw per 0.2 s plus the one at completion and the one on close.
    assert 5 <= text.count("\r") <= 8


def test_quiet_and_other_ranks_write_nothing():
    assert _run(10, 10, tty=False, quiet=True) == ""
    assert _run(10, 10, tty=True, quiet=True) == ""
    assert _run(10, 10, tty=False, comm=types.SimpleNamespace(rank=1)) == ""
    assert _run(10, 10, tty=False, comm=types.SimpleNamespace(rank=0)).count("\n") == 10


@pytest.mark.mpi
def test_real_communicator_only_rank_zero_writes(comm):
    text = _run(5, 5, tty=False, comm=comm)
    counts = comm.allgather(text.count("\n"))
    assert counts == [5] + [0] * (comm.size - 1)


def test_eta_arithmetic_with_injected_clock():
    clock = Clock()
    bar = Progress("p", 10, stream=io.StringIO(), clock=clock, tty=False)
    assert bar.eta() is None  # nothing done yet
    clock.now += 3.0
    bar.update(3)
    assert bar.elapsed() == pytest.approx(3.0)
    assert bar.eta() == pytest.approx(7.0)  # 1 s per item, 7 items left
    clock.now += 9.0
    bar.update(1)
    assert bar.eta() == pytest.approx(18.0)  # 12 s / 4 items * 6 left
    bar.update(6)
    assert bar.eta() == 0.0
    assert Progress("p", None, stream=io.StringIO(), clock=clock).eta() is None


def test_format_seconds_and_bad_total():
    assert format_seconds(4.24) == "4.2 s"
    assert format_seconds(125) == "2 min 05 s"
    assert format_seconds(3725) == "1 h 02 min"
    with pytest.raises(ValueError):
        Progress("p", -1)


def test_clear_erases_the_terminal_line_only():
    out = io.StringIO()
    bar = Progress("p", 2, stream=out, tty=True, min_interval=0.0)
    bar.update()
    bar.clear()
    assert out.getvalue().endswith("\r\033[K")
    plain = io.StringIO()
    bar = Progress("p", 2, stream=plain, tty=False)
    bar.clear()
    assert plain.getvalue() == ""
