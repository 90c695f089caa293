"""Progress bars that a log file can hold: a tqdm bar on a terminal, a few plain lines elsewhere.

What: `progress(iterable, desc=...)` wraps a training loop's iterable and returns an object
used the way the loops use a tqdm bar: ``for x in bar``, ``bar.set_postfix(...)``,
``bar.close()``.

- stderr (or ``stream``) is a terminal: a real ``tqdm`` bar, ``leave=False``, exactly as before.
- It is not (a file, a pipe, ``make demo > log 2>&1``, a CI log): no redraws at all. One plain
  line at most every `INTERVAL_S` seconds and one final line when the loop ends (the iterable
  is exhausted, or `close` is called after a ``break``), each like
  ``sft: step 500/3000, loss=0.312, tok_s=12000 (41 s)``.
- ``enabled=False``: the items, and no output at all.

Why: tqdm redraws its bar with a carriage return several times a second. A terminal overwrites
them in place; a file keeps every one, so ``make demo > log`` grew to megabytes of redraws
that hide the lines worth reading. A line every 30 s keeps a long stage visibly alive in a
log and costs a few hundred bytes per stage.

The stream and the clock are parameters, so tests can drive the throttle deterministically.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, Generic, TextIO, TypeVar

from tqdm import tqdm

INTERVAL_S = 30.0
"""Least number of seconds between two plain progress lines (the final line excepted)."""

T = TypeVar("T")


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _format_value(value: Any) -> str:
    """Strings as given (the loops pre-format them); floats short: 0.312, 12000, 1e-05."""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


class PlainProgress(Generic[T]):
    """The non-terminal bar: yields the items unchanged, prints throttled plain lines.

    ``n`` counts the items completed, starting at ``initial``: an item counts once the loop
    body has run, i.e. when the loop asks for the next one, or at `close` after a ``break``
    out of its body (so the final line agrees with the loop's own step count).
    """

    def __init__(
        self,
        iterable: Iterable[T],
        *,
        desc: str,
        total: int | None,
        initial: int,
        unit: str,
        enabled: bool,
        stream: TextIO,
        clock: Callable[[], float],
        interval: float,
    ) -> None:
        self.iterable = iterable
        self.desc = desc
        self.total = total
        self.n = initial
        self.unit = unit
        self.enabled = enabled
        self.stream = stream
        self.clock = clock
        self.interval = interval
        self.postfix: dict[str, Any] = {}
        self.t0 = clock()
        self._last_print = self.t0
        self._last_key: tuple[int, tuple[tuple[str, str], ...]] | None = None
        self.closed = False
        self._pending = False  # an item was yielded and its loop body has not asked for more

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable:
            self._pending = True
            yield item
            self._pending = False
            self.n += 1
            self._maybe_print()
        self.close()

    def set_postfix(
        self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any
    ) -> None:
        """Replace the ``key=value`` pairs shown after the count (tqdm's signature)."""
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        """Print the final line (once, and only if it would say something new)."""
        if self.closed:
            return
        self.closed = True
        if self._pending:  # closed after a break: the body of the last item has run
            self._pending = False
            self.n += 1
        if self.enabled and self._key() != self._last_key:
            self._print()

    def line(self) -> str:
        """The current line, e.g. ``sft: step 500/3000, loss=0.312 (41 s)``."""
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: {self.unit} {count}" if self.desc else f"{self.unit} {count}"]
        parts += [f"{k}={_format_value(v)}" for k, v in self.postfix.items()]
        return f"{', '.join(parts)} ({self.clock() - self.t0:.0f} s)"

    def _key(self) -> tuple[int, tuple[tuple[str, str], ...]]:
        return self.n, tuple((k, _format_value(v)) for k, v in self.postfix.items())

    def _maybe_print(self) -> None:
        if self.enabled and self.clock() - self._last_print >= self.interval:
            self._print()

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last_print = self.clock()
        self._last_key = self._key()


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    initial: int = 0,
    unit: str = "step",
    enabled: bool = True,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    interval: float = INTERVAL_S,
) -> PlainProgress[T] | tqdm:
    """A progress bar over ``iterable``: tqdm on a terminal, throttled plain lines otherwise.

    ``total`` defaults to ``initial + len(iterable)`` when the iterable has a length; a
    resumed loop passes ``progress(range(start, steps), desc=..., initial=start)`` and both
    kinds of bar count ``start..steps``. ``stream`` defaults to ``sys.stderr`` as it is at
    the call (so a redirected or captured stderr is honoured); ``clock`` and ``interval``
    drive the plain lines' throttle.
    """
    stream = sys.stderr if stream is None else stream
    if total is None and isinstance(iterable, Sized):
        total = initial + len(iterable)
    if enabled and _is_terminal(stream):
        return tqdm(
            iterable, desc=desc, total=total, initial=initial, unit=unit, leave=False, file=stream
        )
    return PlainProgress(
        iterable, desc=desc, total=total, initial=initial, unit=unit, enabled=enabled,
        stream=stream, clock=clock, interval=interval,
    )  # fmt: skip
