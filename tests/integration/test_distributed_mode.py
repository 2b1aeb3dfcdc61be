"""The distributed mode with its real engines, all on 127.0.0.1: PostgreSQL (ledger and jobs),
SeaweedFS (S3: model versions), Redis (the job queue), two `labelloop serve` replicas and
`labelloop worker` processes, started and stopped by the tests. Label Studio's side is played
by webhooks and /predict calls; the e2e test drives a real Label Studio through nginx."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import Cluster, publish_base
from helpers import wait_until
from redisserver import RedisServer
from servers import BackendProcess

from labelloop.loop.ledger import Ledger
from labelloop.loop.queue import QueueRunner, connect

pytestmark = pytest.mark.slow

PROJECT = 11
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="components" toName="image" choice="multiple">'
    + "".join(f'<Choice value="{c}"/>' for c in ("bolt", "nut", "washer", "gear", "bracket"))
    + "</Choices>"
    '<Choices name="defects" toName="image" choice="multiple">'
    + "".join(f'<Choice value="{c}"/>' for c in ("scratch", "crack", "rust", "dent"))
    + "</Choices></View>"
)


@pytest.fixture()
def cluster(
    postgres_url: str,
    s3_server: Any,
    s3_url: str,
    redis_server: RedisServer,
    trained_model,
    demo_dataset,
    tmp_path: Path,
) -> Iterator[Cluster]:
    connect(redis_server.url).flushall()
    env = {
        "LABELLOOP_DATABASE_URL": postgres_url,
        "LABELLOOP_STORE_URL": s3_url,
        "LABELLOOP_QUEUE_URL": redis_server.url,
        "LABELLOOP_STORE_POLL_SECONDS": "0.5",
        # Local-files URLs are Label Studio's; with a document root they are read from disk.
        "LABEL_STUDIO_URL": "http://127.0.0.1:1",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(demo_dataset.root),
        "LOG_LEVEL": "INFO",
        **s3_server.env(),
    }
    publish_base(trained_model[0], s3_url, tmp_path / "seed", s3_server.env())
    # No Label Studio here: nothing to refresh or rename. A short lease: the kill test waits
    # for one to expire.
    cluster = Cluster(
        tmp_path,
        env,
        worker_args=("--no-refresh", "--no-rename-backend", "--lease-seconds", "6"),
    )
    try:
        cluster.start_worker()
        yield cluster
    finally:
        cluster.close()


def annotation_event(demo_dataset, index: int) -> dict[str, Any]:
    rows = sorted(demo_dataset.metadata_csv.read_text().splitlines()[1:])
    header = demo_dataset.metadata_csv.read_text().splitlines()[0].split(",")
    row = dict(zip(header, rows[index].split(","), strict=False))
    result = [
        {
            "from_name": control,
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [x for x in row[control].split(";") if x]},
        }
        for control in ("components", "defects")
    ]
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": PROJECT, "label_config": CONFIG},
        "annotation": {
            "id": 5000 + index,
            "task": 1 + index,
            "project": PROJECT,
            "result": result,
            "was_cancelled": False,
            "ground_truth": False,
            "updated_at": f"2026-12-01T00:00:{index % 60:02d}Z",
            "completed_by": 1,
        },
        "task": {
            "id": 1 + index,
            "data": {"image": f"/data/local-files/?d=images/{row['image_id']}"},
        },
    }


def served_version(replica: BackendProcess) -> str | None:
    reply = httpx.get(f"{replica.url}/versions", params={"project": PROJECT}, timeout=10)
    return reply.json().get("served") if reply.status_code == 200 else None


def test_annotations_on_either_replica_train_on_the_worker_and_both_replicas_serve_it(
    cluster: Cluster, postgres_url: str, demo_dataset
) -> None:
    base = served_version(cluster.replicas[0])
    assert base is not None and base == served_version(cluster.replicas[1])
    for i in range(12):
        replica = cluster.replicas[i % 2]
        reply = httpx.post(f"{replica.url}/webhook", json=annotation_event(demo_dataset, i))
        assert reply.status_code == 200, reply.text
    ledger = Ledger(postgres_url)
    try:
        assert ledger.stats(PROJECT)["live"] == 12
        job = wait_until(
            lambda: next((j for j in ledger.jobs(project_id=PROJECT) if j.promoted_version), None),
            timeout_s=240,
            what="the worker to promote a version",
            interval_s=0.5,
        )
    finally:
        ledger.close()
    # The worker trained it (its name ends with its pid); the replicas only queued it.
    assert job.kind == "fast" and job.worker.endswith(f"-{cluster.workers[0].pid}")
    for replica in cluster.replicas:
        wait_until(
            lambda r=replica: served_version(r) == job.promoted_version,
            timeout_s=15,
            what="every replica to serve the promoted version",
        )
    # The replicas predict with it, and neither trained anything.
    task = annotation_event(demo_dataset, 30)["task"]
    for replica in cluster.replicas:
        reply = httpx.post(
            f"{replica.url}/predict",
            json={"tasks": [task], "label_config": CONFIG, "project": f"{PROJECT}.1"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["results"][0]["model_version"] == job.promoted_version


def test_a_worker_killed_mid_job_is_replaced_and_the_job_runs_once_to_completion(
    cluster: Cluster, postgres_url: str, demo_dataset
) -> None:
    for i in range(12):
        httpx.post(f"{cluster.replicas[0].url}/webhook", json=annotation_event(demo_dataset, i))
    ledger = Ledger(postgres_url)
    try:
        running = wait_until(
            lambda: next(
                (j for j in ledger.jobs(project_id=PROJECT) if j.state == "running"), None
            ),
            timeout_s=120,
            what="the worker to start a job",
            interval_s=0.05,
        )
        cluster.workers[0].send_signal(signal.SIGKILL)
        cluster.workers[0].wait(timeout=10)
        cluster.start_worker()
        lost = wait_until(
            lambda: (j := ledger.job(running.id)) and j.state == "failed" and j,
            timeout_s=120,
            what="the lost job's lease to expire",
        )
        assert "lease" in (lost.error or "")
        rerun = wait_until(
            lambda: next(
                (
                    j
                    for j in ledger.jobs(project_id=PROJECT)
                    if j.trigger == "recovery" and j.state not in ("queued", "running")
                ),
                None,
            ),
            timeout_s=240,
            what="the recovery job to finish on the new worker",
            interval_s=0.5,
        )
        assert rerun.state == "succeeded", rerun.error
        recoveries = [j for j in ledger.jobs(project_id=PROJECT) if j.trigger == "recovery"]
        assert len(recoveries) == 1
    finally:
        ledger.close()
    # `current` names a complete version every replica can load.
    for replica in cluster.replicas:
        wait_until(
            lambda r=replica: served_version(r) == rerun.promoted_version,
            timeout_s=15,
            what="the replicas to serve the recovered job's version",
        )


def test_jobs_survive_a_redis_restart(
    cluster: Cluster, postgres_url: str, redis_server: RedisServer, demo_dataset
) -> None:
    # Stop the worker so the job stays queued, lose Redis, then start a worker again.
    cluster.workers[0].terminate()
    cluster.workers[0].wait(timeout=60)
    for i in range(12):
        httpx.post(f"{cluster.replicas[1].url}/webhook", json=annotation_event(demo_dataset, i))
    ledger = Ledger(postgres_url)
    try:
        job = ledger.request_job(PROJECT, "fast", "test")
        QueueRunner(connect(redis_server.url)).submit(job)
        redis_server.restart()  # no persistence: the queued RQ job is gone
        assert connect(redis_server.url).dbsize() == 0
        cluster.start_worker()
        done = wait_until(
            lambda: (j := ledger.job(job.id)) and j.state not in ("queued", "running") and j,
            timeout_s=240,
            what="the job lost with Redis to be re-derived from the ledger and run",
            interval_s=0.5,
        )
        assert done.state == "succeeded", done.error
    finally:
        ledger.close()


def test_webhooks_answer_503_while_postgresql_is_down_and_recover_after(
    cluster: Cluster, postgres_server: Any, demo_dataset
) -> None:
    replica = cluster.replicas[0]
    assert httpx.post(f"{replica.url}/webhook", json=annotation_event(demo_dataset, 0)).is_success
    postgres_server.stop()
    try:
        reply = httpx.post(
            f"{replica.url}/webhook", json=annotation_event(demo_dataset, 1), timeout=30
        )
        assert reply.status_code == 503
        assert "ledger" in reply.json()["detail"]
        # Serving goes on without the database.
        assert httpx.get(f"{replica.url}/health", timeout=10).json()["status"] == "UP"
    finally:
        postgres_server.restart()
    reply = wait_until(
        lambda: (
            (
                r := httpx.post(
                    f"{replica.url}/webhook", json=annotation_event(demo_dataset, 2), timeout=30
                )
            ).status_code
            == 200
            and r
        ),
        timeout_s=60,
        what="webhooks to be recorded again after the restart",
    )
    assert reply.json()["changed"] == 1
