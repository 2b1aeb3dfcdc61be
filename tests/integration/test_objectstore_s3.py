"""MirroredStore against a real S3 server (SeaweedFS, started once per run by `s3_server`): the
publish protocol, replicas following `current`, verification, allocation, pruning, outages and
the errors a person sees. Each test has its own prefix (`s3_url`) and caches."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import wait_until
from objectstore import SPACE, manifest_named, publish_version, rejected, stage_placeholder

from labelloop.errors import StoreError
from labelloop.objectstore import MirroredStore, ObjectStoreError, project_url, remote_projects
from labelloop.store import ModelStore, load_bundle, verify_version_dir

pytestmark = pytest.mark.slow

POLL_S = 0.5


def _key(url: str, *parts: str) -> str:
    return "/".join([url.removeprefix("s3://"), *parts])


def test_publish_and_load_round_trip_through_the_cache(s3_url: str, tmp_path: Path) -> None:
    writer = MirroredStore(tmp_path / "writer", s3_url)
    version = publish_version(writer, real=True, seed=3)
    # A replica with an empty cache loads what the writer published, from the store alone.
    replica = MirroredStore(tmp_path / "replica", s3_url)
    bundle = replica.load_current()
    assert bundle.version == version
    assert bundle.classes == SPACE.classes
    assert bundle.thresholds == [0.3, 0.4, 0.5]
    assert bundle.path == tmp_path / "replica" / "versions" / version
    expected = load_bundle(tmp_path / "writer" / "versions" / version).model.state_dict()
    for name, tensor in bundle.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # Its cache is a store of its own: loadable with the object store gone.
    assert load_bundle(tmp_path / "replica").version == version
    assert [h["version"] for h in replica.history()] == [version]


def test_a_second_replica_serves_a_new_version_within_poll_seconds(
    s3_url: str, tmp_path: Path
) -> None:
    writer = MirroredStore(tmp_path / "writer", s3_url)
    replica = MirroredStore(tmp_path / "replica", s3_url, poll_seconds=POLL_S)
    first = publish_version(writer, real=True, seed=0)
    assert replica.current_version() == first
    second = publish_version(writer, real=True, seed=1)
    # poll_seconds, then the download of a 9 MB version: a few seconds at most on two cores.
    wait_until(
        lambda: replica.current_version() == second, timeout_s=POLL_S + 5, what="the replica"
    )
    verify_version_dir(replica.version_dir(second))
    assert replica.load_current().version == second


def test_a_corrupted_remote_file_is_refused_and_the_last_good_version_served(
    s3_server: Any, s3_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = MirroredStore(tmp_path / "writer", s3_url)
    replica = MirroredStore(tmp_path / "replica", s3_url, poll_seconds=POLL_S)
    good = publish_version(writer, real=True, seed=0)
    assert replica.current_version() == good
    bad = publish_version(writer, real=True, seed=1, make_current=False)
    s3_server.client().pipe_file(_key(s3_url, "versions", bad, "model.pth"), b"not a model")
    writer.set_current(bad)
    with caplog.at_level(logging.ERROR, logger="labelloop.objectstore"):
        assert replica.refresh() == good
    assert any(bad in r.getMessage() and "model.pth" in r.getMessage() for r in caplog.records)
    with pytest.raises(StoreError, match=rf"{bad}: model.pth downloaded from .* checksum"):
        replica.version_dir(bad)
    assert replica.load_current().version == good


def test_an_incomplete_remote_version_is_invisible_then_swept(
    s3_server: Any, s3_url: str, tmp_path: Path
) -> None:
    writer = MirroredStore(tmp_path / "writer", s3_url)
    good = publish_version(writer)
    torn = "v2-20240101T000000"  # a writer killed before its manifest
    s3_server.client().pipe_file(_key(s3_url, "versions", torn, "model.pth"), b"half")
    reader = MirroredStore(tmp_path / "reader", s3_url)
    assert reader.versions() == [good]
    with pytest.raises(StoreError, match="never finished"):
        reader.set_current(torn)
    assert reader.refresh() == good
    assert reader.next_version_name().startswith("v3-")
    # The next publish sweeps it (its name is years old): its objects go, a marker keeps the
    # number taken.
    assert publish_version(writer).startswith("v3-")
    left = s3_server.client().find(_key(s3_url, "versions", torn))
    assert [key.rsplit("/", 1)[-1] for key in left] == [".torn"]
    assert reader.next_version_name().startswith("v4-")


def test_two_writers_with_an_allocator_get_distinct_increasing_numbers(
    s3_url: str, tmp_path: Path
) -> None:
    lock = threading.Lock()
    counter = {"next": 1}

    def allocate(at_least: int) -> int:  # what the ledger's counter does
        with lock:
            number = max(counter["next"], at_least)
            counter["next"] = number + 1
            return number

    writers = [MirroredStore(tmp_path / f"w{i}", s3_url, allocate=allocate) for i in (1, 2)]
    names: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            for seed in range(3):
                names[i].append(publish_version(writers[i], seed=seed, make_current=False))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for mine in names:  # each writer's numbers increase
        numbers = [int(n.split("-")[0][1:]) for n in mine]
        assert numbers == sorted(numbers)
    every = sorted(int(n.split("-")[0][1:]) for n in [*names[0], *names[1]])
    assert every == list(range(1, 7))  # distinct, none lost
    assert len(MirroredStore(tmp_path / "reader", s3_url).versions()) == 6


def test_prune_keeps_manifests(s3_server: Any, s3_url: str, tmp_path: Path) -> None:
    writer = MirroredStore(tmp_path / "writer", s3_url)
    current = publish_version(writer)
    candidates = [
        publish_version(writer, seed=i, metrics=rejected(), make_current=False) for i in range(3)
    ]
    assert writer.prune_rejected(keep=1) == candidates[:2]
    client = s3_server.client()
    for version in candidates[:2]:
        assert not client.exists(_key(s3_url, "versions", version, "model.pth"))
        assert client.exists(_key(s3_url, "versions", version, "manifest.json"))
    reader = MirroredStore(tmp_path / "reader", s3_url)
    assert reader.versions() == [current, *candidates]
    assert reader.manifest(candidates[0]).weights_pruned
    assert reader.manifest(candidates[0]).metrics["incremental"]["gate"]["promote"] is False
    assert not reader.manifest(candidates[2]).weights_pruned
    with pytest.raises(StoreError, match="pruned"):
        reader.set_current(candidates[0])


def test_projects_are_listed_from_the_store(s3_url: str, tmp_path: Path) -> None:
    for project in (4, 2):
        publish_version(MirroredStore(tmp_path / str(project), project_url(s3_url, project)))
    assert remote_projects(s3_url) == [2, 4]


def test_with_the_server_stopped_the_last_version_serves_and_publish_says_why(
    s3_server: Any, s3_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = MirroredStore(tmp_path / "writer", s3_url)
    replica = MirroredStore(tmp_path / "replica", s3_url, poll_seconds=POLL_S)
    first = publish_version(writer, real=True)
    assert replica.current_version() == first
    name = writer.next_version_name()
    s3_server.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="labelloop.objectstore"):
            for _ in range(3):
                assert replica.refresh() == first
            assert replica.current_version() == first
            assert replica.load_current().version == first  # from the cache
            started = time.monotonic()
            with writer.staging() as staged, pytest.raises(ObjectStoreError) as failed:
                stage_placeholder(staged)
                writer.publish(staged, manifest_named(name))
            failed_in_s = time.monotonic() - started
        message = str(failed.value)
        assert message.startswith(f"cannot publish {name}: cannot reach the object store at ")
        assert s3_server.endpoint_url in message and "AWS_ENDPOINT_URL" in message
        assert s3_server.secret_key not in message
        assert failed_in_s < 15  # fails fast, not after minutes of retries
        outage = [r for r in caplog.records if "until it is back" in r.getMessage()]
        assert len(outage) == 1
        assert not (tmp_path / "writer" / "versions" / name).exists()
    finally:
        s3_server.start()
    # Back by itself: the replica follows again, and publishing works.
    second = publish_version(writer, real=True, seed=1)
    wait_until(
        lambda: replica.current_version() == second, timeout_s=POLL_S + 20, what="the replica"
    )
    verify_version_dir(replica.version_dir(second))


def test_refused_credentials_and_a_missing_bucket_are_explained(
    s3_server: Any, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all")
    with pytest.raises(ObjectStoreError, match="refused the credentials") as refused:
        MirroredStore(tmp_path / "a", s3_url).check()
    assert "AWS_SECRET_ACCESS_KEY" in str(refused.value)
    assert "not-the-secret-at-all" not in str(refused.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    with pytest.raises(ObjectStoreError, match="bucket 'no-such-bucket' does not exist") as gone:
        MirroredStore(tmp_path / "b", "s3://no-such-bucket/models").check()
    assert "aws s3 mb s3://no-such-bucket" in str(gone.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ObjectStoreError, match="no credentials"):
        MirroredStore(tmp_path / "c", s3_url).check()
    assert ModelStore(tmp_path / "c").current_version() is None
