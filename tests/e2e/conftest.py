"""Fixtures of the end-to-end tests: a real Label Studio and our backend as processes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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
        *,
        basic_auth: tuple[str, str] | None = None,
        args: tuple[str, ...] = (),
        starter: Path | None = None,
        empty: bool = False,
    ) -> BackendProcess:
        """A backend serving a copy of `starter` (the session's tiny model by default), or an
        empty model folder (`empty`: it starts cold)."""
        folder = tmp_path_factory.mktemp("backend")
        # Each backend learns into its own copy: versions and ledgers never leak between tests.
        model_dir = folder / "model"
        if empty:
            model_dir.mkdir()
        else:
            shutil.copytree(starter or trained_model[0], model_dir)
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
