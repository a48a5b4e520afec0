"""Progress bars that suit where stderr goes: the one place latentlab makes one.

Why: in a terminal (or a notebook) a tqdm bar redraws one line in place; in a pipe (``make demo > log``)
or a CI log every redraw is a carriage return onto the same line, thousands of them per run. Off a
terminal, :func:`progress` prints a few plain lines instead: the start, about every 25% (or every 30 s
when that is sooner, or when the total is unknown), and the end with the elapsed time and the rate.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["PlainProgress", "progress"]

# Off a terminal: a line at every STEP of the total, and at least every INTERVAL seconds.
STEP = 0.25
INTERVAL = 30.0


def _in_notebook() -> bool:
    """A Jupyter kernel: its stderr is no terminal, yet tqdm draws a widget there, which is what a user wants."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001  (an IPython without a running shell)
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    disable: bool = False,
    unit: str = "it",
    initial: float = 0,
    tty: bool | None = None,
) -> Any:
    """A tqdm bar when stderr is a terminal or a notebook, else a :class:`PlainProgress` (same small interface:
    iterate, ``update(n)``, ``set_postfix``/``set_postfix_str``, ``close()``, a context manager).

    ``tty`` forces one or the other (None: ask stderr). ``initial`` is where a resumed run starts.
    """
    if tty is None:
        tty = _is_terminal(sys.stderr) or _in_notebook()
    if tty:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=disable, unit=unit, initial=initial)
    return PlainProgress(iterable, total=total, desc=desc, disable=disable, unit=unit, initial=initial)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.3g}"


class PlainProgress:
    """tqdm's small interface, printed as a few whole lines on stderr (see the module docstring)."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: float | None = None,
        desc: str | None = None,
        disable: bool = False,
        unit: str = "it",
        initial: float = 0,
        file: TextIO | None = None,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.desc = desc or "progress"
        self.disable = disable
        self.unit = unit
        self.n = initial
        self.initial = initial
        self.postfix = ""
        self._file = file
        self._closed = False
        self._t0 = self._last = time.monotonic()
        self._next = self._mark_after(initial)
        if not disable:
            if initial:
                of = f"/{_count(total)}" if total else ""
                self._say(f"{self.desc}: resumed at {_count(initial)}{of} {unit}")
            else:
                self._say(f"{self.desc}: started, {_count(total)} {unit}" if total else f"{self.desc}: started")

    # --- tqdm's interface -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar was made without an iterable")
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(stopped=exc_type is not None)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable or self._closed:
            return
        now = time.monotonic()
        frac = self.n / self.total if self.total else None
        due = frac is not None and self._next is not None and frac >= self._next and frac < 1
        if due or now - self._last >= INTERVAL:
            self._next = self._mark_after(self.n)
            self._say(self._line(now))

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def refresh(self) -> None:
        """Nothing to redraw: lines are printed as they fall due."""

    def close(self, stopped: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self.disable:
            return
        elapsed = time.monotonic() - self._t0
        done = self.n - self.initial
        rate = f" ({done / elapsed:.3g} {self.unit}/s)" if elapsed > 0 and done else ""
        word = "stopped at" if stopped or (self.total and self.n < self.total) else "done,"
        of = f"/{_count(self.total)}" if self.total and self.n != self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        self._say(f"{self.desc}: {word} {_count(self.n)}{of} {self.unit} in {_duration(elapsed)}{rate}{post}")

    # --- internals ----------------------------------------------------------------------------------

    def _mark_after(self, n: float) -> float | None:
        """The next multiple of STEP of the total above ``n`` (None without a total)."""
        if not self.total:
            return None
        return (int(n / self.total / STEP) + 1) * STEP

    def _line(self, now: float) -> str:
        elapsed = now - self._t0
        self._last = now
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        of = f"/{_count(self.total)}" if self.total else ""
        done = self.n - self.initial
        rate = f", {done / elapsed:.3g} {self.unit}/s" if elapsed > 0 and done else ""
        post = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {_count(self.n)}{of} {self.unit}{pct}, {_duration(elapsed)}{rate}{post}"

    def _say(self, line: str) -> None:
        stream = self._file or sys.stderr
        try:
            print(line, file=stream, flush=True)
        except (OSError, ValueError):  # a closed or broken stderr must not stop a run
            pass
