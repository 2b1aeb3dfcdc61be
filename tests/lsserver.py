"""A real Label Studio for the end-to-end tests (tests/e2e/conftest.py boots the shared one)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

__all__ = ["booted_label_studio"]


@contextmanager
def booted_label_studio(root: Path) -> Iterator[tuple[Any, Any]]:
    """Label Studio 1.23.2 in its own venv (installed on first use) with its data under root."""
    from labelloop.dev.launcher import (
        LabelStudioServer,
        LabelStudioSettings,
        ensure_label_studio,
        free_port,
    )
    from labelloop.labelstudio.client import LabelStudioClient

    executable = ensure_label_studio(Path(os.environ.get("LABELLOOP_LS_VENV", REPO / ".venv-ls")))
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
