"""kill -9 of the backend in the middle of a training job: nothing acknowledged is lost, the
last good model serves after restart, and the interrupted job is failed and queued again."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from servers import BackendProcess, wait_until

from labelloop.ledger import Ledger
from labelloop.store import ModelStore, verify_version_dir

pytestmark = pytest.mark.slow

PROJECT = 5


def webhook_for(demo_dataset, n: int, config: str) -> dict:
    images = sorted(p.name for p in demo_dataset.images_dir.glob("*.png"))[:n]
    rows = {
        line.split(",")[0]: line.split(",")
        for line in demo_dataset.metadata_csv.read_text().splitlines()[1:]
    }

    def result(name: str) -> list[dict]:
        _, components, defects = rows[name]
        items = []
        for control, cell in (("components", components), ("defects", defects)):
            labels = [x for x in cell.split(";") if x]
            if labels:
                items.append(
                    {
                        "from_name": control,
                        "to_name": "image",
                        "type": "choices",
                        "value": {"choices": labels},
                    }
                )
        return items

    return {
        "action": "ANNOTATIONS_CREATED",
        "project": {"id": PROJECT, "label_config": config},
        "annotation": [
            {
                "id": 100 + i,
                "task": 1 + i,
                "result": result(name),
                "was_cancelled": False,
                "ground_truth": False,
                "completed_by": 1,
                "updated_at": "2026-11-25T00:00:00Z",
            }
            for i, name in enumerate(images)
        ],
        "task": [
            {"id": 1 + i, "data": {"image": f"/data/local-files/?d=images/{name}"}}
            for i, name in enumerate(images)
        ],
    }


def jobs(backend: BackendProcess) -> list[dict]:
    return backend.get("/metrics")["training"]["jobs"]


def test_kill_9_during_training_loses_nothing(trained_model, demo_dataset, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model[0], model_dir)
    env = {
        "LABEL_STUDIO_URL": "http://127.0.0.1:9",  # never contacted: images are local files
        "LABEL_STUDIO_API_KEY": "0" * 40,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(demo_dataset.root),
    }
    backend = BackendProcess(
        model_dir, tmp_path / "backend.log", env=env, args=("--no-refresh", "--no-rename-backend")
    )
    try:
        config = demo_dataset.label_config.read_text()
        reply = httpx.post(
            f"{backend.url}/webhook", json=webhook_for(demo_dataset, 60, config), timeout=10
        ).json()
        assert reply["recorded"] == 60
        httpx.post(
            f"{backend.url}/webhook",
            json={"action": "START_TRAINING", "project": {"id": PROJECT}},
            timeout=10,
        )
        # The fast update finishes; kill the process while the full update runs.
        full = wait_until(
            lambda: next(
                (j for j in jobs(backend) if j["kind"] == "full" and j["state"] == "running"), None
            ),
            timeout_s=120,
            what="the full update to start",
        )
        served_before_crash = backend.health()["model_version"]
        backend.kill()

        store = ModelStore(model_dir)
        assert store.current_version() == served_before_crash  # never half a model
        with Ledger(model_dir / "ledger.sqlite3") as ledger:
            assert ledger.stats(PROJECT)["live"] == 60  # every acknowledged annotation
            assert ledger.job(full["id"]).state == "running"  # as the crash left it

        backend.restart()
        assert backend.health()["model_version"] == served_before_crash
        interrupted = next(j for j in jobs(backend) if j["id"] == full["id"])
        assert interrupted["state"] == "failed" and "interrupted" in interrupted["error"]
        recovery = wait_until(
            lambda: next(
                (
                    j
                    for j in jobs(backend)
                    if j["trigger"] == "recovery" and j["state"] not in ("queued", "running")
                ),
                None,
            ),
            timeout_s=180,
            what="the re-queued job to finish",
        )
        assert recovery["kind"] == "full" and recovery["state"] in ("succeeded", "rejected")
        # A staging folder the crash left behind is never listed or loaded; every published
        # version verifies against its checksums.
        for version in store.versions():
            verify_version_dir(store.version_dir(version))
    finally:
        backend.stop()
