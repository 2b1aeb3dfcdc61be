"""Training jobs: their kinds and states, and where they run.

A job is a row of the ledger (queued -> running -> succeeded | rejected | skipped | failed).
*Where* it runs is the `JobRunner` seam: an in-process thread (`ThreadRunner`, embedded), or a
Redis queue that worker processes take jobs from (`loop.queue`, distributed), without the
scheduling or the updates changing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from labelloop.loop.ledger import Job

logger = logging.getLogger(__name__)


class JobKind(StrEnum):
    # Refit the head on cached embeddings: seconds.
    FAST = "fast"
    # Fine-tune the whole network on annotations plus replayed offline data: minutes.
    FULL = "full"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # a candidate was promoted
    REJECTED = "rejected"  # a candidate was made, the gate kept the current model
    SKIPPED = "skipped"  # nothing to train on yet (no label config, cold start waiting)
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class JobRunner(Protocol):
    """Runs the scheduler's ticks and the queued jobs somewhere: `wake` asks for a tick soon,
    `submit` hands over a job just queued in the ledger (loop.queue: a Redis queue that
    `labelloop worker` processes take jobs from)."""

    def start(self, tick: Callable[[], None]) -> None: ...

    def wake(self) -> None: ...

    def submit(self, job: Job) -> None: ...

    def stop(self, timeout_s: float = 30.0) -> None: ...


class ThreadRunner:
    """One daemon thread calling `tick` when woken, or every `poll_seconds` at the latest.

    One tick at a time, so one job at a time: training is CPU-bound and a second concurrent job
    would only slow both down on the cores that also serve requests.
    """

    def __init__(self, poll_seconds: float, *, name: str = "trainer") -> None:
        self._poll_seconds = poll_seconds
        self._name = name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, tick: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=self._loop, args=(tick,), name=self._name)
        self._thread.daemon = True
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def submit(self, job: Job) -> None:
        # The next tick finds it among the ledger's queued jobs.
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                logger.warning("The %s thread did not stop within %g s", self._name, timeout_s)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _loop(self, tick: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                tick()
            except Exception:  # noqa: BLE001 - the runner thread must outlive any one failure
                logger.exception("Trainer tick failed")
            self._wake.wait(self._poll_seconds)
            self._wake.clear()
