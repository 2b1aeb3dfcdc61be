"""kill -9 of the backend in the middle of a training job: nothing acknowledged is lost, the
last good model serves after restart, and the interrupted job is failed and queued again."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from servers import BackendProcess, wait_until

from labelloop.lineages import project_store
from labelloop.loop.ledger import Ledger
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
    return backend.get("/status")["training"]["jobs"]


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
        served_before_crash = backend.get(f"/versions?project={PROJECT}")["served"]
        backend.kill()

        lineage = project_store(model_dir, PROJECT)
        current = lineage.current_version() or ModelStore(model_dir).current_version()
        assert current == served_before_crash  # never half a model
        with Ledger(model_dir / "ledger.sqlite3") as ledger:
            assert ledger.stats(PROJECT)["live"] == 60  # every acknowledged annotation
            assert ledger.job(full["id"]).state == "running"  # as the crash left it

        backend.restart()
        assert backend.get(f"/versions?project={PROJECT}")["served"] == served_before_crash
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
        for store in (ModelStore(model_dir), lineage):
            for version in store.versions():
                verify_version_dir(store.version_dir(version))
    finally:
        backend.stop()


# -- kill -9 in the middle of ModelStore publishing a version ---------------------------------

# Stages and publishes a copy of the current model as a new version, pausing (forever, until
# killed) at one step of the publish: the test SIGKILLs it there.
PUBLISHER = r"""
import sys, time
from pathlib import Path

import labelloop.store as store_module
from labelloop.store import ModelStore, load_bundle, manifest_for, write_model_files

model_dir, point, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])


def pause_here():
    ready.write_text(point)
    time.sleep(600)


if point == "mid-write":
    real_write = store_module.write_json_atomic

    def write_then_pause(path, payload):
        real_write(path, payload)
        pause_here()  # model.pth and classes.json are written; thresholds.json is not

    store_module.write_json_atomic = write_then_pause
elif point == "before-version-rename":
    real_rename = Path.rename

    def pause_then_rename(self, target):
        if Path(target).parent.name == "versions":
            pause_here()
        return real_rename(self, target)

    Path.rename = pause_then_rename
elif point == "before-current-replace":
    real_replace = Path.replace

    def pause_then_replace(self, target):
        if Path(target).name == "current":
            pause_here()
        return real_replace(self, target)

    Path.replace = pause_then_replace

store = ModelStore(model_dir)
base = load_bundle(model_dir)
version = store.next_version_name()
with store.staging() as staged:
    write_model_files(staged, base.model, base.label_space, base.thresholds)
    manifest = manifest_for(
        version=version,
        backbone=base.manifest.backbone,
        dropout=base.manifest.dropout,
        label_space=base.label_space,
        preprocess=base.preprocess,
        parent_version=base.version,
    )
    store.publish(staged, manifest)
print("published without pausing", file=sys.stderr)
sys.exit(3)
"""


@pytest.mark.parametrize("point", ["mid-write", "before-version-rename", "before-current-replace"])
def test_kill_9_during_publish_keeps_the_last_good_version(
    trained_model, tmp_path: Path, point: str
) -> None:
    import subprocess
    import sys

    from labelloop.store import load_bundle

    model_dir = tmp_path / "model"
    shutil.copytree(trained_model[0], model_dir)
    store = ModelStore(model_dir)
    before = store.current_version()
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(model_dir), point, str(ready)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: ready.exists() or process.poll() is not None,
            timeout_s=120,
            what=f"the publisher to reach {point}",
        )
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
    finally:
        process.kill()  # SIGKILL: no finally blocks, no atexit, exactly like the OOM killer
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()

    leftovers = [p for p in store.versions_dir.iterdir() if p.name.startswith(".staging-")]
    staging = [p.name for p in leftovers if p.is_dir()]
    # Killed before the rename, the staging folder is left behind (with its lock file; after
    # the rename, only the lock file)...
    assert len(staging) == (0 if point == "before-current-replace" else 1)
    assert len(leftovers) == len(staging) + 1
    # ...but it is never listed, loaded, or pointed at.
    assert store.current_version() == before
    assert load_bundle(model_dir).version == before
    published = store.versions()
    if point == "before-current-replace":
        # The version folder was complete when renamed in: published, just not current.
        assert len(published) == 2 and published[0] == before
    else:
        assert published == [before]
    for version in published:
        verify_version_dir(store.version_dir(version))

    # Start-up cleaning removes what the dead writer left, and nothing else.
    with store.staging() as live:
        (live / "model.pth").write_bytes(b"in progress")
        removed = store.remove_stale_staging()
        assert live.is_dir()  # another process's publish in progress is left alone
    assert removed == staging
    assert not [p for p in store.versions_dir.iterdir() if p.name.startswith(".staging-")]

    # And the store publishes the next version as if nothing happened.
    bundle = load_bundle(model_dir)
    with store.staging() as staged:
        from labelloop.store import manifest_for, write_model_files

        write_model_files(staged, bundle.model, bundle.label_space, bundle.thresholds)
        version = store.next_version_name()
        store.publish(
            staged,
            manifest_for(
                version=version,
                backbone=bundle.manifest.backbone,
                dropout=bundle.manifest.dropout,
                label_space=bundle.label_space,
                preprocess=bundle.preprocess,
                parent_version=before,
            ),
        )
    assert store.current_version() == version and load_bundle(model_dir).version == version
