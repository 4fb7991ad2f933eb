"""A progress bar for long phases, written by rank 0 only (standard library only).

``femkin`` prints one line per TAO iteration; phases that take minutes without such a natural
line (the forward simulation over frames, the Hessian actions of the UQ eigensolver, posterior
forward samples) report through :class:`Progress`:

- on a terminal (``stream.isatty()``) one line redrawn in place (carriage return)
  (``label [#####-----] 12/40  30%  elapsed 4.1 s  ETA 9.6 s``), at most every
  ``min_interval`` seconds, finished by a newline;
- elsewhere (batch logs on a cluster) one plain line each time another tenth of the total is
  done, so a log holds at most ``steps`` lines per phase; with an unknown total, one line at
  counts 1, 2, 4, 8, ...;
- nothing at all with ``quiet=True`` or on ranks other than 0 of ``comm``.

Example::

    with Progress("simulate: frames", total=len(times) - 1, comm=comm, quiet=quiet) as bar:
        for frame in frames:
            ...
            bar.update()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``4.2 s``, ``2 min 05 s`` or ``1 h 02 min``: short durations for progress lines."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, s = divmod(int(round(seconds)), 60)
        return f"{minutes} min {s:02d} s"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min"


class Progress:
    """Count/total, elapsed time and ETA of a phase, shown on rank 0 of ``comm``.

    Not collective: ranks other than 0 only count. ``update`` is cheap enough to call once per
    time step.

    Args:
        label: what is counted, e.g. ``"uq: posterior samples"``.
        total: the number of items, or ``None`` when unknown (then no percentage and no ETA).
        comm: an object with a ``rank`` attribute (an mpi4py communicator); ``None``: show.
        quiet: show nothing.
        stream: where to write; ``None``: ``sys.stderr`` at construction time.
        tty: whether to redraw in place; ``None``: ``stream.isatty()``.
        clock: a monotonic clock in seconds (injected by tests).
        steps: plain-line mode writes a line every ``1/steps`` of the total.
        width: bar width in characters (terminal mode).
        min_interval: terminal mode redraws at most this often (seconds), except at the end.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        comm=None,
        quiet: bool = False,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        steps: int = 10,
        width: int = 24,
        min_interval: float = 0.2,
    ):
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0 or None, found {total}")
        self.label = label
        self.total = total
        self.count = 0
        self.active = not quiet and (comm is None or getattr(comm, "rank", 0) == 0)
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) and self.active else False
        self.tty = tty
        self.clock = clock
        self.steps = max(int(steps), 1)
        self.width = max(int(width), 1)
        self.min_interval = min_interval
        self.start = clock()
        self._last_draw = -float("inf")
        self._printed_count = 0  # count shown by the last line (plain mode)
        self._next_power = 1  # unknown total: next count to print in plain mode
        self._closed = False

    # -- numbers ---------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds since construction."""
        return self.clock() - self.start

    def eta(self) -> float | None:
        """Estimated seconds left (mean time per item so far times items left), or ``None``."""
        if self.total is None or self.count <= 0:
            return None
        left = max(self.total - self.count, 0)
        return self.elapsed() / self.count * left

    def line(self, *, bar: bool = False) -> str:
        """The progress text for the current count (without a carriage return or newline)."""
        parts = [self.label]
        if self.total:
            frac = min(self.count / self.total, 1.0)
            if bar:
                filled = int(round(frac * self.width))
                parts.append("[" + "#" * filled + "-" * (self.width - filled) + "]")
            parts.append(f"{self.count}/{self.total}")
            parts.append(f"{100 * frac:3.0f}%")
        else:
            parts.append(f"{self.count}")
        parts.append(f"elapsed {format_seconds(self.elapsed())}")
        eta = self.eta()
        if eta is not None and self.count < (self.total or 0):
            parts.append(f"ETA {format_seconds(eta)}")
        return "  ".join(parts)

    # -- updates ---------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done (and show them if it is time to)."""
        self.count += n
        if not self.active or self._closed:
            return
        if self.tty:
            now = self.clock()
            done = self.total is not None and self.count >= self.total
            if done or now - self._last_draw >= self.min_interval:
                self._last_draw = now
                self._write("\r" + self.line(bar=True) + "\033[K")
            return
        if self._plain_due():
            self._printed_count = self.count
            self._write(self.line() + "\n")

    def _plain_due(self) -> bool:
        if self.total is None:
            if self.count >= self._next_power:
                while self._next_power <= self.count:
                    self._next_power *= 2
                return True
            return False
        if self.total == 0:
            return False
        tenth = lambda k: (min(k, self.total) * self.steps) // self.total  # noqa: E731
        return tenth(self.count) > tenth(self._printed_count)

    def clear(self) -> None:
        """Erase the terminal line before other output (the next update redraws it)."""
        if self.active and self.tty and not self._closed:
            self._write("\r\033[K")
            self._last_draw = -float("inf")

    def close(self) -> None:
        """Finish: a terminal line gets its final state and a newline; a plain log gets a last
        line if the final count was not shown yet (a phase that stopped early). Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        if not self.active:
            return
        if self.tty:
            if self.count or self.total:
                self._write("\r" + self.line(bar=True) + "\033[K\n")
        elif self.count != self._printed_count:
            self._write(self.line() + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
