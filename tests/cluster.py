"""The distributed mode's processes for the tests: `labelloop serve` replicas and `labelloop
worker`s sharing one PostgreSQL ledger, one S3 store and one Redis queue, and the base model
published into that store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from servers import BackendProcess

from labelloop.lineages import Lineages
from labelloop.store import VERSIONS_DIR, ModelStore

__all__ = ["Cluster", "publish_base", "set_env"]


def publish_base(model_dir: Path, store_url: str, cache: Path, env: dict[str, str]) -> str:
    """Publish `model_dir`'s current version as the store's base model (what `labelloop train`
    does with LABELLOOP_STORE_URL set); returns the version."""
    source = ModelStore(model_dir)
    version = source.current_version()
    assert version is not None
    with set_env(env):
        base = Lineages(cache, store_url=store_url).base()
        with base.staging() as staged:
            shutil.copytree(source.root / VERSIONS_DIR / version, staged, dirs_exist_ok=True)
            base.publish(staged, source.manifest(version))
    return version


class Cluster:
    """Two replicas and a worker on one ledger, one store and one queue."""

    def __init__(
        self, root: Path, env: dict[str, str], *, worker_args: tuple[str, ...] = ()
    ) -> None:
        self.root = root
        self.env = env
        self.worker_args = worker_args
        self.replicas = [
            BackendProcess(root / f"replica{i}", root / f"replica{i}.log", env=env) for i in (1, 2)
        ]
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        n = len(self.workers) + 1
        log = (self.root / f"worker{n}.log").open("ab")
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "labelloop",
                "worker",
                "--model-dir",
                str(self.root / f"worker{n}"),
                "--auto-train-after",
                "10",
                "--quiet-seconds",
                "3600",
                "--tolerance",
                "1.0",  # the gate promotes whatever comes out: these tests are about plumbing
                "--no-auto-full",
                *self.worker_args,
            ],
            env=dict(os.environ, **self.env, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(worker)
        return worker

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait(timeout=10)
        for replica in self.replicas:
            replica.stop()


class set_env:
    """Environment variables set for a block (the store client reads AWS_* from there)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *_: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
