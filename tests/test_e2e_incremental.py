"""Incremental training end to end: annotations made in a real Label Studio reach the backend
as webhooks, train a new version in the background, and its predictions come back to Label
Studio. The backend is a real process, restarted once."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from servers import wait_until
from sklearn.metrics import f1_score

from labelloop.labelstudio.label_config import parse_label_config
from labelloop.loop.trainer import TrainerSettings, split_of

pytestmark = pytest.mark.e2e

N_TASKS = 100
N_ANNOTATED = 80


def result_for(labels: dict[str, list[str]]) -> list[dict]:
    return [
        {"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": names}}
        for control, names in labels.items()
        if names
    ]


def training_jobs(backend) -> list[dict]:
    return backend.get("/metrics")["training"]["jobs"]


def idle(backend) -> bool:
    training = backend.get("/metrics")["training"]
    return training["running"] is None and not any(j["state"] == "queued" for j in training["jobs"])


@pytest.fixture(scope="module")
def world(label_studio, backend_factory, demo_dataset):
    _, client = label_studio
    backend = backend_factory(args=("--auto-train-after", "40", "--quiet-seconds", "3600"))
    config = demo_dataset.label_config.read_text()
    project_id = client.create_project("e2e incremental", config)["id"]
    images = sorted(demo_dataset.images_dir.glob("*.png"))[:N_TASKS]
    task_ids = client.import_files(project_id, images)
    ml = client.connect_ml_backend(project_id, backend.url, title="labelloop-incremental")
    labels = demo_dataset.labels()
    by_task = {tid: labels[image.name] for tid, image in zip(task_ids, images, strict=True)}
    return {
        "client": client,
        "backend": backend,
        "project": project_id,
        "ml": ml,
        "tasks": task_ids,
        "labels": by_task,
        "config": config,
    }


def predictions_by_task(client, project_id: int, version: str) -> dict[int, set[str]]:
    out = {}
    for p in client.predictions(project_id=project_id):
        if p["model_version"] == version:
            out[p["task"]] = {c for item in p["result"] for c in item["value"]["choices"]}
    return out


def agreement(world, predicted: dict[int, set[str]], tasks: list[int]) -> float:
    controls = parse_label_config(world["config"]).controls
    classes = [c for control in controls for c in control.choices]
    y_true = np.array([[c in sum(world["labels"][t].values(), []) for c in classes] for t in tasks])
    y_pred = np.array([[c in predicted.get(t, set()) for c in classes] for t in tasks])
    return float(f1_score(y_true, y_pred, average="micro", zero_division=0))


def test_annotations_train_a_better_version_that_label_studio_receives(world) -> None:
    client, backend, pid = world["client"], world["backend"], world["project"]
    first_version = backend.health()["model_version"]
    client.retrieve_predictions(pid)
    before = wait_until(
        lambda: (p := predictions_by_task(client, pid, first_version)) and len(p) == N_TASKS and p,
        timeout_s=60,
        what="first predictions",
    )

    annotated = world["tasks"][:N_ANNOTATED]
    started = time.monotonic()
    for task_id in annotated:
        client.create_annotation(task_id, result_for(world["labels"][task_id]))
    stats = wait_until(
        lambda: (s := backend.get("/metrics")["training"]["ledger"])["live"] >= N_ANNOTATED and s,
        timeout_s=30,
        what="webhooks for every annotation",
    )
    assert stats["training_tasks"] == N_ANNOTATED

    # 40 changes trigger a fast update; 80 annotations trigger two.
    wait_until(
        lambda: any(j["state"] in ("succeeded", "rejected") for j in training_jobs(backend)),
        timeout_s=120,
        what="a fast update",
    )
    wait_until(lambda: idle(backend), timeout_s=180, what="training to settle")
    jobs = training_jobs(backend)
    assert all(j["trigger"] == "auto" and j["kind"] == "fast" for j in jobs), jobs
    assert {j["state"] for j in jobs} <= {"succeeded", "rejected"}, jobs
    promoted = [j for j in jobs if j["state"] == "succeeded"]
    assert promoted, f"no candidate was promoted: {[j['metrics'] for j in jobs]}"
    new_version = backend.health()["model_version"]
    assert new_version != first_version and new_version.startswith("v")
    seconds_to_new_version = time.monotonic() - started

    # Without anyone clicking: the unlabelled tasks get predictions of the new version, and our
    # ML backend entry (so the project's live model version) is renamed to it.
    unlabelled = set(world["tasks"]) - set(annotated)
    wait_until(
        lambda: unlabelled <= set(predictions_by_task(client, pid, new_version)),
        timeout_s=60,
        what="the automatic refresh of unlabelled tasks",
    )
    wait_until(
        lambda: client.get_project(pid).get("model_version") == new_version,
        timeout_s=30,
        what="the project's model version to follow the promotion",
    )
    ordered = [t for t in client.tasks_by_prediction_score(pid) if t["id"] in unlabelled]
    scores = [t["predictions_score"] for t in ordered]
    assert None not in scores, "the Prediction score column is empty for the live version"
    assert scores == sorted(scores)  # least certain first
    ours = {
        p["task"]: p["score"]
        for p in client.predictions(project_id=pid)
        if p["model_version"] == new_version
    }
    assert [round(s, 4) for s in scores] == [round(ours[t["id"]], 4) for t in ordered]

    setup = httpx.post(
        f"{backend.url}/setup", json={"project": f"{pid}.0", "schema": world["config"]}, timeout=5
    ).json()
    assert setup["model_version"] == new_version

    client.retrieve_predictions(pid)
    after = wait_until(
        lambda: (p := predictions_by_task(client, pid, new_version)) and len(p) >= N_TASKS and p,
        timeout_s=60,
        what="predictions of the new version",
    )
    settings = TrainerSettings()
    heldout = [t for t in annotated if split_of(t, settings) == "holdout"]
    assert heldout
    old_score, new_score = agreement(world, before, heldout), agreement(world, after, heldout)
    assert new_score > old_score, (old_score, new_score, seconds_to_new_version)


def test_start_training_returns_promptly_and_yields_a_version(world) -> None:
    client, backend = world["client"], world["backend"]
    before = {j["id"] for j in training_jobs(backend)}
    started = time.monotonic()
    response = client.train(world["ml"]["id"])
    assert response.status_code == 200
    assert time.monotonic() - started < 5  # Label Studio gives it 100 s; we just queue
    job = wait_until(
        lambda: next(
            (
                j
                for j in training_jobs(backend)
                if j["id"] not in before and j["state"] in ("succeeded", "rejected", "failed")
            ),
            None,
        ),
        timeout_s=120,
        what="the Start Training job",
    )
    assert job["trigger"] == "start_training"
    assert job["state"] in ("succeeded", "rejected"), job
    assert job["candidate_version"]
    [ml] = [b for b in client.ml_backends(world["project"]) if b["id"] == world["ml"]["id"]]
    assert ml["state"] != "ER", ml
    # Start Training runs a fast update, then a full fine-tune.
    wait_until(lambda: idle(backend), timeout_s=240, what="the full update")
    new_jobs = [j for j in training_jobs(backend) if j["id"] not in before]
    assert {j["kind"] for j in new_jobs} == {"fast", "full"}, new_jobs
    full = next(j for j in new_jobs if j["kind"] == "full")
    assert full["state"] in ("succeeded", "rejected"), full
    assert full["metrics"]["n_replay"] > 0


def test_predict_during_training_succeeds(world) -> None:
    client, backend = world["client"], world["backend"]
    client.train(world["ml"]["id"])
    task = client.get_task(world["tasks"][-1])
    response = httpx.post(
        f"{backend.url}/predict",
        json={"tasks": [{"id": task["id"], "data": task["data"]}], "label_config": world["config"]},
        timeout=30,
    )
    assert response.status_code == 200
    assert len(response.json()["results"]) == 1
    wait_until(lambda: idle(backend), timeout_s=180, what="training to settle")


def test_deletions_leave_the_training_set(world) -> None:
    client, backend = world["client"], world["backend"]
    task = client.get_task(world["tasks"][0])
    for annotation in task["annotations"]:
        client.delete_annotation(annotation["id"])
    stats = wait_until(
        lambda: (
            (s := backend.get("/metrics")["training"]["ledger"])["training_tasks"]
            == N_ANNOTATED - 1
            and s
        ),
        timeout_s=30,
        what="the deletion webhook",
    )
    assert stats["deleted"] >= 1


def test_restart_keeps_ledger_jobs_and_version(world) -> None:
    backend = world["backend"]
    wait_until(lambda: idle(backend), timeout_s=180, what="training to settle")
    version = backend.health()["model_version"]
    jobs = {j["id"]: j["state"] for j in training_jobs(backend)}
    ledger = backend.get("/metrics")["training"]["ledger"]
    backend.restart()
    assert backend.health()["model_version"] == version
    after = {j["id"]: j["state"] for j in training_jobs(backend)}
    assert {k: after[k] for k in jobs} == jobs
    assert backend.get("/metrics")["training"]["ledger"] == ledger
