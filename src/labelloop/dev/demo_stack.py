"""The one-command demo: demo data and a starter model, a real Label Studio, our backend, and a
project wired to it, all on 127.0.0.1. A second run reuses whatever exists."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from labelloop.config import TrainConfig
from labelloop.dev.demo import LABEL_GROUPS, generate_demo_dataset
from labelloop.dev.launcher import LabelStudioServer, LabelStudioSettings, ensure_label_studio
from labelloop.dev.threaded import serve_in_thread
from labelloop.labelstudio.client import LabelStudioClient
from labelloop.serve.app import build_app
from labelloop.serve.settings import ServeSettings, settings_from
from labelloop.store import ModelStore
from labelloop.training.offline import DataSource, TrainOptions, TrainOutcome, run_training

logger = logging.getLogger(__name__)

PROJECT_TITLE = "labelloop demo"
BACKEND_TITLE = "labelloop"


@dataclass(frozen=True)
class DemoPaths:
    workdir: Path

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def model(self) -> Path:
        return self.workdir / "model"

    @property
    def label_studio(self) -> Path:
        return self.workdir / "label-studio"


def train_demo_model(
    paths: DemoPaths, *, n: int, size: int, epochs: int, show_progress: bool = True
) -> TrainOutcome | None:
    """Demo data (if missing) and a model trained on it, published in paths.model."""
    if not (paths.data / "metadata.csv").is_file():
        generate_demo_dataset(paths.data, n=n, size=size, show_progress=show_progress)
    config = TrainConfig().with_overrides(
        {
            "data": {"classes": {g: list(c) for g, c in LABEL_GROUPS.items()}},
            "preprocess": {"image_size": min(size, 112)},
            # The best backbone with ImageNet weights at hand (offline: MobileNetV2's shipped
            # features): a few epochs from pretrained features beat 25 from random init.
            "model": {"backbone": "auto", "weights": "imagenet"},
            "optim": {"epochs": epochs, "patience": 2, "batch_size": 32, "lr": 1e-3},
        }
    )
    return run_training(
        config,
        DataSource(images=paths.data / "images", metadata=paths.data / "metadata.csv"),
        TrainOptions(model_dir=paths.model, show_progress=show_progress),
    )


@dataclass(frozen=True)
class DemoProject:
    project_id: int
    ml_backend_id: int
    n_tasks: int


def prepare_project(
    client: LabelStudioClient,
    *,
    label_config: str,
    images: Sequence[Path],
    storage_dir: Path,
    backend_url: str,
    n_upload: int,
    title: str = PROJECT_TITLE,
) -> DemoProject:
    """Create (or find) the demo project: some images uploaded, the rest through local storage,
    and the backend connected. Idempotent, so a second demo run changes nothing."""
    existing = [p for p in client.projects() if p.get("title") == title]
    if existing:
        project_id = int(existing[0]["id"])
        logger.info("Reusing Label Studio project %d (%s)", project_id, title)
    else:
        project_id = int(client.create_project(title, label_config)["id"])
        client.import_files(project_id, list(images[:n_upload]))
        storage_dir.mkdir(parents=True, exist_ok=True)
        for image in images[n_upload:]:
            target = storage_dir / image.name
            if not target.exists():
                os.link(image, target)
        if len(images) > n_upload:
            client.add_local_storage(project_id, storage_dir, title="demo images")
        logger.info("Created Label Studio project %d (%s)", project_id, title)
    backends = [b for b in client.ml_backends(project_id) if b.get("url") == backend_url]
    if backends:
        ml_backend_id = int(backends[0]["id"])
    else:
        ml_backend_id = int(
            client.connect_ml_backend(project_id, backend_url, title=BACKEND_TITLE)["id"]
        )
    n_tasks = int(client.get_project(project_id).get("task_number") or 0)
    return DemoProject(project_id, ml_backend_id, n_tasks)


@dataclass(frozen=True)
class DemoReady:
    project_url: str
    username: str
    password: str
    backend_url: str
    model_version: str | None
    n_tasks: int
    retrieve_seconds: float


def colocated_settings(
    model_dir: Path,
    ls: LabelStudioSettings,
    *,
    port: int | None = None,
    uploads_from_disk: bool = True,
) -> ServeSettings:
    """Backend settings for a Label Studio on this machine: it reads local files and (unless
    `uploads_from_disk` is False) uploads straight from Label Studio's folders."""
    env = {
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(ls.document_root),
    }
    if uploads_from_disk:
        env["LABEL_STUDIO_BASE_DATA_DIR"] = str(ls.data_dir)
    return settings_from({"model_dir": model_dir, "port": port}, env)


@contextmanager
def backend_in_thread(
    model_dir: Path, ls: LabelStudioSettings, *, port: int, uploads_from_disk: bool = True
) -> Iterator[str]:
    """Our server (with its background trainer) in this process, for Label Studio to call."""
    settings = colocated_settings(model_dir, ls, port=port, uploads_from_disk=uploads_from_disk)
    with serve_in_thread(build_app(settings), port=port, start_timeout_s=60) as url:
        yield url


def run_stack(
    paths: DemoPaths,
    *,
    ls_venv: Path,
    ls_port: int,
    backend_port: int,
    n_upload: int,
    wait: Callable[[DemoReady], None],
) -> None:
    """Start Label Studio and the backend, wire the demo project, then `wait(ready)`; leaving
    `wait` (Ctrl-C) stops everything this started."""
    executable = ensure_label_studio(ls_venv)
    ls = LabelStudioSettings(
        data_dir=paths.label_studio / "data",
        document_root=paths.label_studio / "files",
        port=ls_port,
    )
    ls.document_root.mkdir(parents=True, exist_ok=True)
    images = sorted((paths.data / "images").glob("*.png"))
    with (
        LabelStudioServer(executable, ls, log_file=paths.label_studio / "label-studio.log"),
        backend_in_thread(paths.model, ls, port=backend_port) as backend_url,
        LabelStudioClient(ls.url, ls.token) as client,
    ):
        project = prepare_project(
            client,
            label_config=(paths.data / "label_config.xml").read_text(),
            images=images,
            storage_dir=ls.document_root / "demo-images",
            backend_url=backend_url,
            n_upload=n_upload,
        )
        started = time.perf_counter()
        client.retrieve_predictions(project.project_id)
        seconds = time.perf_counter() - started
        logger.info("Retrieve Predictions over %d tasks took %.1f s", project.n_tasks, seconds)
        # From now on predictions show as pre-annotations and opening a task asks for one.
        # (Set after the bulk run: with it on, merely listing tasks predicts them.)
        client.update_project(
            project.project_id,
            show_collab_predictions=True,
            evaluate_predictions_automatically=True,
        )
        wait(
            DemoReady(
                project_url=f"{ls.url}/projects/{project.project_id}/data",
                username=ls.username,
                password=ls.password,
                backend_url=backend_url,
                model_version=ModelStore(paths.model).current_version(),
                n_tasks=project.n_tasks,
                retrieve_seconds=seconds,
            )
        )
