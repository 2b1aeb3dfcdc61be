"""Incremental training end to end: annotations made in a real Label Studio reach the backend
as webhooks, train a new version in the background, and its predictions come back to Label
Studio. The backend is a real process, restarted once."""

from __future__ import annotations

import time

import httpx
import pytest
from helpers import result_for
from PIL import Image
from servers import wait_until

from labelloop.loop.trainer import TrainerSettings, split_of

pytestmark = pytest.mark.e2e

N_TASKS = 100
N_ANNOTATED = 80


def training_jobs(backend) -> list[dict]:
    return backend.get("/status")["training"]["jobs"]


def idle(backend) -> bool:
    training = backend.get("/status")["training"]
    return training["running"] is None and not any(j["state"] == "queued" for j in training["jobs"])


def import_with_the_splits_of_ids_from_1(server, client, project_id: int, images, filler):
    """Upload `images` as tasks whose ids fall into the held-out / validation / training splits
    (a hash of the task id, `split_of`) exactly as ids 1, 2, 3, ... do: the same images land
    in the same splits whichever tests created tasks in this Label Studio before (its task ids
    are global and only grow). Ids whose split does not fit the next image get a `filler`
    upload, deleted again. Returns the tasks' ids, in the order of `images`."""
    settings = TrainerSettings()
    # The next id Label Studio hands out: one past a probe task, kept in a project of its own.
    probe_project = client.create_project(
        "e2e incremental: next task id", '<View><Text name="text" value="$text"/></View>'
    )["id"]
    [probe] = client.import_tasks(probe_project, [{"text": "probe"}])
    first_id = next_id = probe + 1
    files, planned = [], []
    for position, image in enumerate(images):
        while split_of(next_id, settings) != split_of(position + 1, settings):
            files.append(filler)
            next_id += 1
        files.append(image)
        planned.append(next_id)
        next_id += 1
    ids = client.import_files(project_id, files)
    assert ids == list(range(first_id, next_id)), "Label Studio skipped task ids"
    fillers = sorted(set(ids) - set(planned))
    with httpx.Client(
        base_url=server.settings.url,
        headers={"Authorization": f"Token {server.settings.token}"},
        timeout=120,
    ) as http:
        http.post(
            "/api/dm/actions",
            params={"id": "delete_tasks", "project": project_id},
            json={"selectedItems": {"all": False, "included": fillers}},
        ).raise_for_status()
    assert sorted(t["id"] for t in client.list_tasks(project_id, include=("id",))) == planned
    return planned


@pytest.fixture(scope="module")
def world(label_studio, backend_factory, demo_dataset, tmp_path_factory):
    """This module's own project, backend and tasks; nothing in it depends on which tests ran
    before (see import_with_the_splits_of_ids_from_1)."""
    server, client = label_studio
    # Full updates only on Start Training here: this module is about the mechanics; whether the
    # loop learns is test_e2e_learning's question.
    backend = backend_factory(
        args=("--auto-train-after", "40", "--quiet-seconds", "3600", "--no-auto-full")
    )
    config = demo_dataset.label_config.read_text()
    project_id = client.create_project("e2e incremental", config)["id"]
    images = sorted(demo_dataset.images_dir.glob("*.png"))[:N_TASKS]
    filler = tmp_path_factory.mktemp("filler") / "filler.png"
    Image.new("RGB", (8, 8)).save(filler)
    task_ids = import_with_the_splits_of_ids_from_1(server, client, project_id, images, filler)
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
        "annotated": False,
    }


def annotate(world) -> list[int]:
    """Annotate the first N_ANNOTATED tasks with their true labels (once per module) and wait
    until the backend has recorded every webhook."""
    client, backend = world["client"], world["backend"]
    annotated = world["tasks"][:N_ANNOTATED]
    if not world["annotated"]:
        for task_id in annotated:
            client.create_annotation(task_id, result_for(world["labels"][task_id]))
        world["annotated"] = True
    wait_until(
        lambda: backend.get("/status")["training"]["ledger"]["live"] >= N_ANNOTATED,
        timeout_s=30,
        what="webhooks for every annotation",
    )
    return annotated


@pytest.fixture
def annotated(world) -> list[int]:
    """For tests that need the annotations but do not make them."""
    return annotate(world)


def served(backend, project_id: int) -> str:
    """The version the backend serves the project (its own lineage's, else the base model)."""
    return backend.get(f"/versions?project={project_id}")["served"]


def predictions_by_task(client, project_id: int, version: str) -> dict[int, set[str]]:
    out = {}
    for p in client.predictions(project_id=project_id):
        if p["model_version"] == version:
            out[p["task"]] = {c for item in p["result"] for c in item["value"]["choices"]}
    return out


def test_annotations_train_a_version_that_label_studio_receives(world) -> None:
    client, backend, pid = world["client"], world["backend"], world["project"]
    first_version = served(backend, pid)
    client.retrieve_predictions(pid)
    before = wait_until(
        lambda: (p := predictions_by_task(client, pid, first_version)) and len(p) == N_TASKS and p,
        timeout_s=60,
        what="first predictions",
    )

    started = time.monotonic()
    annotated = annotate(world)
    stats = wait_until(
        lambda: (s := backend.get("/status")["training"]["ledger"])["live"] >= N_ANNOTATED and s,
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
    new_version = served(backend, pid)
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
    # The scores are the labelling order of the whole unlabelled pool, not bare margins: once
    # the refresh has ended (its predictions land as they are made, the planned places' scores
    # are set at its end), /status has its summary.
    refresh = wait_until(
        lambda: (
            (r := backend.get("/status").get("refreshes", {}).get(str(pid)))
            and r["model_version"] == new_version
            and r
        ),
        timeout_s=60,
        what="the refresh's summary in /status",
    )
    assert refresh["scores"] == "margin-density-diversity", refresh
    # Every task unlabelled when it ran (annotating may still have been under way then).
    assert refresh["predicted"] >= len(unlabelled), refresh
    assert refresh["predicted"] + refresh["skipped"] == N_TASKS, refresh
    ordered = [t for t in client.tasks_by_prediction_score(pid) if t["id"] in unlabelled]
    scores = [t["predictions_score"] for t in ordered]
    assert None not in scores, "the Prediction score column is empty for the live version"
    assert scores == sorted(scores)  # label first first
    ours = {
        p["task"]: p["score"]
        for p in client.predictions(project_id=pid)
        if p["model_version"] == new_version
    }
    assert [round(s, 4) for s in scores] == [round(ours[t["id"]], 4) for t in ordered]
    # The planned places (the horizon, 100, or the whole pool when smaller) lead, below 0.
    planned = min(100, refresh["predicted"])
    assert sum(score < 0 for score in ours.values()) == planned, sorted(ours.values())[:5]

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
    assert set(after) >= set(before), seconds_to_new_version  # every task, the new version
    # The promotion's reason is recorded where `labelloop status` and /metrics show it.
    assert all(j["metrics"]["gate"]["reason"] for j in promoted)


def test_start_training_returns_promptly_and_yields_a_version(world, annotated) -> None:
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


def test_deletions_leave_the_training_set(world, annotated) -> None:
    client, backend = world["client"], world["backend"]
    task = client.get_task(world["tasks"][0])
    for annotation in task["annotations"]:
        client.delete_annotation(annotation["id"])
    stats = wait_until(
        lambda: (
            (s := backend.get("/status")["training"]["ledger"])["training_tasks"] == N_ANNOTATED - 1
            and s
        ),
        timeout_s=30,
        what="the deletion webhook",
    )
    assert stats["deleted"] >= 1


def test_restart_keeps_ledger_jobs_and_version(world) -> None:
    backend = world["backend"]
    wait_until(lambda: idle(backend), timeout_s=180, what="training to settle")
    version = served(backend, world["project"])
    jobs = {j["id"]: j["state"] for j in training_jobs(backend)}
    ledger = backend.get("/status")["training"]["ledger"]
    backend.restart()
    assert served(backend, world["project"]) == version
    after = {j["id"]: j["state"] for j in training_jobs(backend)}
    assert {k: after[k] for k in jobs} == jobs
    assert backend.get("/status")["training"]["ledger"] == ledger
