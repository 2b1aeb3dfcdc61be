"""Shared by the serving benchmarks: photo-sized uploads in a real Label Studio, and our backend
in this process, configured the way `labelloop serve` is."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import REPO
from PIL import Image

from labelloop.dev.demo import LABEL_GROUPS, generate_demo_dataset, render_label_config
from labelloop.dev.launcher import (
    LabelStudioServer,
    LabelStudioSettings,
    ensure_label_studio,
    free_port,
)
from labelloop.dev.threaded import serve_in_thread
from labelloop.labelstudio.client import LabelStudioClient
from labelloop.serve.app import build_app
from labelloop.serve.settings import settings_from


def make_photos(
    out: Path, n: int, *, min_px: int = 640, max_px: int = 1024, seed: int = 0
) -> list[Path]:
    """n JPEGs (quality 90) of random width and height in [min_px, max_px]: demo scenes drawn
    small, upscaled, with sensor-like grain so they compress (and download) like photos rather
    than like flat synthetic renders."""
    data = generate_demo_dataset(out / "demo", n=n, size=256, seed=seed)
    rng = np.random.default_rng(seed)
    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, source in enumerate(sorted(data.images_dir.glob("*.png"))):
        width, height = (int(v) for v in rng.integers(min_px, max_px + 1, size=2))
        with Image.open(source) as small:
            big = np.asarray(small.convert("RGB").resize((width, height), Image.BICUBIC))
        grain = rng.normal(0.0, 4.0, size=big.shape)
        pixels = np.clip(big.astype(np.float32) + grain, 0, 255).astype(np.uint8)
        path = photos / f"photo_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def label_config() -> str:
    return render_label_config(LABEL_GROUPS)


@dataclass
class Stack:
    ls: LabelStudioSettings
    client: LabelStudioClient
    config: str
    projects: dict[str, int] = field(default_factory=dict)

    def project(self, title: str, photos: list[Path]) -> int:
        pid = int(self.client.create_project(f"bench {title}", self.config)["id"])
        self.client.import_files(pid, photos)
        self.projects[title] = pid
        return pid

    def tasks(self, title: str) -> list[dict[str, Any]]:
        """The project's tasks as Label Studio puts them in a /predict body (fields=all)."""
        return sorted(self.client.list_tasks(self.projects[title]), key=lambda t: t["id"])

    def predict_body(self, title: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        project = self.client.get_project(self.projects[title])
        return {
            "tasks": tasks,
            "project": f"{project['id']}.{int(time.time())}",
            "label_config": self.config,
            "params": {"login": None, "password": None, "context": None},
        }


@contextmanager
def label_studio(root: Path) -> Iterator[Stack]:
    """A real Label Studio on 127.0.0.1 with its data under `root`."""
    ls = LabelStudioSettings(data_dir=root / "ls", document_root=root / "files", port=free_port())
    ls.document_root.mkdir(parents=True, exist_ok=True)
    executable = ensure_label_studio(REPO / ".venv-ls")
    with (
        LabelStudioServer(executable, ls, log_file=root / "label-studio.log"),
        LabelStudioClient(ls.url, ls.token) as client,
    ):
        yield Stack(ls, client, label_config())


@contextmanager
def backend(model_dir: Path, ls: LabelStudioSettings, *, runtime: str = "auto") -> Iterator[str]:
    """Our server in a thread, as `labelloop serve` would run with LABEL_STUDIO_URL and
    LABEL_STUDIO_API_KEY set: images are downloaded from Label Studio with the token."""
    port = free_port()
    settings = settings_from(
        {"model_dir": model_dir, "port": port, "runtime": runtime},
        {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token},
    )
    with serve_in_thread(build_app(settings), port=port, start_timeout_s=120) as url:
        yield url


class PredictLog(logging.Handler):
    """Keeps the predictor's per-request summary (tasks, seconds, forward seconds)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.runs: list[dict[str, float]] = []
        self.runner: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("predict: %d tasks in") and isinstance(record.args, tuple):
            n, seconds, _, forward, failed = record.args
            self.runs.append({"tasks": n, "seconds": seconds, "forward": forward, "failed": failed})
        elif record.msg == "%s runs on %s" and isinstance(record.args, tuple):
            self.runner = str(record.args[1])

    @contextmanager
    def attached(self) -> Iterator[PredictLog]:
        loggers = [logging.getLogger(n) for n in ("labelloop.runtime.predictor",)]
        saved = [(lg.level, lg.propagate) for lg in loggers]
        for lg in loggers:
            # INFO reaches this handler only; the console keeps showing warnings alone.
            lg.setLevel(logging.INFO)
            lg.propagate = False
            lg.addHandler(self)
        try:
            yield self
        finally:
            for lg, (level, propagate) in zip(loggers, saved, strict=True):
                lg.removeHandler(self)
                lg.setLevel(level)
                lg.propagate = propagate


def download_all(ls: LabelStudioSettings, urls: list[str]) -> tuple[list[bytes], float]:
    """Every image, one plain GET at a time with the token: what downloading alone costs."""
    bodies = []
    started = time.perf_counter()
    with httpx.Client(
        base_url=ls.url, headers={"Authorization": f"Token {ls.token}"}, timeout=60
    ) as http:
        for url in urls:
            reply = http.get(url)
            reply.raise_for_status()
            bodies.append(reply.content)
    return bodies, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def quiet_logs() -> None:
    """Benchmarks print their own tables; keep the server's warnings only."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
