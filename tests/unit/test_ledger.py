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
from helpers import wait_until

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


@pytest.fixture()
def ledger(tmp_path: Path):
    with Ledger(tmp_path / "ledger.sqlite3") as opened:
        yield opened


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


# --------------------------------------------------------------------------- durability


def test_restart_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "model" / "ledger.sqlite3"  # the folder is made if missing
    with Ledger(path) as ledger:
        ledger.upsert([rec(1, 10, at=1), rec(2, 10, ("b",), at=2), rec(3, 11)])
        ledger.delete([3])
        ledger.set_label_config(P, CONFIG)
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
        # Job ids are never reused across restarts.
        assert reopened.create_job(P, "fast", "auto").id == job.id + 1


def test_other_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(LedgerError, match="schema version 2"):
        Ledger(path)


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
