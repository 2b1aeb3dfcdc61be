"""The ledger with many writers at once on a real PostgreSQL (tests/postgres.py), as serving
replicas and workers use it: threads with a Ledger each (a connection pool each, as separate
replicas have) and forked processes; and a PostgreSQL restart under a live Ledger.

The tests across processes, and the start-up races, run on a SQLite file as well: the rules
are the same on both.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from helpers import wait_until

from labelloop.labelstudio.annotations import AnnotationRecord
from labelloop.loop.ledger import _PG_LOCK_KEY, Ledger, LedgerError

pytestmark = pytest.mark.slow

P = 1
T = TypeVar("T")
# fork: a child inherits the imports (labelloop.store imports torch: seconds per spawned child)
# and runs a local function. It opens its own Ledger, never one of the parent's.
FORK = multiprocessing.get_context("fork")
TIMEOUT_S = 120


def rec(annotation_id: int, version: int, *, project_id: int = P) -> AnnotationRecord:
    """Annotation ``annotation_id`` (of task ``annotation_id``) as saved the ``version``-th
    time: labels "v<version>", updated ``version`` seconds after midnight."""
    return AnnotationRecord(
        project_id=project_id,
        annotation_id=annotation_id,
        task_id=annotation_id,
        image_ref=f"/data/upload/{project_id}/{annotation_id}.png",
        labels={"c": (f"v{version}",)},
        updated_at=f"2026-11-25T00:{version // 60:02d}:{version % 60:02d}Z",
        was_cancelled=False,
        ground_truth=False,
        completed_by=1,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "ledger.sqlite3"
    return request.getfixturevalue("postgres_url")


def run_threads(work: Callable[[int], T], n: int) -> list[T]:
    """``work(0..n-1)`` on n threads at once; each calls it after all have started."""
    barrier = threading.Barrier(n)
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=TIMEOUT_S)
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - raised in the test's thread below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish in time"
    if errors:
        raise errors[0]
    return [results[i] for i in range(n)]


def run_processes(work: Callable[[int], Any], n: int) -> list[Any]:
    """``work(0..n-1)`` in n forked processes; their results (picklable) in order. Every
    process is gone when this returns, also on failure."""
    queue = FORK.Queue()
    processes = [FORK.Process(target=_child, args=(work, i, queue), daemon=True) for i in range(n)]
    results: dict[int, Any] = {}
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + TIMEOUT_S
        for _ in processes:
            i, ok, value = queue.get(timeout=max(0.1, deadline - time.monotonic()))
            assert ok, f"process {i} failed: {value}"
            results[i] = value
        for process in processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            assert process.exitcode == 0, f"process {process.pid} exited with {process.exitcode}"
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
        queue.close()
    return [results[i] for i in range(n)]


def _child(work: Callable[[int], Any], i: int, queue: Any) -> None:
    try:
        queue.put((i, True, work(i)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((i, False, f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------- annotations


def test_concurrent_upserts_keep_the_newest(postgres_url: str) -> None:
    """Eight replicas receive the same 20 annotations' six saves, each in its own order: one
    row per annotation remains, the newest save's, and every change counted is in change_seq."""
    n, versions, ids = 8, 6, range(1, 21)
    orders = [random.Random(i).sample(range(versions), versions) for i in range(n)]
    ledgers = [Ledger(postgres_url) for _ in range(n)]
    try:
        changed = run_threads(
            lambda i: sum(ledgers[i].upsert([rec(a, v) for a in ids]) for v in orders[i]), n
        )
    finally:
        for ledger in ledgers:
            ledger.close()
    newest = versions - 1
    with Ledger(postgres_url) as ledger:
        examples = ledger.training_set(P)
        assert [(e.annotation_id, e.labels, e.updated_at) for e in examples] == [
            (a, {"c": (f"v{newest}",)}, rec(a, newest).updated_at) for a in ids
        ]
        assert (ledger.stats(P)["annotations"], ledger.stats(P)["live"]) == (20, 20)
        assert ledger.change_seq(P) == sum(changed)


# --------------------------------------------------------------------------- jobs


def test_concurrent_requests_queue_one_job_per_project_and_kind(postgres_url: str) -> None:
    n = 12
    wanted = [(project, kind) for project in (1, 2) for kind in ("fast", "full")]
    ledgers = [Ledger(postgres_url) for _ in range(n)]

    def request(i: int) -> dict[tuple[int, str], int]:
        order = random.Random(i).sample(wanted, len(wanted))
        return {(p, k): ledgers[i].request_job(p, k, "auto").id for p, k in order}

    try:
        for _ in range(3):  # each round on a queue emptied by the previous one
            answers = run_threads(request, n)
            for key in wanted:
                assert len({answer[key] for answer in answers}) == 1, key
            pending = ledgers[0].pending_jobs()
            assert sorted((job.project_id, job.kind) for job in pending) == wanted
            assert {job.id for job in pending} == set(answers[0].values())
            for job in pending:
                ledgers[0].update_job(job.id, state="succeeded", finished_at=time.time())
    finally:
        for ledger in ledgers:
            ledger.close()


def test_one_claim_wins_per_project_across_processes(location: Path | str) -> None:
    """Two worker processes claim at the same moment, ten times: the same job (even rounds) or
    the project's two jobs (odd rounds). Each time exactly one of them runs a job."""
    rounds = 10
    with Ledger(location) as ledger:
        jobs = []
        for r in range(rounds):
            fast = ledger.create_job(100 + r, "fast", "auto").id
            full = fast if r % 2 == 0 else ledger.create_job(100 + r, "full", "auto").id
            jobs.append((fast, full))
    barrier = FORK.Barrier(2)

    def claim(i: int) -> list[bool]:
        with Ledger(location) as mine:
            won = []
            for pair in jobs:
                barrier.wait(timeout=TIMEOUT_S)
                won.append(mine.claim_job(pair[i], worker=f"worker-{i}", lease_s=60) is not None)
            return won

    first, second = run_processes(claim, 2)
    assert [a + b for a, b in zip(first, second, strict=True)] == [1] * rounds
    with Ledger(location) as ledger:
        for r, pair in enumerate(jobs):
            states = sorted(job.state for job in ledger.jobs(project_id=100 + r))
            assert states == (["running"] if pair[0] == pair[1] else ["queued", "running"])
            winner = 0 if first[r] else 1
            won = ledger.job(pair[winner])
            assert won is not None and (won.state, won.worker) == ("running", f"worker-{winner}")


def test_an_expired_lease_is_requeued_exactly_once(location: Path | str) -> None:
    with Ledger(location) as ledger:
        job = ledger.claim_job(ledger.create_job(P, "fast", "auto").id, worker="w1", lease_s=0.2)
        assert job is not None and job.lease_until is not None
        lease_until = job.lease_until
        wait_until(lambda: time.time() > lease_until, timeout_s=10, what="the lease to pass")
        ledgers = [Ledger(location) for _ in range(6)]
        try:
            requeued = run_threads(lambda i: ledgers[i].expire_leases(), len(ledgers))
        finally:
            for other in ledgers:
                other.close()
        (new,) = [new for batch in requeued for new in batch]
        assert (new.trigger, new.state, new.kind) == ("recovery", "queued", "fast")
        lost = ledger.job(job.id)
        assert lost is not None
        assert (lost.state, lost.error) == ("failed", "worker lost: its lease expired")
        assert ledger.pending_jobs() == [new]
        assert ledger.expire_leases() == []


def test_version_numbers_are_unique_across_processes(location: Path | str) -> None:
    Ledger(location).close()  # the schema, before the processes race on the numbers
    per_process = 25

    def numbers(_: int) -> list[int]:
        with Ledger(location) as mine:
            return [mine.next_version_number("project-1") for _ in range(per_process)]

    results = run_processes(numbers, 4)
    for got in results:
        assert got == sorted(set(got)), got  # increasing in each process
    assert sorted(n for got in results for n in got) == list(range(1, 4 * per_process + 1))


# --------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("schema", ["empty", "version 1"])
def test_replicas_starting_together_set_the_schema_up_once(
    location: Path | str, schema: str
) -> None:
    if schema == "version 1":
        with Ledger(location) as ledger:
            ledger.create_job(P, "fast", "auto")
        _downgrade_to_v1(location)
    ledgers = run_threads(lambda _: Ledger(location), 6)
    try:
        for ledger in ledgers:
            assert ledger.next_version_number("lineage") >= 1
        assert sorted(ledger.next_version_number("other") for ledger in ledgers) == [
            1,
            2,
            3,
            4,
            5,
            6,
        ]
    finally:
        for ledger in ledgers:
            ledger.close()


def _downgrade_to_v1(location: Path | str) -> None:
    import sqlalchemy

    url = f"sqlite:///{location}" if isinstance(location, Path) else location
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            for statement in (
                "ALTER TABLE jobs DROP COLUMN worker",
                "ALTER TABLE jobs DROP COLUMN lease_until",
                "DROP TABLE version_counters",
                "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
            ):
                conn.execute(sqlalchemy.text(statement))
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- restarts


def test_a_postgresql_restart_under_a_live_ledger(postgres_server: Any, postgres_url: str) -> None:
    """Idle through a restart, failing while PostgreSQL is down (also in the middle of a
    write), and working again once it is back: the same Ledger object, nothing committed lost.
    The URL carries a password (trust authentication ignores it) that no message may show."""
    url = postgres_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@", 1)
    ledger = Ledger(url)
    try:
        assert ledger.upsert([rec(a, 1) for a in range(1, 11)]) == 10
        job = ledger.request_job(P, "fast", "auto")
        assert ledger.next_version_number("lineage") == 1

        # The pool's connections died with the server: pre-ping replaces them, no call fails.
        postgres_server.restart()
        assert ledger.upsert([rec(a, 1) for a in range(11, 21)]) == 10

        # A write waiting for the advisory lock (another replica holds it) when the server stops.
        holder = psycopg.connect(postgres_url)
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK_KEY,))
        failures: list[BaseException] = []
        writer = threading.Thread(
            target=lambda: _capture(failures, lambda: ledger.upsert([rec(99, 1)])), daemon=True
        )
        writer.start()
        wait_until(lambda: _lock_waiters(postgres_url) > 0, timeout_s=30, what="the write to wait")
        postgres_server.stop()
        writer.join(timeout=TIMEOUT_S)
        holder.close()
        assert not writer.is_alive()
        assert [type(exc) for exc in failures] == [LedgerError]

        # Down: reads and writes fail at once with a message that says what to do.
        calls: list[Callable[[], object]] = [
            lambda: ledger.upsert([rec(21, 1)]),
            ledger.pending_jobs,
            lambda: ledger.claim_job(job.id, worker="w1", lease_s=60),
        ]
        for call in calls:
            with pytest.raises(LedgerError) as caught:
                call()
            message = str(caught.value)
            assert message.startswith(f"the annotation ledger {ledger.url} cannot be reached: ")
            assert ":***@127.0.0.1:" in ledger.url
            assert "check that PostgreSQL is running and accepts connections there" in message
            assert "s3cret" not in message
        assert "s3cret" not in str(failures[0])
        with pytest.raises(LedgerError, match="cannot open the annotation ledger") as caught:
            Ledger(url)
        assert "s3cret" not in str(caught.value)

        postgres_server.start()
        assert ledger.upsert([rec(21, 1)]) == 1
        examples = ledger.training_set(P)
        assert [e.annotation_id for e in examples] == list(range(1, 22))  # 99 never committed
        assert ledger.change_seq(P) == 21
        assert ledger.pending_jobs() == [job]
        assert ledger.next_version_number("lineage") == 2
    finally:
        ledger.close()
        if not postgres_server.running:  # the next tests share the server
            postgres_server.start()


def _capture(failures: list[BaseException], call: Callable[[], object]) -> None:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - asserted by the test
        failures.append(exc)


def _lock_waiters(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchone()
    return int(row[0]) if row else 0
