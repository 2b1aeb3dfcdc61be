"""Training jobs on a Redis queue (RQ), for the distributed mode (`LABELLOOP_QUEUE_URL`).

The ledger stays the truth about jobs; Redis only carries the work to a worker:

* A serving replica's trainer never trains. `QueueRunner.submit` puts each job the ledger
  queued onto the RQ queue (one RQ job per ledger job, its id derived from the ledger's, so a
  coalesced request is not queued twice), and `wake` (after a webhook) puts a scheduling tick.
* `labelloop worker` runs an RQ `SimpleWorker` (in-process, no fork per job, so the loaded
  models and caches stay warm between jobs). An RQ job claims its ledger job
  (`Trainer.run_claimed`: one job per project at a time across workers) and holds a lease while
  it runs. Beside it, a maintenance thread calls `Trainer.maintain` every few seconds: jobs of
  workers whose lease expired are queued again, Label Studio is reconciled, automatic training
  is queued, and every queued ledger job without a live RQ job is put back (`resubmit`), which
  is how jobs survive a Redis restart or a worker killed between dequeuing and claiming.

RQ, as Label Studio itself uses, rather than Celery or Dramatiq: one dependency, Redis only,
and the same operational habits as the Label Studio deployment beside it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labelloop.errors import StoreError

if TYPE_CHECKING:
    from redis import Redis

    from labelloop.loop.ledger import Job
    from labelloop.loop.trainer import Trainer

logger = logging.getLogger(__name__)

QUEUE_NAME = "labelloop"
_TICK_ID = "labelloop-tick"
# RQ's own timeout for one job: a full fine-tune may take long; the lease, not this, is what
# notices a dead worker.
_JOB_TIMEOUT_S = 6 * 3600
# Seconds an RQ job may sit "started" with its ledger job still queued before it is taken for a
# worker that died between dequeuing and claiming.
_STARTED_GRACE_S = 60.0


class QueueError(StoreError):
    """The Redis queue cannot be reached or used."""


def rq_job_id(ledger_job_id: int) -> str:
    return f"labelloop-job-{ledger_job_id}"


def connect(url: str) -> Redis:
    """A Redis connection from `redis://` or `rediss://` URL, checked with a PING."""
    from redis import Redis
    from redis.exceptions import RedisError

    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise QueueError(
            f"LABELLOOP_QUEUE_URL must be a redis:// or rediss:// URL, got {_safe(url)!r}"
        )
    try:
        redis = Redis.from_url(url, socket_connect_timeout=5, health_check_interval=10)
        redis.ping()
    except RedisError as exc:
        raise QueueError(
            f"cannot reach the job queue at {_safe(url)}: {exc}; start Redis there or fix "
            "LABELLOOP_QUEUE_URL"
        ) from None
    return redis


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


class QueueRunner:
    """The JobRunner of a serving replica: jobs go to the Redis queue, nothing runs here."""

    def __init__(self, redis: Redis) -> None:
        from rq import Queue

        self._redis = redis
        self.queue = Queue(QUEUE_NAME, connection=redis)

    def start(self, tick: Callable[[], None]) -> None:
        """Nothing to start: workers tick."""

    def stop(self, timeout_s: float = 30.0) -> None:
        """Nothing runs here."""

    def wake(self) -> None:
        """A scheduling tick soon (after a webhook): a worker decides whether training is due."""
        self._enqueue(_TICK_ID, "labelloop.loop.queue.tick", ())

    def submit(self, job: Job) -> None:
        self._enqueue(rq_job_id(job.id), "labelloop.loop.queue.run_job", (job.id,))

    def resubmit(self, jobs: list[Job]) -> int:
        """Put back every queued ledger job that has no live RQ job; returns how many."""
        from rq.job import Job as RQJob
        from rq.job import JobStatus

        put = 0
        found = RQJob.fetch_many([rq_job_id(j.id) for j in jobs], connection=self._redis)
        for job, existing in zip(jobs, found, strict=True):
            if existing is not None:
                status = existing.get_status(refresh=False)
                if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
                    continue
                started = existing.started_at
                if status == JobStatus.STARTED and (
                    started is None or time.time() - started.timestamp() < _STARTED_GRACE_S
                ):
                    continue
                existing.delete()
            self.submit(job)
            put += 1
        return put

    def _enqueue(self, job_id: str, func: str, args: tuple[Any, ...]) -> None:
        from redis.exceptions import RedisError
        from rq.exceptions import DuplicateJobError

        try:
            self.queue.enqueue_call(
                func,
                args=args,
                job_id=job_id,
                unique=True,
                timeout=_JOB_TIMEOUT_S,
                result_ttl=0,
                failure_ttl=300,
            )
        except DuplicateJobError:
            pass  # already queued (or running): requests coalesce
        except RedisError as exc:
            # The ledger holds the job: a worker's maintenance puts it back on the queue once
            # Redis answers again, so this is a delay, not a loss.
            logger.warning("Could not queue %s on Redis (%s); it is re-queued later", job_id, exc)


# --------------------------------------------------------------------------- the worker side


@dataclass
class _WorkerContext:
    trainer: Trainer
    runner: QueueRunner
    name: str


_context: _WorkerContext | None = None


def run_job(ledger_job_id: int) -> str:
    """An RQ job: run one ledger job in this worker (no-op when another took it)."""
    ctx = _require_context()
    lease = ctx.trainer.settings.lease_seconds
    finished = ctx.trainer.run_claimed(ledger_job_id, worker=ctx.name, lease_s=lease)
    if finished is None:
        logger.info("Job %d is not claimable here (done, or its project is busy)", ledger_job_id)
    # Jobs of the same project that waited for this one, and any queued meanwhile.
    ctx.runner.resubmit(ctx.trainer.ledger.pending_jobs())
    return "not claimed" if finished is None else str(finished.state)


def tick() -> None:
    """An RQ job: one scheduling pass (a replica got annotations)."""
    _require_context().trainer.maintain()


def _require_context() -> _WorkerContext:
    if _context is None:
        raise RuntimeError(
            "labelloop's queued jobs run in `labelloop worker`, not in a plain `rq worker`"
        )
    return _context


def worker_name() -> str:
    return f"labelloop-{socket.gethostname()}-{os.getpid()}"


def run_worker(trainer: Trainer, redis: Redis, *, burst: bool = False) -> None:
    """`labelloop worker`: take jobs from the queue until stopped (SIGTERM/Ctrl-C: RQ finishes
    the job at hand first), with the maintenance pass every `poll_seconds` beside it."""
    from rq import SimpleWorker

    global _context
    runner = QueueRunner(redis)
    trainer.runner = runner
    name = worker_name()
    _context = _WorkerContext(trainer=trainer, runner=runner, name=name)
    stop = threading.Event()

    def maintenance() -> None:
        period = max(trainer.settings.poll_seconds, 1.0)
        while not stop.is_set():
            try:
                for job in trainer.ledger.expire_leases():
                    logger.warning(
                        "Project %d's job re-queued as %d: its worker was lost",
                        job.project_id,
                        job.id,
                    )
                trainer.maintain()
                runner.resubmit(trainer.ledger.pending_jobs())
            except Exception:  # noqa: BLE001 - a database or Redis outage: next round retries
                logger.warning("Worker maintenance failed; retrying", exc_info=True)
            stop.wait(period)

    thread = threading.Thread(target=maintenance, name="maintenance", daemon=True)
    thread.start()
    logger.info("Worker %s takes jobs from %s", name, runner.queue.name)
    try:
        SimpleWorker([runner.queue], connection=redis, name=name).work(
            burst=burst, logging_level=logging.getLevelName(logging.getLogger().level)
        )
    finally:
        stop.set()
        thread.join(timeout=30)
        _context = None
