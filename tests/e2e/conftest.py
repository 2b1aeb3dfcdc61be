"""Fixtures of the end-to-end tests: a real Label Studio and our backend as processes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory):
    """The Label Studio most e2e tests share, booted once per run."""
    from lsserver import booted_label_studio

    with booted_label_studio(tmp_path_factory.mktemp("label-studio")) as booted:
        yield booted


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
