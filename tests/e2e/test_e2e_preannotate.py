"""`labelloop preannotate` as a real command against a real Label Studio."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import httpx
import pytest

from labelloop.store import ModelStore

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(label_studio, demo_dataset, trained_model, tmp_path_factory):
    server, client = label_studio
    pid = client.create_project("e2e preannotate", demo_dataset.label_config.read_text())["id"]
    images = sorted(demo_dataset.images_dir.glob("*.png"))
    # The same 120 images twice: 240 tasks.
    client.import_files(pid, images)
    client.import_files(pid, images)
    model_dir = tmp_path_factory.mktemp("preannotate") / "model"
    shutil.copytree(trained_model[0], model_dir)
    return {"id": pid, "model_dir": model_dir, "server": server, "client": client}


@pytest.fixture
def fresh(project):
    """The module's project with no prediction of the current version, whatever ran before."""
    client, pid = project["client"], project["id"]
    client.update_project(pid, evaluate_predictions_automatically=False)
    client.delete_version_predictions(pid, ModelStore(project["model_dir"]).current_version())
    return project


def run(
    project, *args: str, read_uploads_from_disk: bool = False, priority: str | None = None
) -> tuple[int, int]:
    server = project["server"]
    env = dict(
        os.environ,
        LABEL_STUDIO_URL=server.settings.url,
        LABEL_STUDIO_API_KEY=server.settings.token,
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(server.settings.document_root),
    )
    env.pop("LABELLOOP_PRIORITY", None)
    if priority is not None:
        env["LABELLOOP_PRIORITY"] = priority
    env.pop("LABEL_STUDIO_BASE_DATA_DIR", None)
    if read_uploads_from_disk:
        env["LABEL_STUDIO_BASE_DATA_DIR"] = str(server.settings.data_dir)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "labelloop",
            "preannotate",
            "--project",
            str(project["id"]),
            "--model-dir",
            str(project["model_dir"]),
            "--batch-size",
            "64",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"(\d+) predicted, (\d+) skipped", done.stdout)
    assert match, done.stdout
    project["last_output"] = done.stdout
    return int(match.group(1)), int(match.group(2))


def uploads_served(project) -> int:
    """How many uploaded files Label Studio has served so far (from its request log)."""
    log = project["server"].log_file.read_text(errors="replace").splitlines()
    # Label Studio writes every request line twice (two handlers), timestamp included.
    return len({line for line in log if re.search(r'"GET /data/upload/\S+ HTTP/[\d.]+" 200', line)})


def test_preannotate_resumes_and_never_duplicates(fresh) -> None:
    project = fresh
    client, pid = project["client"], project["id"]
    version = ModelStore(project["model_dir"]).current_version()
    served = uploads_served(project)
    assert run(project, "--limit", "100") == (100, 0)  # an interrupted run
    assert uploads_served(project) - served == 100  # downloaded through Label Studio
    served = uploads_served(project)
    # Resumes where it stopped, reading the uploads from Label Studio's data directory.
    assert run(project, read_uploads_from_disk=True) == (140, 100)
    assert uploads_served(project) == served
    assert run(project) == (0, 240)  # nothing left to do
    predictions = client.predictions(project_id=pid)
    per_task = Counter(p["task"] for p in predictions if p["model_version"] == version)
    assert len(per_task) == 240 and set(per_task.values()) == {1}
    assert all(0.0 <= p["score"] <= 1.0 for p in predictions)


def test_preannotate_all_replaces_instead_of_duplicating(fresh) -> None:
    project = fresh
    client, pid = project["client"], project["id"]
    version = ModelStore(project["model_dir"]).current_version()
    run(project)

    def current_ids() -> Counter:
        return Counter(
            p["task"] for p in client.predictions(project_id=pid) if p["model_version"] == version
        )

    before = {p["id"] for p in client.predictions(project_id=pid)}
    assert run(project, "--all", "--limit", "30") == (30, 0)  # replaced one by one
    assert set(current_ids().values()) == {1} and len(current_ids()) == 240
    assert len(before - {p["id"] for p in client.predictions(project_id=pid)}) == 30
    client.update_project(pid, model_version=version)  # the live version, as a rename sets it
    assert run(project, "--all") == (240, 0)  # replaced with one bulk delete
    assert set(current_ids().values()) == {1} and len(current_ids()) == 240
    # Label Studio clears the live version on a bulk delete of its predictions; it is restored.
    assert client.get_project(pid)["model_version"] == version
    assert not before & {p["id"] for p in client.predictions(project_id=pid)}


def original_name(task: dict) -> str:
    """The uploaded file's own name: Label Studio prefixes each upload with a random id."""
    return task["data"]["image"].rsplit("/", 1)[-1].split("-", 1)[-1]


def lowest_scored(project, n: int) -> list[str]:
    """The images of the `n` tasks Label Studio's Data Manager lists first by ascending
    prediction score (ties by task id), from the current version's predictions."""
    client, pid = project["client"], project["id"]
    version = ModelStore(project["model_dir"]).current_version()
    name = {t["id"]: original_name(t) for t in client.list_tasks(pid, include=("id", "data"))}
    scored = sorted(
        (p["score"], p["task"])
        for p in client.predictions(project_id=pid)
        if p["model_version"] == version
    )
    assert len(scored) == 240
    return [name[task] for _, task in scored[:n]]


def stored_scores(project) -> dict[int, float]:
    """Task -> the score of its prediction of the current version, as Label Studio keeps it."""
    client, pid = project["client"], project["id"]
    version = ModelStore(project["model_dir"]).current_version()
    return {
        p["task"]: p["score"]
        for p in client.predictions(project_id=pid)
        if p["model_version"] == version
    }


def test_the_whole_pool_is_scored_in_labelling_order(fresh) -> None:
    """The module's 240 tasks are 120 images twice. Ordered by margin, the two copies of an
    image score the same, so the first 100 places of the Data Manager's queue hold about 50
    images twice over; in the labelling order (the default) a copy waits until the rest of the
    pool has had its turn, so the first 100 places (the planned horizon) are 100 images."""
    project = fresh
    assert run(project, "--all", priority="margin") == (240, 0)
    assert "scores: margin" in project["last_output"]
    by_margin = lowest_scored(project, 100)
    assert len(set(by_margin)) <= 60, Counter(by_margin).most_common(3)
    margins = stored_scores(project)

    assert run(project, "--all") == (240, 0)
    assert "scores: margin-density-diversity" in project["last_output"]
    ordered = lowest_scored(project, 100)
    assert len(set(ordered)) == 100, Counter(ordered).most_common(3)
    # The predictions were pushed with their margins as they were made; then only the 100
    # planned places changed, to -1 + j / 100, below every margin.
    scores = stored_scores(project)
    planned = sorted(score for score in scores.values() if score < 0)
    assert planned == pytest.approx([-1 + j / 100 for j in range(100)], abs=1e-6)
    assert {t: s for t, s in scores.items() if s >= 0} == {
        t: margins[t] for t, s in scores.items() if s >= 0
    }

    # A run over part of the pool cannot rank it: its scores are margins, and it says so.
    client, pid = project["client"], project["id"]
    client.delete_version_predictions(pid, ModelStore(project["model_dir"]).current_version())
    assert run(project, "--limit", "40") == (40, 0)
    assert "scores: margin" in project["last_output"]


def test_preannotate_without_credentials_is_a_clear_error(project) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "labelloop",
            "preannotate",
            "--project",
            str(project["id"]),
            "--model-dir",
            str(project["model_dir"]),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "LABEL_STUDIO_URL" in done.stderr + done.stdout


def test_preannotate_never_makes_label_studio_call_the_backend(fresh, backend) -> None:
    """With "retrieve predictions automatically" on, listing tasks through the Data Manager makes
    Label Studio call every connected backend for tasks without a prediction; pre-annotation
    must read the tasks another way. (Reuses the module's project and its 240 tasks.)"""
    project = fresh
    client, pid = project["client"], project["id"]
    assert not client.predictions(project_id=pid)
    client.connect_ml_backend(pid, backend.url)
    client.update_project(pid, evaluate_predictions_automatically=True)

    def tasks_the_backend_predicted() -> int:
        return int(httpx.get(f"{backend.url}/status", timeout=10).json()["predict"]["tasks"])

    before = tasks_the_backend_predicted()  # the backend is shared with other tests
    assert run(project, "--limit", "20") == (20, 0)
    assert tasks_the_backend_predicted() == before
    # The premise: a Data Manager listing does call the backend for the unpredicted tasks.
    client.list_tasks(pid, page_size=500, include=("id",))
    assert tasks_the_backend_predicted() == before + 240 - 20


def test_preannotate_through_a_running_backend(label_studio, demo_dataset, backend_factory) -> None:
    """The command asks the backend that is already running (models loaded, images cached) to
    do the work: one prediction per task, of the version it serves the project, resumable."""
    _, client = label_studio
    pid = client.create_project(
        "e2e preannotate via backend", demo_dataset.label_config.read_text()
    )["id"]
    images = sorted(demo_dataset.images_dir.glob("*.png"))[:60]
    client.import_files(pid, images)
    backend = backend_factory(args=("--no-refresh", "--no-rename-backend"))
    client.connect_ml_backend(pid, backend.url, title="e2e via backend")
    version = backend.get(f"/versions?project={pid}")["served"]
    project = {"id": pid, "model_dir": backend.model_dir, "server": label_studio[0]}
    before = backend.get("/status")["requests"].get("preannotate", 0)
    assert run(project, "--backend", backend.url, "--limit", "25") == (25, 0)
    assert run(project, "--backend", backend.url) == (35, 25)  # resumes
    assert run(project, "--backend", backend.url) == (0, 60)
    per_task = Counter(
        p["task"] for p in client.predictions(project_id=pid) if p["model_version"] == version
    )
    assert len(per_task) == 60 and set(per_task.values()) == {1}
    # The backend did the work (its request counter), not a process of the command's own.
    assert backend.get("/status")["requests"]["preannotate"] >= before + 3


def test_preannotate_through_a_backend_that_does_not_know_the_project(
    label_studio, demo_dataset, backend
) -> None:
    _, client = label_studio
    pid = client.create_project("e2e preannotate unknown", demo_dataset.label_config.read_text())[
        "id"
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "labelloop",
            "preannotate",
            "--project",
            str(pid),
            "--backend",
            backend.url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "never set up with this backend" in done.stderr + done.stdout
