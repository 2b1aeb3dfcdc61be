"""End to end with a real Label Studio (PyPI label-studio==1.23.2) and our backend as a real
process, both on 127.0.0.1."""

from __future__ import annotations

import shutil

import httpx
import pytest
from servers import wait_until

from labelloop.labelstudio.client import LabelStudioAPIError
from labelloop.labelstudio.label_config import parse_label_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(label_studio, demo_dataset, tmp_path_factory):
    """A project with demo images: 6 uploaded, 4 through local storage, 1 broken URL."""
    server, client = label_studio
    config = demo_dataset.label_config.read_text()
    created = client.create_project("e2e predictions", config)
    pid = created["id"]
    images = sorted(demo_dataset.images_dir.glob("*.png"))
    uploaded = client.import_files(pid, images[:6])
    storage_dir = server.settings.document_root / "e2e"
    storage_dir.mkdir(parents=True, exist_ok=True)
    for image in images[6:10]:
        shutil.copy(image, storage_dir / image.name)
    client.add_local_storage(pid, storage_dir)
    broken = client.import_tasks(pid, [{"image": f"/data/upload/{pid}/no-such-file.png"}])
    tasks = client.list_tasks(pid)
    assert len(tasks) == 11
    return {"id": pid, "config": config, "uploaded": uploaded, "broken": broken[0], "tasks": tasks}


@pytest.fixture(scope="module")
def connected(label_studio, project, backend):
    _, client = label_studio
    ml = client.connect_ml_backend(project["id"], backend.url, title="labelloop-e2e")
    return ml


def test_backend_connects(label_studio, project, connected) -> None:
    _, client = label_studio
    backends = client.ml_backends(project["id"])
    assert [b["id"] for b in backends] == [connected["id"]]
    assert backends[0]["state"] == "CO", backends[0]  # connected


def test_retrieve_predictions_stores_valid_predictions(
    label_studio, project, connected, backend
) -> None:
    _, client = label_studio
    pid = project["id"]
    client.retrieve_predictions(pid)
    predictions = wait_until(
        lambda: (
            client.predictions(project_id=pid)
            if len(client.predictions(project_id=pid)) >= 10
            else None
        ),
        timeout_s=60,
        what="predictions for 10 tasks",
    )
    config = parse_label_config(project["config"])
    controls = {c.name: c for c in config.controls}
    by_task = {p["task"]: p for p in predictions}
    assert project["broken"] not in by_task  # its image cannot be fetched: no prediction
    good_tasks = {t["id"] for t in project["tasks"]} - {project["broken"]}
    assert set(by_task) == good_tasks  # uploaded and local-storage tasks alike
    version = backend.get(f"/versions?project={pid}")["served"]
    for prediction in by_task.values():
        assert prediction["model_version"] == version
        assert 0.0 <= prediction["score"] <= 1.0
        for item in prediction["result"]:
            control = controls[item["from_name"]]
            assert item["to_name"] == control.to_name
            assert set(item["value"]["choices"]) <= set(control.choices)
    assert any(p["result"] for p in by_task.values())


def test_opening_a_task_without_prediction_triggers_one(
    label_studio, backend, demo_dataset
) -> None:
    _, client = label_studio
    # A project of its own: a task added to the module's would change what the other tests see.
    pid = client.create_project("e2e open a task", demo_dataset.label_config.read_text())["id"]
    client.connect_ml_backend(pid, backend.url, title="labelloop-e2e-open")
    image = sorted(demo_dataset.images_dir.glob("*.png"))[12]
    [task_id] = client.import_files(pid, [image])
    assert client.predictions(task_id=task_id) == []
    client.get_task(task_id)
    wait_until(
        lambda: client.predictions(task_id=task_id),
        timeout_s=30,
        what="a prediction after opening the task",
    )


def test_backend_with_basic_auth(label_studio, backend_factory, demo_dataset) -> None:
    server, client = label_studio
    # A project of its own: a second backend on the module's would change what the others see.
    pid = client.create_project("e2e basic auth", demo_dataset.label_config.read_text())["id"]
    secured = backend_factory(basic_auth=("ls-user", "ls-pass"))
    assert httpx.get(f"{secured.url}/health", timeout=5).status_code == 401
    with pytest.raises(LabelStudioAPIError):
        client.connect_ml_backend(pid, secured.url, title="no-auth")
    ml = client.connect_ml_backend(
        pid, secured.url, title="with-auth", basic_auth=("ls-user", "ls-pass")
    )
    assert ml["state"] == "CO"
    # Tokens and passwords never reach the logs, whatever Label Studio sent us.
    log = secured.log_path.read_text()
    assert "Serving" in log  # the log is real and not empty
    for secret in ("ls-pass", server.settings.token, server.settings.password):
        assert secret not in log


def test_demo_project_is_prepared_once(label_studio, demo_dataset, backend) -> None:
    from labelloop.dev.demo_stack import prepare_project

    server, client = label_studio
    images = sorted(demo_dataset.images_dir.glob("*.png"))[20:28]
    kwargs = dict(
        label_config=demo_dataset.label_config.read_text(),
        images=images,
        storage_dir=server.settings.document_root / "demo-test",
        backend_url=backend.url,
        n_upload=5,
        title="demo stack test",
    )
    first = prepare_project(client, **kwargs)
    assert first.n_tasks == 8
    assert prepare_project(client, **kwargs) == first  # a second run reuses everything
    assert len(client.ml_backends(first.project_id)) == 1
    urls = [t["data"]["image"] for t in client.list_tasks(first.project_id)]
    assert sum("/data/upload/" in u for u in urls) == 5
    assert sum("/data/local-files/" in u for u in urls) == 3
