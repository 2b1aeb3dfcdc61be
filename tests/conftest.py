"""Shared fixtures: a tiny demo dataset and a tiny trained model, made once per test run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from labelloop.config import TrainConfig
from labelloop.dev.demo import LABEL_GROUPS, DemoDataset, generate_demo_dataset
from labelloop.training.offline import DataSource, TrainOptions, TrainOutcome, run_training

# Two cores: more threads only add contention in the tests.
torch.set_num_threads(2)


def tiny_config(**optim: object) -> TrainConfig:
    """ResNet18 at 32 px, random init: seconds per epoch on two CPU cores."""
    return TrainConfig().with_overrides(
        {
            "data": {"classes": {g: list(c) for g, c in LABEL_GROUPS.items()}},
            "preprocess": {"image_size": 32},
            "model": {"weights": "none"},
            "optim": {"epochs": 2, "batch_size": 16, "lr": 2e-3, **optim},
        }
    )


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), n=120, seed=3, size=48)


@pytest.fixture(scope="session")
def trained_model(
    demo_dataset: DemoDataset, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrainOutcome]:
    model_dir = tmp_path_factory.mktemp("model")
    outcome = run_training(
        tiny_config(),
        DataSource(images=demo_dataset.images_dir, metadata=demo_dataset.metadata_csv),
        TrainOptions(model_dir=model_dir, show_progress=False),
    )
    assert outcome is not None
    return model_dir, outcome


# --- a real Label Studio and our backend as processes, for end-to-end tests ----------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory):
    """Label Studio 1.23.2 in its own venv (installed on first use), booted once per run."""
    from labelloop.dev.launcher import (
        LabelStudioServer,
        LabelStudioSettings,
        ensure_label_studio,
        free_port,
    )
    from labelloop.labelstudio.client import LabelStudioClient

    executable = ensure_label_studio(Path(os.environ.get("LABELLOOP_LS_VENV", REPO / ".venv-ls")))
    root = tmp_path_factory.mktemp("label-studio")
    settings = LabelStudioSettings(
        data_dir=root / "data", document_root=root / "files", port=free_port()
    )
    settings.document_root.mkdir(parents=True)
    with LabelStudioServer(executable, settings, log_file=root / "label-studio.log") as server:
        client = LabelStudioClient(settings.url, settings.token)
        try:
            yield server, client
        finally:
            client.close()


@pytest.fixture(scope="session")
def backend_factory(label_studio, trained_model, tmp_path_factory: pytest.TempPathFactory):
    from servers import BackendProcess

    server, _ = label_studio
    started: list[BackendProcess] = []

    def start(
        *, basic_auth: tuple[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> BackendProcess:
        folder = tmp_path_factory.mktemp("backend")
        # Each backend learns into its own copy: versions and ledgers never leak between tests.
        model_dir = folder / "model"
        shutil.copytree(trained_model[0], model_dir)
        backend = BackendProcess(
            model_dir,
            folder / "backend.log",
            env={
                "LABEL_STUDIO_URL": server.settings.url,
                "LABEL_STUDIO_API_KEY": server.settings.token,
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(server.settings.document_root),
                "LOG_LEVEL": "INFO",
            },
            basic_auth=basic_auth,
            args=args,
        )
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture(scope="session")
def backend(backend_factory):
    return backend_factory()
