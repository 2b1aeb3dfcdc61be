"""The annotation ledger and job store: training-set rules, change counting, durability."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy
from helpers import wait_until

from labelloop.dev.launcher import free_port
from labelloop.labelstudio.annotations import AnnotationRecord
from labelloop.loop.ledger import Ledger, LedgerError, ReconcileResult

P = 1  # project id
CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="c" toName="image" '
    'choice="multiple"><Choice value="a"/><Choice value="b"/></Choices></View>'
)


def rec(
    annotation_id: int,
    task_id: int,
    labels: tuple[str, ...] = ("a",),
    *,
    at: int = 0,
    project_id: int = P,
    image: str | None = "auto",
    cancelled: bool = False,
    gt: bool = False,
) -> AnnotationRecord:
    return AnnotationRecord(
        project_id=project_id,
        annotation_id=annotation_id,
        task_id=task_id,
        image_ref=f"/data/upload/{project_id}/{task_id}.png" if image == "auto" else image,
        labels={"c": labels},
        updated_at=f"2026-11-25T00:{at // 60:02d}:{at % 60:02d}Z",
        was_cancelled=cancelled,
        ground_truth=gt,
        completed_by=1,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's ledger lives: a SQLite file, or a fresh database of a real PostgreSQL
    (tests/postgres.py; only started when a PostgreSQL test runs)."""
    if request.param == "sqlite":
        return tmp_path / "ledger.sqlite3"
    return request.getfixturevalue("postgres_url")


@pytest.fixture()
def ledger(location: Path | str):
    with Ledger(location) as opened:
        yield opened


def raw_sql(location: Path | str, *statements: str) -> list[list[tuple]]:
    """Run SQL on the ledger's database behind its back, in one transaction; the rows of each
    statement (empty for those that return none)."""
    url = f"sqlite:///{location}" if isinstance(location, Path) else location
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            results = [conn.execute(sqlalchemy.text(statement)) for statement in statements]
            return [[tuple(row) for row in r] if r.returns_rows else [] for r in results]
    finally:
        engine.dispose()


def picked(ledger: Ledger, project_id: int = P) -> dict[int, tuple[int, tuple[str, ...]]]:
    """task -> (winning annotation, its labels)."""
    return {e.task_id: (e.annotation_id, e.labels["c"]) for e in ledger.training_set(project_id)}


# --------------------------------------------------------------------------- training set


def test_create_update_and_latest_wins(ledger: Ledger) -> None:
    assert ledger.upsert([rec(1, 10, ("a",), at=1), rec(2, 11, ("b",), at=1)]) == 2
    assert ledger.upsert([rec(1, 10, ("b",), at=2)]) == 1
    assert picked(ledger) == {10: (1, ("b",)), 11: (2, ("b",))}
    # A second annotator on task 10, later: the latest annotation labels the task.
    ledger.upsert([rec(3, 10, (), at=5)])
    assert picked(ledger)[10] == (3, ())
    example = ledger.training_set(P)[0]
    assert (example.image_ref, example.updated_at, example.ground_truth) == (
        "/data/upload/1/10.png",
        "2026-11-25T00:00:05Z",
        False,
    )


def test_equal_times_break_ties_by_annotation_id(ledger: Ledger) -> None:
    ledger.upsert([rec(5, 10, ("a",), at=3), rec(4, 10, ("b",), at=3)])
    assert picked(ledger) == {10: (5, ("a",))}


def test_ground_truth_wins_even_if_older(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10, ("a",), at=1, gt=True), rec(2, 10, ("b",), at=9)])
    assert picked(ledger) == {10: (1, ("a",))}
    assert ledger.training_set(P)[0].ground_truth
    ledger.upsert([rec(3, 10, ("b",), at=5, gt=True)])
    assert picked(ledger) == {10: (3, ("b",))}  # the latest of the ground truths


def test_cancelled_is_ignored_but_older_answer_counts(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10, ("a",), at=1), rec(2, 10, (), at=5, cancelled=True)])
    ledger.upsert([rec(3, 11, (), at=1, cancelled=True)])
    assert picked(ledger) == {10: (1, ("a",))}


def test_cancelled_ground_truth_does_not_win(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10, ("a",), at=1), rec(2, 10, ("b",), at=5, cancelled=True, gt=True)])
    assert picked(ledger) == {10: (1, ("a",))}


def test_deleted_leaves_the_set(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10, ("a",), at=1), rec(2, 10, ("b",), at=2), rec(3, 11)])
    assert ledger.delete([2, 3, 999]) == 2
    assert picked(ledger) == {10: (1, ("a",))}
    assert ledger.delete([2]) == 0  # already deleted: not a change


def test_delete_is_final_for_upsert(ledger: Ledger) -> None:
    """An update arriving after the deletion (out of order) does not bring it back."""
    ledger.upsert([rec(1, 10, at=1)])
    ledger.delete([1])
    assert ledger.upsert([rec(1, 10, ("b",), at=9)]) == 0
    assert picked(ledger) == {}


def test_delete_limited_to_a_project(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10), rec(1, 10, project_id=2)])
    assert ledger.delete([1], project_id=2) == 1
    assert picked(ledger, P) == {10: (1, ("a",))}
    assert picked(ledger, 2) == {}


def test_out_of_order_older_update_is_ignored(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10, ("b",), at=9)])
    assert ledger.upsert([rec(1, 10, ("a",), at=1)]) == 0
    assert picked(ledger) == {10: (1, ("b",))}


def test_tasks_without_image_are_left_out_and_known_image_is_kept(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10, image=None), rec(2, 11, at=1)])
    assert set(picked(ledger)) == {11}
    # An update without the task (hence no image) keeps the image already known.
    assert ledger.upsert([rec(2, 11, ("b",), at=2, image=None)]) == 1
    assert ledger.training_set(P)[0].image_ref == "/data/upload/1/11.png"
    # Another annotation of the task may be the one that knows the image.
    ledger.upsert(
        [rec(3, 10, ("b",), at=5, image=None), rec(4, 10, at=1, cancelled=True, image=None)]
    )
    assert set(picked(ledger)) == {11}
    ledger.upsert([rec(4, 10, at=2, cancelled=True)])  # a skip of task 10, with its image
    assert picked(ledger)[10] == (3, ("b",))


def test_labels_keep_every_control_and_empty_ones(ledger: Ledger) -> None:
    record = dataclasses.replace(rec(1, 10), labels={"c": (), "d": ("x", "y")})
    ledger.upsert([record])
    assert ledger.training_set(P)[0].labels == {"c": (), "d": ("x", "y")}


def test_bad_records_are_refused_before_anything_is_written(ledger: Ledger) -> None:
    bad_time = dataclasses.replace(rec(2, 11), updated_at="soon")
    with pytest.raises(ValueError, match="ISO 8601"):
        ledger.upsert([rec(1, 10), bad_time])
    bad_labels = dataclasses.replace(rec(2, 11), labels={"c": "a"})
    with pytest.raises(ValueError, match="tuple of strings"):
        ledger.upsert([bad_labels])
    assert ledger.stats()["annotations"] == 0


# --------------------------------------------------------------------------- changes


def test_change_seq_counts_real_changes_only(ledger: Ledger) -> None:
    assert ledger.change_seq(P) == 0
    assert ledger.last_change_at(P) is None
    ledger.upsert([rec(1, 10, at=1), rec(2, 11, at=1)])
    assert ledger.change_seq(P) == 2
    first_change = ledger.last_change_at(P)
    assert first_change is not None and first_change <= time.time()

    assert ledger.upsert([rec(1, 10, at=1), rec(2, 11, at=1)]) == 0
    # A re-save with the same labels moves updated_at only: not a change either.
    assert ledger.upsert([rec(1, 10, at=3)]) == 0
    assert ledger.change_seq(P) == 2
    assert ledger.last_change_at(P) == first_change

    ledger.upsert([rec(1, 10, at=4, gt=True)])
    ledger.delete([2])
    ledger.delete([2])
    assert ledger.change_seq(P) == 4
    assert ledger.change_seq(99) == 0


def test_change_seq_is_per_project(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10), rec(2, 10, project_id=2), rec(3, 11, project_id=2)])
    assert (ledger.change_seq(P), ledger.change_seq(2)) == (1, 2)
    assert ledger.projects() == [1, 2]


# --------------------------------------------------------------------------- reconcile


def test_reconcile_adds_updates_and_tombstones(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10, at=1), rec(2, 11, at=1), rec(3, 12, at=1)])
    ledger.delete([3])
    snapshot = [rec(1, 10, at=1), rec(3, 12, at=1), rec(4, 13, at=1), rec(5, 10, ("b",), at=2)]
    seq = ledger.change_seq(P)
    # 3 is revived (the API still has it), 4 and 5 are new, 2 vanished.
    assert ledger.reconcile(P, snapshot) == ReconcileResult(added=3, updated=0, deleted=1)
    assert picked(ledger) == {10: (5, ("b",)), 12: (3, ("a",)), 13: (4, ("a",))}
    assert ledger.change_seq(P) == seq + 4
    assert ledger.reconcile(P, snapshot) == ReconcileResult(0, 0, 0)
    changed = [rec(1, 10, ("b",), at=7), *snapshot[1:]]
    assert ledger.reconcile(P, changed) == ReconcileResult(0, 1, 0)


def test_reconcile_leaves_other_projects_alone(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10), rec(2, 10, project_id=2)])
    assert ledger.reconcile(P, []) == ReconcileResult(0, 0, 1)
    assert picked(ledger, 2) == {10: (2, ("a",))}
    with pytest.raises(ValueError, match="projects \\[2\\]"):
        ledger.reconcile(P, [rec(3, 10, project_id=2)])


def test_reconcile_as_of_keeps_what_arrived_after_the_snapshot(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10), rec(2, 11)])
    as_of = time.time()
    # The next write must be stamped after the snapshot: wait for the clock, not a duration.
    wait_until(lambda: time.time() > as_of, timeout_s=5, what="the clock to move", interval_s=0.001)
    ledger.upsert([rec(3, 12)])  # a webhook while the snapshot was being fetched
    ledger.delete([2])  # deleted after the snapshot was taken: the snapshot is stale on it
    assert ledger.reconcile(P, [rec(2, 11)], as_of=as_of) == ReconcileResult(0, 0, 1)
    assert set(picked(ledger)) == {12}


# --------------------------------------------------------------------------- config, stats


def test_label_config(ledger: Ledger) -> None:
    assert ledger.label_config(P) is None
    assert ledger.set_label_config(P, CONFIG) is True
    assert ledger.set_label_config(P, CONFIG) is False
    assert ledger.set_label_config(P, CONFIG.replace('"b"', '"z"')) is True
    assert "z" in (ledger.label_config(P) or "")
    assert ledger.projects() == [P]
    assert ledger.change_seq(P) == 0
    with pytest.raises(ValueError, match="empty"):
        ledger.set_label_config(P, "  ")


def test_stats(ledger: Ledger) -> None:
    ledger.upsert([rec(1, 10, gt=True), rec(2, 10), rec(3, 11, cancelled=True), rec(4, 12)])
    ledger.upsert([rec(5, 10, project_id=2)])
    ledger.delete([4])
    expected = {
        "annotations": 4,
        "live": 3,
        "cancelled": 1,
        "deleted": 1,
        "ground_truth": 1,
        "training_tasks": 1,
    }
    assert ledger.stats(P) == expected
    assert ledger.stats()["annotations"] == 5
    assert ledger.stats()["training_tasks"] == 2
    assert ledger.stats(42)["annotations"] == 0


# --------------------------------------------------------------------------- jobs


def test_job_lifecycle(ledger: Ledger) -> None:
    job = ledger.create_job(P, "fast", "auto")
    assert (job.state, job.kind, job.trigger, job.metrics) == ("queued", "fast", "auto", {})
    assert ledger.pending_jobs() == [job]
    started = time.time()
    running = ledger.update_job(job.id, state="running", started_at=started, progress="fitting")
    assert (running.state, running.started_at, running.progress) == ("running", started, "fitting")
    assert ledger.pending_jobs() == []
    done = ledger.update_job(
        job.id,
        state="succeeded",
        finished_at=started + 1,
        metrics={"f1": np.float32(0.5), "per_class": np.array([0.25, float("nan")]), "n": 3},
        candidate_version="v2",
        promoted_version="v2",
        trained_seq=7,
    )
    assert done.metrics == {"f1": 0.5, "per_class": [0.25, None], "n": 3}
    assert (done.promoted_version, done.trained_seq) == ("v2", 7)
    assert json.loads(json.dumps(done.to_dict()))["metrics"]["per_class"] == [0.25, None]
    assert ledger.job(job.id) == done
    assert ledger.job(12345) is None


def test_jobs_newest_first_and_pending_oldest_first(ledger: Ledger) -> None:
    a = ledger.create_job(P, "fast", "auto")
    b = ledger.create_job(2, "fast", "start_training")
    c = ledger.create_job(P, "full", "manual")
    assert [j.id for j in ledger.jobs()] == [c.id, b.id, a.id]
    assert [j.id for j in ledger.jobs(project_id=P, limit=1)] == [c.id]
    assert [j.id for j in ledger.pending_jobs()] == [a.id, b.id, c.id]
    with pytest.raises(ValueError, match="limit"):
        ledger.jobs(limit=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"state": "done"}, "job state must be one of"),
        ({"state": None}, "job state must be one of"),
        ({"colour": "red"}, "no field 'colour'"),
        ({"id": 3}, "no field 'id'"),
        ({"metrics": [1, 2]}, "metrics must be Mapping"),
        ({"metrics": {"x": object()}}, "metrics.x is a object"),
        ({"trained_seq": "7"}, "trained_seq must be int"),
        ({"trained_seq": True}, "trained_seq must be int"),
        ({"started_at": "now"}, "started_at must be int or float"),
    ],
)
def test_update_job_validates(ledger: Ledger, fields: dict, message: str) -> None:
    job = ledger.create_job(P, "fast", "auto")
    with pytest.raises(ValueError, match=message):
        ledger.update_job(job.id, **fields)
    assert ledger.job(job.id) == job


def test_update_unknown_job(ledger: Ledger) -> None:
    with pytest.raises(KeyError, match="no training job 77"):
        ledger.update_job(77, progress="x")


def test_create_job_validates(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="non-empty kind"):
        ledger.create_job(P, "", "auto")


def test_recover_interrupted(ledger: Ledger) -> None:
    running = ledger.create_job(P, "fast", "auto")
    ledger.update_job(running.id, state="running", started_at=time.time())
    queued = ledger.create_job(2, "fast", "auto")
    finished = ledger.create_job(P, "fast", "auto")
    ledger.update_job(finished.id, state="succeeded")

    (new,) = ledger.recover_interrupted()
    failed = ledger.job(running.id)
    assert failed is not None
    assert (failed.state, failed.error) == ("failed", "interrupted (backend restarted)")
    assert failed.finished_at is not None
    assert (new.project_id, new.kind, new.trigger, new.state) == (P, "fast", "recovery", "queued")
    assert [j.id for j in ledger.pending_jobs()] == [queued.id, new.id]
    assert ledger.recover_interrupted() == []


# --------------------------------------------------------------------------- claims, leases


def test_claim_job_runs_a_queued_job_once(ledger: Ledger) -> None:
    job = ledger.create_job(P, "fast", "auto")
    before = time.time()
    claimed = ledger.claim_job(job.id, worker="w1", lease_s=30)
    assert claimed is not None
    assert (claimed.id, claimed.state, claimed.worker, claimed.progress) == (
        job.id,
        "running",
        "w1",
        "starting",
    )
    assert claimed.started_at is not None and before <= claimed.started_at <= time.time()
    assert claimed.lease_until == pytest.approx(claimed.started_at + 30)
    assert ledger.job(job.id) == claimed
    assert ledger.pending_jobs() == []
    # Running: nobody claims it again; an unknown job cannot be claimed either.
    assert ledger.claim_job(job.id, worker="w2", lease_s=30) is None
    assert ledger.claim_job(12345, worker="w2", lease_s=30) is None
    assert ledger.job(job.id) == claimed


def test_one_running_job_per_project(ledger: Ledger) -> None:
    fast = ledger.create_job(P, "fast", "auto")
    full = ledger.create_job(P, "full", "auto")
    other = ledger.create_job(2, "fast", "auto")
    assert ledger.claim_job(fast.id, worker="w1", lease_s=30) is not None
    assert ledger.claim_job(full.id, worker="w2", lease_s=30) is None
    assert ledger.job(full.id) == full  # still queued, untouched
    assert ledger.claim_job(other.id, worker="w2", lease_s=30) is not None  # another project
    ledger.update_job(fast.id, state="succeeded", finished_at=time.time())
    claimed = ledger.claim_job(full.id, worker="w2", lease_s=30)
    assert claimed is not None and claimed.worker == "w2"
    # A job the embedded trainer runs (no worker) counts as running too.
    embedded = ledger.create_job(3, "fast", "auto")
    ledger.update_job(embedded.id, state="running", started_at=time.time())
    assert ledger.claim_job(ledger.create_job(3, "full", "auto").id, worker="w", lease_s=9) is None


@pytest.mark.parametrize(
    ("worker", "lease_s", "message"),
    [
        ("", 30, "non-empty name"),
        ("w1", 0, "positive number of seconds"),
        ("w1", float("nan"), "positive number of seconds"),
        ("w1", True, "positive number of seconds"),
    ],
)
def test_claim_and_renew_validate(
    ledger: Ledger, worker: str, lease_s: float, message: str
) -> None:
    job = ledger.create_job(P, "fast", "auto")
    with pytest.raises(ValueError, match=message):
        ledger.claim_job(job.id, worker=worker, lease_s=lease_s)
    with pytest.raises(ValueError, match=message):
        ledger.renew_lease(job.id, worker=worker, lease_s=lease_s)
    assert ledger.job(job.id) == job


def test_renew_lease(ledger: Ledger) -> None:
    job = ledger.create_job(P, "fast", "auto")
    claimed = ledger.claim_job(job.id, worker="w1", lease_s=1)
    assert claimed is not None and claimed.lease_until is not None
    assert ledger.renew_lease(job.id, worker="w1", lease_s=600) is True
    renewed = ledger.job(job.id)
    assert renewed is not None and renewed.lease_until is not None
    assert renewed.lease_until >= claimed.lease_until + 599
    assert renewed == dataclasses.replace(claimed, lease_until=renewed.lease_until)
    assert ledger.renew_lease(job.id, worker="w2", lease_s=600) is False  # not its job
    assert ledger.renew_lease(999, worker="w1", lease_s=600) is False
    ledger.update_job(job.id, state="succeeded", finished_at=time.time())
    assert ledger.renew_lease(job.id, worker="w1", lease_s=600) is False  # finished


def test_expire_leases_requeues_a_lost_job_once(ledger: Ledger) -> None:
    lost = ledger.claim_job(ledger.create_job(P, "fast", "auto").id, worker="w1", lease_s=10)
    alive = ledger.claim_job(ledger.create_job(2, "full", "auto").id, worker="w2", lease_s=1000)
    embedded = ledger.create_job(3, "fast", "auto")
    ledger.update_job(embedded.id, state="running", started_at=time.time())
    assert lost is not None and lost.lease_until is not None and alive is not None
    assert ledger.expire_leases() == []  # nothing has expired yet

    (new,) = ledger.expire_leases(now=lost.lease_until + 1)
    failed = ledger.job(lost.id)
    assert failed is not None and failed.finished_at is not None
    assert (failed.state, failed.error) == ("failed", "worker lost: its lease expired")
    assert (new.project_id, new.kind, new.trigger, new.state) == (P, "fast", "recovery", "queued")
    assert ledger.expire_leases(now=lost.lease_until + 1) == []  # once
    assert ledger.job(alive.id) == alive
    assert ledger.job(embedded.id).state == "running"  # no lease: recover_interrupted's job
    # The lost worker learns it at its next renewal; the project is free for the new job.
    assert ledger.renew_lease(lost.id, worker="w1", lease_s=10) is False
    assert ledger.claim_job(new.id, worker="w3", lease_s=10) is not None


def test_recover_interrupted_leaves_the_workers_jobs_alone(ledger: Ledger) -> None:
    leased = ledger.claim_job(ledger.create_job(P, "fast", "auto").id, worker="w1", lease_s=600)
    assert ledger.recover_interrupted() == []
    assert ledger.job(leased.id) == leased  # type: ignore[union-attr]


# --------------------------------------------------------------------------- version numbers


def test_next_version_number(ledger: Ledger) -> None:
    assert [ledger.next_version_number("p1") for _ in range(3)] == [1, 2, 3]
    assert ledger.next_version_number("p2") == 1  # one counter per lineage
    assert ledger.next_version_number("p1", at_least=10) == 10
    assert ledger.next_version_number("p1", at_least=5) == 11  # never backwards
    assert ledger.next_version_number("p3", at_least=7) == 7
    with pytest.raises(ValueError, match="non-empty lineage"):
        ledger.next_version_number("")
    with pytest.raises(ValueError, match="at_least must be an integer"):
        ledger.next_version_number("p1", at_least=2.5)  # type: ignore[arg-type]
    assert ledger.next_version_number("p1") == 12


# --------------------------------------------------------------------------- durability


def test_restart_keeps_everything(location: Path | str) -> None:
    # A SQLite ledger's folder is made if missing.
    path = location.parent / "model" / location.name if isinstance(location, Path) else location
    with Ledger(path) as ledger:
        ledger.upsert([rec(1, 10, at=1), rec(2, 10, ("b",), at=2), rec(3, 11)])
        ledger.delete([3])
        ledger.set_label_config(P, CONFIG)
        ledger.claim_job(ledger.create_job(2, "full", "auto").id, worker="w1", lease_s=60)
        assert ledger.next_version_number("lineage") == 1
        job = ledger.create_job(P, "fast", "auto")
        ledger.update_job(job.id, state="running", metrics={"f1": 0.5})
        before = (ledger.training_set(P), ledger.change_seq(P), ledger.stats(), ledger.jobs())
        last_change = ledger.last_change_at(P)
    with Ledger(path) as reopened:
        after = (
            reopened.training_set(P),
            reopened.change_seq(P),
            reopened.stats(),
            reopened.jobs(),
        )
        assert after == before
        assert reopened.label_config(P) == CONFIG
        assert reopened.last_change_at(P) == last_change
        # Job ids are never reused across restarts, nor version numbers.
        assert reopened.create_job(P, "fast", "auto").id == job.id + 1
        assert reopened.next_version_number("lineage") == 2


def test_other_schema_version_is_refused(location: Path | str) -> None:
    Ledger(location).close()
    raw_sql(location, "UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    with pytest.raises(
        LedgerError, match="schema version 3, this labelloop reads versions up to 2"
    ):
        Ledger(location)


def test_unreadable_file_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"not a database at all, just text" * 100)
    with pytest.raises(LedgerError, match="cannot open the annotation ledger"):
        Ledger(path)


def test_concurrent_upserts_all_land(ledger: Ledger) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(50):
                annotation_id = worker * 1000 + i
                ledger.upsert([rec(annotation_id, annotation_id, at=i)])
                if i % 10 == 0:
                    ledger.training_set(P)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(ledger.training_set(P)) == 400
    assert ledger.change_seq(P) == 400


# --------------------------------------------------------------------------- schema versions

# Schema 1 as labelloop wrote it before claims and counters (git show 553856d:src/labelloop/
# loop/ledger.py), verbatim: the files in the field look like this.
V1_SCHEMA = (
    """CREATE TABLE projects (
        project_id INTEGER PRIMARY KEY,
        label_config TEXT,
        change_seq INTEGER NOT NULL DEFAULT 0,
        last_change_at REAL
    )""",
    """CREATE TABLE annotations (
        project_id INTEGER NOT NULL REFERENCES projects (project_id),
        annotation_id INTEGER NOT NULL,
        task_id INTEGER NOT NULL,
        image_ref TEXT,
        labels TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        updated_ts REAL NOT NULL,
        was_cancelled INTEGER NOT NULL,
        ground_truth INTEGER NOT NULL,
        completed_by INTEGER,
        received_at REAL NOT NULL,
        deleted_at REAL,
        PRIMARY KEY (project_id, annotation_id)
    )""",
    "CREATE INDEX annotations_by_task ON annotations (project_id, task_id)",
    # ANNOTATIONS_DELETED may come without a usable project: deletes look ids up alone.
    "CREATE INDEX annotations_by_id ON annotations (annotation_id)",
    # AUTOINCREMENT: a job id is never reused, even after the newest job is gone.
    """CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        project_id INTEGER NOT NULL REFERENCES projects (project_id),
        kind TEXT NOT NULL,
        trigger TEXT NOT NULL,
        state TEXT NOT NULL,
        requested_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        progress TEXT,
        metrics TEXT,
        error TEXT,
        candidate_version TEXT,
        promoted_version TEXT,
        trained_seq INTEGER
    )""",
    "CREATE INDEX jobs_by_state ON jobs (state, id)",
)


def make_v1_file(path: Path) -> None:
    """A schema-1 ledger: two annotations (one deleted), a finished and a running job, and a
    third job removed, so that AUTOINCREMENT has handed out id 3 already."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        for statement in V1_SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
        conn.execute(
            "INSERT INTO projects VALUES (1, ?, 2, 1764031000.5)",
            (CONFIG,),
        )
        for annotation_id, task_id, deleted_at in ((1, 10, None), (2, 11, 1764031000.5)):
            conn.execute(
                'INSERT INTO annotations VALUES (1, ?, ?, ?, \'{"c": ["a"]}\','
                " '2026-11-25T00:00:01Z', 1795568401.0, 0, 0, 1, 1764031000.0, ?)",
                (annotation_id, task_id, f"/data/upload/1/{task_id}.png", deleted_at),
            )
        for state in ("succeeded", "running", "queued"):
            conn.execute(
                "INSERT INTO jobs (project_id, kind, trigger, state, requested_at)"
                " VALUES (1, 'fast', 'auto', ?, 1764031000.0)",
                (state,),
            )
        conn.execute("DELETE FROM jobs WHERE id = 3")
    conn.close()


def test_schema_1_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    make_v1_file(path)
    with Ledger(path) as ledger:
        assert picked(ledger) == {10: (1, ("a",))}
        assert (ledger.change_seq(P), ledger.last_change_at(P)) == (2, 1764031000.5)
        assert ledger.label_config(P) == CONFIG
        assert (ledger.stats(P)["annotations"], ledger.stats(P)["deleted"]) == (2, 1)
        jobs = [(j.id, j.state, j.worker, j.lease_until) for j in ledger.jobs()]
        assert jobs == [(2, "running", None, None), (1, "succeeded", None, None)]
        (recovered,) = ledger.recover_interrupted()  # a schema-1 running job has no lease
        assert recovered.id == 4  # ids are still never reused
        claimed = ledger.claim_job(recovered.id, worker="w1", lease_s=60)
        assert claimed is not None and claimed.worker == "w1"
        assert ledger.next_version_number("lineage") == 1
    assert raw_sql(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [[("2",)]]
    conn = sqlite3.connect(path)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
        assert columns[-2:] == ["worker", "lease_until"]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    with Ledger(path) as reopened:  # a migrated file opens as it is
        assert reopened.next_version_number("lineage") == 2
        assert reopened.job(4) == claimed


def test_schema_1_database_is_migrated(location: Path | str) -> None:
    """Either database, taken back to schema 1 behind the ledger's back."""
    with Ledger(location) as ledger:
        ledger.upsert([rec(1, 10)])
        job = ledger.create_job(P, "fast", "auto")
    raw_sql(
        location,
        "ALTER TABLE jobs DROP COLUMN worker",
        "ALTER TABLE jobs DROP COLUMN lease_until",
        "DROP TABLE version_counters",
        "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
    )
    with Ledger(location) as ledger:
        assert ledger.job(job.id) == job
        assert picked(ledger) == {10: (1, ("a",))}
        assert ledger.claim_job(job.id, worker="w1", lease_s=60) is not None
        assert ledger.next_version_number("lineage") == 1
    assert raw_sql(location, "SELECT value FROM meta WHERE key = 'schema_version'") == [[("2",)]]


def test_sqlite_connections_are_durable_and_strict(tmp_path: Path) -> None:
    """Every pooled connection: WAL, synchronous=FULL, foreign keys, a 5 s busy timeout."""
    names = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        assert ledger._engine is not None
        with ledger._engine.connect() as conn:
            values = [conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in names]
    assert values == ["wal", 2, 1, 5000]  # 2: FULL


# --------------------------------------------------------------------------- locations


def test_sqlite_url_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with Ledger(f"sqlite:///{path}") as ledger:
        ledger.upsert([rec(1, 10)])
        assert ledger.path == path
    with Ledger(path) as ledger:
        assert set(picked(ledger)) == {10}


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("mysql://user:s3cret@db/ledger", "neither a SQLite file nor a PostgreSQL database"),
        ("sqlite://", "neither a SQLite file"),  # in memory: not durable
        ("postgresql+asyncpg://user:s3cret@db/ledger", "through psycopg 3"),
        ("postgresql://user:s3cret@db:port/ledger", "not a database URL"),
    ],
)
def test_bad_locations_are_refused(location: str, message: str) -> None:
    with pytest.raises(LedgerError, match=message) as caught:
        Ledger(location)
    assert "s3cret" not in str(caught.value)


def test_unreachable_postgresql_gives_a_clear_error() -> None:
    url = f"postgresql://labelloop:s3cret@127.0.0.1:{free_port()}/ledger"
    with pytest.raises(LedgerError) as caught:
        Ledger(url)
    message = str(caught.value)
    assert message.startswith(
        "cannot open the annotation ledger postgresql+psycopg://labelloop:***@127.0.0.1:"
    )
    assert "Connection refused" in message and "check that PostgreSQL runs there" in message
    assert "s3cret" not in message
