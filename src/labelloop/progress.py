"""Progress for people and for log collectors: a bar on a terminal, plain lines elsewhere.

A bar redrawn with carriage returns is noise in a file or a container log, so off a TTY the
same progress is a log line at each tenth of the work and one at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm import tqdm

logger = logging.getLogger(__name__)


def tqdm_disable(show: bool) -> bool | None:
    """tqdm's `disable` for a bar the caller wants shown: None lets tqdm hide it off a TTY."""
    return None if show else True


class Progress:
    """`update(done, total)` as work advances; a tqdm bar on a terminal, log lines otherwise."""

    def __init__(self, desc: str, *, unit: str = "it") -> None:
        self.desc = desc
        self.unit = unit
        self._bar: tqdm | None = (
            tqdm(total=0, desc=desc, unit=unit) if sys.stderr.isatty() else None
        )
        self._started = time.monotonic()
        self._tenth = 0  # tenths of the work already said
        self._done = 0
        self._total = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()
        elif exc_type is None and self._total:
            self._line()

    def update(self, done: int, total: int) -> None:
        self._done, self._total = done, total
        if self._bar is not None:
            self._bar.total = total
            self._bar.update(done - self._bar.n)
            return
        tenth = 10 * done // total if total else 0
        if tenth > self._tenth and done < total:
            self._tenth = tenth
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        logger.info("%s: %d/%d %ss (%.1f/s)", self.desc, self._done, self._total, self.unit, rate)
