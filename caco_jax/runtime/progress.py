"""Progress bars that suit where the output goes: tqdm on a terminal, a line per few percent in
logs (a file, a pipe, a notebook's captured stream), so job logs stay short and readable."""

from __future__ import annotations

import sys
import time

LOG_EVERY_FRACTION = 0.05
LOG_EVERY_SECONDS = 30.0  # when the total is unknown (e.g. streaming an archive)


class LogProgress:
    """tqdm's interface (update, set_postfix, close, iteration), printing one line per
    `LOG_EVERY_FRACTION` of ``total`` (and at the end), or every `LOG_EVERY_SECONDS` when the
    total is unknown, instead of redrawing."""

    def __init__(self, iterable=None, *, total=None, initial=0, desc="", unit="it", file=None):
        self.iterable = iterable
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.n = initial
        self.desc = desc
        self.unit = unit
        self.file = file or sys.stderr
        self._start = time.perf_counter()
        self._start_n = initial
        self._postfix = ""
        self._next = self._after(initial)
        self._printed = self._start
        self._closed = False

    def _after(self, n: int) -> float:
        if not self.total:
            return float("inf")
        step = max(1, round(self.total * LOG_EVERY_FRACTION))
        return (n // step + 1) * step

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        overdue = self.total is None and time.perf_counter() - self._printed >= LOG_EVERY_SECONDS
        if self.n >= self._next or self.n == self.total or overdue:
            self._print()
            self._next = self._after(self.n)

    def set_postfix(self, refresh: bool = False, **values) -> None:
        del refresh
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _print(self) -> None:
        elapsed = time.perf_counter() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        percent = f"{100 * self.n / self.total:3.0f}% " if self.total else ""
        line = (
            f"{self.desc}: {percent}{done} {self.unit} [{elapsed:.0f}s, {rate:.2f} {self.unit}/s]"
        )
        print(line + (f" {self._postfix}" if self._postfix else ""), file=self.file, flush=True)
        self._printed = time.perf_counter()

    def close(self) -> None:
        if not self._closed and self.total is None and self.n > self._start_n:
            self._print()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def bar(iterable=None, *, total=None, initial=0, desc="", unit="it", enabled=True, leave=True):
    """A tqdm bar on a terminal, else a `LogProgress`; nothing at all when not ``enabled``."""
    if not enabled:
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(
            iterable,
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            dynamic_ncols=True,
            leave=leave,
        )
    return LogProgress(iterable, total=total, initial=initial, desc=desc, unit=unit)


def trange(*args, **kwargs):
    """`bar` over ``range(*args)``."""
    return bar(range(*args), **kwargs)
