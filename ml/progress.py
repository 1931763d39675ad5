"""Progress of a long step: a log line every N items (task logs), and a bar when a person watches.

``Progress("feature extraction", total=250, every=100)`` logs ``feature extraction: 100/250 images
(40%) in 3.1 s`` at 100 and 200, and a last line when it closes. The bar (tqdm, when installed) is
drawn only when stderr is a terminal, so Airflow's task logs get the lines and no carriage returns.
Standard library only: every layer of ``ml`` may use it.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


def terminal_bar(what: str, total: int | None, unit: str) -> Any | None:
    """A tqdm bar on stderr when stderr is a terminal and tqdm is installed, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=what, unit=f" {unit}", leave=False, file=sys.stderr)


class Progress:
    """Counts done items of a step; logs every ``every`` items (0: only the closing line)."""

    def __init__(
        self,
        what: str,
        total: int | None,
        every: int,
        *,
        unit: str = "images",
        logger: logging.Logger | None = None,
        bar: bool = True,
    ) -> None:
        self.what, self.total, self.every, self.unit = what, total, max(0, every), unit
        self.log = logger or log
        self.done = 0
        self._started = time.perf_counter()
        self._bar = terminal_bar(what, total, unit) if bar else None

    def advance(self, count: int = 1) -> None:
        """``count`` more items are done."""
        self.reach(self.done + count)

    def reach(self, done: int) -> None:
        """``done`` items are done in all (for steps that learn the count, not the increment)."""
        if done <= self.done:
            return
        before, self.done = self.done, done
        if self._bar is not None:
            self._bar.update(done - before)
        if self.every and done // self.every > before // self.every:
            self._line()

    def close(self) -> None:
        """The closing line (none when nothing was done or the last line said it); removes the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.done and not (self.every and self.done % self.every == 0):
            self._line()

    def _line(self) -> None:
        seconds = time.perf_counter() - self._started
        if self.total:
            self.log.info(
                "%s: %d/%d %s (%d%%) in %.1f s",
                self.what,
                self.done,
                self.total,
                self.unit,
                100 * self.done // self.total,
                seconds,
            )
        else:
            self.log.info("%s: %d %s in %.1f s", self.what, self.done, self.unit, seconds)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
