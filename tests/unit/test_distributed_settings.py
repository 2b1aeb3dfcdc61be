"""The distributed mode's own logic: its settings, and a worker's claimed run of a job (one job
per project at a time, the lease renewed while it runs)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from helpers import wait_until

from labelloop.config import ConfigError
from labelloop.labelstudio.annotations import AnnotationRecord
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.urls import FetchSettings
from labelloop.loop.ledger import Ledger
from labelloop.loop.trainer import Trainer, TrainerSettings
from labelloop.loop.updates import NothingToTrain
from labelloop.ml.embeddings import EmbeddingCache
from labelloop.runtime.projects import ProjectModels
from labelloop.serve.settings import settings_from

PG = "postgresql://labelloop:s3cret@db.example:5432/labelloop"


def test_the_three_switches(tmp_path: Path) -> None:
    embedded = settings_from({"model_dir": tmp_path}, {})
    assert not embedded.distributed
    assert embedded.ledger_location() == tmp_path / "ledger.sqlite3"
    env = {
        "LABELLOOP_DATABASE_URL": PG,
        "LABELLOOP_STORE_URL": "s3://models/labelloop",
        "LABELLOOP_QUEUE_URL": "redis://:hunter2@redis.example:6379/0",
        "LABELLOOP_STORE_POLL_SECONDS": "0.5",
    }
    settings = settings_from({"model_dir": tmp_path}, env)
    assert settings.distributed and settings.ledger_location() == PG
    assert settings.store_url == "s3://models/labelloop" and settings.store_poll_seconds == 0.5
    # Passwords in the URLs never show in the settings' repr (logs, tracebacks).
    assert "s3cret" not in repr(settings) and "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LABELLOOP_QUEUE_URL": "redis://r:6379/0"}, "needs LABELLOOP_DATABASE_URL too"),
        ({"LABELLOOP_DATABASE_URL": "mysql://db/x"}, "must be a postgresql:// URL"),
        ({"LABELLOOP_DATABASE_URL": PG, "LABELLOOP_QUEUE_URL": "amqp://q"}, "redis://"),
        ({"LABELLOOP_STORE_URL": "models/labelloop"}, "s3://bucket/prefix"),
        ({"LABELLOOP_STORE_POLL_SECONDS": "0"}, "LABELLOOP_STORE_POLL_SECONDS"),
    ],
)
def test_bad_distributed_settings_say_what_to_fix(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from({"model_dir": tmp_path}, env)


def make_trainer(tmp_path: Path, ledger: Ledger, **settings: object) -> Trainer:
    return Trainer(
        models=ProjectModels(tmp_path / "model"),
        ledger=ledger,
        fetcher=lambda: ImageFetcher(FetchSettings(label_studio_url="http://127.0.0.1:1"), None),
        embeddings=EmbeddingCache(tmp_path / "embeddings.sqlite3"),
        settings=TrainerSettings(**settings),
    )


def test_a_running_job_holds_back_automatic_training_of_its_project(tmp_path: Path) -> None:
    """A worker's maintenance runs beside the job: the changes the job is training on must not
    queue a second job before the first one records what it trained on."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    trainer = make_trainer(tmp_path, ledger, auto_train_after=10, quiet_seconds=3600)
    ledger.upsert(
        [
            AnnotationRecord(
                4,
                100 + i,
                1 + i,
                f"/x/{i}.png",
                {"c": ("a",)},
                "2026-12-01T00:00:00Z",
                False,
                False,
                1,
            )
            for i in range(12)
        ]
    )
    running = ledger.create_job(4, "fast", "auto")
    assert ledger.claim_job(running.id, worker="w1", lease_s=30) is not None
    trainer.queue_due_jobs()
    assert ledger.pending_jobs() == []
    ledger.update_job(running.id, state="succeeded", trained_seq=10)
    trainer.queue_due_jobs()
    assert ledger.pending_jobs() == []  # 2 changes since: fewer than 10, and not quiet
    ledger.update_job(running.id, trained_seq=0)
    trainer.queue_due_jobs()
    assert [j.trigger for j in ledger.pending_jobs()] == ["auto"]
    ledger.close()


def test_a_claimed_run_holds_its_project_and_renews_its_lease(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    trainer = make_trainer(tmp_path, ledger)
    release = threading.Event()

    def blocked_update(job):
        release.wait(timeout=30)
        raise NothingToTrain("nothing to train in this test")

    trainer.updater.run = blocked_update  # type: ignore[method-assign]
    first = ledger.create_job(4, "fast", "auto")
    second = ledger.create_job(4, "full", "auto")
    other = ledger.create_job(5, "fast", "auto")
    outcome: list[object] = []
    runner = threading.Thread(
        target=lambda: outcome.append(trainer.run_claimed(first.id, worker="w1", lease_s=0.3))
    )
    runner.start()
    try:
        claimed = wait_until(
            lambda: (j := ledger.job(first.id)).state == "running" and j,
            timeout_s=10,
            what="the first job to be claimed",
            interval_s=0.02,
        )
        assert claimed.worker == "w1"
        # Its project is busy for every other worker; another project is not.
        assert trainer.run_claimed(second.id, worker="w2", lease_s=0.3) is None
        assert ledger.job(second.id).state == "queued"
        wait_until(
            lambda: ledger.job(first.id).lease_until > claimed.lease_until,
            timeout_s=10,
            what="the lease to be renewed while the job runs",
            interval_s=0.02,
        )
        assert ledger.claim_job(other.id, worker="w2", lease_s=30) is not None
    finally:
        release.set()
        runner.join(timeout=30)
    [done] = outcome
    assert done.state == "skipped" and done.error == "nothing to train in this test"
    # The project is free again: the next job is claimable.
    release.set()
    assert trainer.run_claimed(second.id, worker="w2", lease_s=0.3).state == "skipped"
    # A job already run is not run twice.
    assert trainer.run_claimed(first.id, worker="w3", lease_s=0.3) is None
    ledger.close()
