"""The Redis queue of the distributed mode (loop/queue.py) against a real redis-server: one RQ
job per ledger job however often it is submitted, and the ledger's queued jobs put back after
Redis lost them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redisserver import RedisServer
from rq.job import Job as RQJob

from labelloop.loop.ledger import Ledger
from labelloop.loop.queue import QueueError, QueueRunner, connect, rq_job_id, run_job


@pytest.fixture()
def runner(redis_server: RedisServer) -> QueueRunner:
    redis = connect(redis_server.url)
    redis.flushall()
    return QueueRunner(redis)


@pytest.fixture()
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    yield ledger
    ledger.close()


def test_a_job_is_queued_once_however_often_it_is_submitted(runner, ledger) -> None:
    job = ledger.request_job(3, "fast", "auto")
    again = ledger.request_job(3, "fast", "auto")  # coalesced by the ledger
    assert again.id == job.id
    for _ in range(3):
        runner.submit(again)
    runner.wake()
    runner.wake()
    assert runner.queue.job_ids == [rq_job_id(job.id), "labelloop-tick"]
    queued = RQJob.fetch(rq_job_id(job.id), connection=runner.queue.connection)
    assert queued.func_name == "labelloop.loop.queue.run_job" and queued.args == (job.id,)


def test_jobs_lost_with_redis_are_put_back_from_the_ledger(redis_server, runner, ledger) -> None:
    jobs = [ledger.request_job(p, "fast", "auto") for p in (1, 2)]
    runner.submit(jobs[0])
    assert runner.resubmit(ledger.pending_jobs()) == 1  # only the one Redis did not have
    redis_server.restart()  # no persistence: the queue is gone
    assert runner.queue.count == 0
    assert runner.resubmit(ledger.pending_jobs()) == 2
    assert sorted(runner.queue.job_ids) == sorted(rq_job_id(j.id) for j in jobs)
    # A finished job is not queued again.
    ledger.update_job(jobs[0].id, state="succeeded")
    runner.queue.empty()
    assert runner.resubmit(ledger.pending_jobs()) == 1


def test_submitting_while_redis_is_down_loses_nothing(redis_server, runner, ledger) -> None:
    job = ledger.request_job(5, "full", "start_training")
    redis_server.stop()
    try:
        runner.submit(job)  # logged, not raised: the ledger holds the job
    finally:
        redis_server.start()
    assert runner.resubmit(ledger.pending_jobs()) == 1
    assert runner.queue.job_ids == [rq_job_id(job.id)]


def test_queued_jobs_run_only_in_a_labelloop_worker() -> None:
    with pytest.raises(RuntimeError, match="labelloop worker"):
        run_job(1)


def test_a_queue_that_cannot_be_reached_says_where_and_what_to_do() -> None:
    with pytest.raises(QueueError, match=r"127\.0\.0\.1:1.*start Redis") as caught:
        connect("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(QueueError, match="redis://"):
        connect("http://127.0.0.1:6379")
