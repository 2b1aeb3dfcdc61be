"""The distributed mode end to end: a real Label Studio calls nginx, which balances two
`labelloop serve` replicas; one `labelloop worker` trains; PostgreSQL holds the ledger and the
jobs, SeaweedFS (S3) the model versions, Redis the queue. All on 127.0.0.1, started and stopped
here.

Annotations made in Label Studio reach the ledger through either replica, the worker trains and
publishes, both replicas serve the promoted version within seconds, and the worker pushes its
predictions into Label Studio. Then the faults: a replica killed during bulk /predict calls
(nginx retries on the other one, every call answers in full), and PostgreSQL stopped while an
annotator works (the webhook of that annotation fails; the worker's periodic reconcile recovers
it once PostgreSQL is back). The gate's tolerance is 1.0: this test is about the plumbing;
whether the loop learns is test_e2e_learning's question.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import Cluster, publish_base
from helpers import result_for, wait_until
from lsserver import booted_label_studio
from nginx import NginxBalancer
from redisserver import RedisServer

from labelloop.dev.demo import generate_demo_dataset
from labelloop.loop.ledger import Ledger

pytestmark = pytest.mark.e2e

N_TASKS = 40


@pytest.fixture(scope="module")
def own_label_studio(tmp_path_factory: pytest.TempPathFactory):
    """A Label Studio of this test's own: its tasks must not move the task ids (and so the
    held-out splits) of the tests that share the session's instance."""
    with booted_label_studio(tmp_path_factory.mktemp("label-studio-distributed")) as booted:
        yield booted


def test_label_studio_through_nginx_to_two_replicas_and_a_worker(
    own_label_studio,
    postgres_server: Any,
    postgres_url: str,
    s3_server: Any,
    s3_url: str,
    redis_server: RedisServer,
    trained_model,
    tmp_path: Path,
) -> None:
    server, client = own_label_studio
    dataset = generate_demo_dataset(tmp_path / "data", n=N_TASKS, seed=9, size=64)
    images = sorted(dataset.images_dir.glob("*.png"))
    truth = dataset.labels()
    env = {
        "LABELLOOP_DATABASE_URL": postgres_url,
        "LABELLOOP_STORE_URL": s3_url,
        "LABELLOOP_QUEUE_URL": redis_server.url,
        "LABELLOOP_STORE_POLL_SECONDS": "0.5",
        "LABEL_STUDIO_URL": server.settings.url,
        "LABEL_STUDIO_API_KEY": server.settings.token,
        "LOG_LEVEL": "INFO",
        **s3_server.env(),
    }
    publish_base(trained_model[0], s3_url, tmp_path / "seed", s3_server.env())
    cluster = Cluster(tmp_path, env, worker_args=("--reconcile-seconds", "5"))
    balancer = NginxBalancer([r.url.removeprefix("http://") for r in cluster.replicas])
    ledger = Ledger(postgres_url)
    try:
        cluster.start_worker(LABELLOOP_PUBLIC_URL=balancer.url)
        project = client.create_project("distributed", dataset.label_config.read_text())["id"]
        tasks = client.import_files(project, images)
        labels = dict(zip(tasks, (truth[p.name] for p in images), strict=True))
        client.connect_ml_backend(project, balancer.url, title="labelloop")

        # 1. Annotations reach the ledger through either replica; the worker trains.
        for task in tasks[:12]:
            client.create_annotation(task, result_for(labels[task]))
        wait_until(
            lambda: ledger.stats(project)["live"] == 12,
            timeout_s=30,
            what="12 annotations in the ledger",
        )
        hits = [cluster.log(f"replica{i}").count("Webhook ANNOTATION_CREATED") for i in (1, 2)]
        assert sum(hits) >= 12 and all(hits), hits  # nginx spread them over both replicas
        job = wait_until(
            lambda: next((j for j in ledger.jobs(project_id=project) if j.promoted_version), 0),
            timeout_s=300,
            what="the worker to promote a version",
            interval_s=1,
        )
        for replica in cluster.replicas:
            wait_until(
                lambda r=replica: (
                    r.get(f"/versions?project={project}")["served"] == job.promoted_version
                ),
                timeout_s=15,
                what="both replicas to serve the promoted version",
            )
        # The worker refreshed the unlabelled tasks' predictions in Label Studio.
        wait_until(
            lambda: (
                job.promoted_version
                in {p["model_version"] for p in client.predictions(project_id=project)}
            ),
            timeout_s=120,
            what="the worker's refreshed predictions in Label Studio",
            interval_s=1,
        )

        # 2. A replica killed during bulk /predict calls: every call still answers in full.
        bulk = {
            "tasks": [{"id": t, "data": client.get_task(t)["data"]} for t in tasks] * 5,
            "label_config": dataset.label_config.read_text(),
            "project": f"{project}.0",
        }
        answers: list[httpx.Response] = []

        def call() -> None:
            answers.append(httpx.post(f"{balancer.url}/predict", json=bulk, timeout=300))

        callers = [threading.Thread(target=call) for _ in range(4)]
        for caller in callers:
            caller.start()
        cluster.replicas[0].kill()
        for caller in callers:
            caller.join(timeout=300)
        assert [a.status_code for a in answers] == [200] * 4
        served = cluster.replicas[1].get(f"/versions?project={project}")["served"]
        for answer in answers:
            results = answer.json()["results"]
            assert len(results) == len(bulk["tasks"]) and all(r["result"] for r in results)
            # One model per answer: the one the surviving replica serves.
            assert {r["model_version"] for r in results} == {served}

        # 3. PostgreSQL down while an annotator works: the webhook fails, the reconcile heals.
        postgres_server.stop()
        try:
            client.create_annotation(tasks[12], result_for(labels[tasks[12]]))
            wait_until(
                lambda: "Ledger unavailable on POST /webhook" in cluster.log("replica2"),
                timeout_s=30,
                what="the replica to refuse the webhook while PostgreSQL is down",
            )
        finally:
            postgres_server.restart()
        wait_until(
            lambda: _live(ledger, project) == 13,
            timeout_s=120,
            what="the periodic reconcile to recover the annotation made while PostgreSQL was down",
            interval_s=1,
        )
    finally:
        ledger.close()
        balancer.stop()
        cluster.close()


def _live(ledger: Ledger, project: int) -> int:
    try:
        return ledger.stats(project)["live"]
    except Exception:  # noqa: BLE001 - PostgreSQL is still coming back
        return -1
