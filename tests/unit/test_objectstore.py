"""MirroredStore's own logic on fsspec's in-memory filesystem: the publish protocol, following
`current`, verification, outages (simulated), allocation, pruning, errors. The same promises
against a real S3 server are in tests/integration/test_objectstore.py."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from fsspec.implementations.memory import MemoryFileSystem
from helpers import wait_until
from objectstore import manifest_named, publish_version, rejected, stage_placeholder

from labelloop import objectstore
from labelloop.errors import StoreError
from labelloop.objectstore import (
    MirroredStore,
    ObjectStoreError,
    classify,
    open_remote,
    project_url,
    remote_error,
    remote_projects,
)
from labelloop.store import ModelBundle, ModelStore, read_manifest, store_onnx, verify_version_dir


class ScriptedMemory(MemoryFileSystem):
    """The in-memory filesystem, recording writes, able to go down, and to hold pointer reads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[str] = []
        self.pointer_reads = 0
        self.down = False
        self.hold = threading.Event()
        self.hold.set()

    def _check(self) -> None:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")

    def cat_file(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self._check()
        if path.endswith("/current"):
            self.pointer_reads += 1
            assert self.hold.wait(timeout=30)
        return super().cat_file(path, *args, **kwargs)

    def pipe_file(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self._check()
        self.writes.append(path)
        return super().pipe_file(path, *args, **kwargs)

    def put_file(self, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> Any:
        self._check()
        self.writes.append(rpath)
        return super().put_file(lpath, rpath, *args, **kwargs)

    def get_file(self, rpath: str, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().get_file(rpath, *args, **kwargs)

    def find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return super().find(path, *args, **kwargs)

    def rm_file(self, path: str) -> Any:
        self._check()
        return super().rm_file(path)


@pytest.fixture()
def fs() -> Iterator[ScriptedMemory]:
    yield ScriptedMemory(skip_instance_cache=True)


@pytest.fixture()
def url(fs: ScriptedMemory) -> Iterator[str]:
    prefix = f"/test-{uuid.uuid4().hex}"
    yield f"memory://{prefix}"
    fs.hold.set()
    fs.down = False
    for path in fs.find(prefix):
        fs.rm_file(path)


def _store(root: Path, url: str, fs: Any, **kwargs: Any) -> MirroredStore:
    return MirroredStore(root, url, fs=fs, **kwargs)


def _corrupt(fs: Any, url: str, version: str, name: str = "model.pth") -> None:
    fs.pipe_file(f"{fs._strip_protocol(url)}/versions/{version}/{name}", b"bit rot")


# -- publishing ------------------------------------------------------------------------------------


def test_publish_uploads_the_manifest_last_then_the_pointer(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    store = _store(tmp_path / "a", url, fs)
    version = publish_version(store, extra_files={"evaluation/report.md": b"# report"})
    root = fs._strip_protocol(url)
    writes = [w.removeprefix(f"{root}/") for w in fs.writes]
    files = [f"versions/{version}/{n}" for n in ("classes.json", "model.pth", "thresholds.json")]
    assert writes[:5] == [
        *files[:1],
        f"versions/{version}/evaluation/report.md",
        *files[1:],
        f"versions/{version}/manifest.json",
    ]
    assert writes[5] == "current"
    assert writes[6].startswith("history/") and len(writes) == 7
    assert fs.cat_file(f"{root}/current") == f"{version}\n".encode()
    manifest = json.loads(fs.cat_file(f"{root}/versions/{version}/manifest.json"))
    assert set(manifest["files"]) == {"model.pth", "classes.json", "thresholds.json"}
    assert store.versions() == [version]
    assert store.current_version() == version
    # The cache holds the version and its own pointer: loadable without the store.
    assert ModelStore(tmp_path / "a").current_version() == version
    verify_version_dir(tmp_path / "a" / "versions" / version)


def test_publish_without_make_current_leaves_the_pointer(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    store = _store(tmp_path / "a", url, fs)
    first = publish_version(store)
    second = publish_version(store, make_current=False)
    assert store.versions() == [first, second]
    assert store.refresh() == first
    store.set_current(second, reason="rollback")
    assert [(h["version"], h["reason"]) for h in store.history()] == [
        (first, "promotion"),
        (second, "rollback"),
    ]


def test_the_onnx_export_kept_after_a_load_goes_up_before_current_moves(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    """What the worker does on a promotion: publish, load (store_onnx keeps the export in the
    cache and its manifest), then move current: replicas get the graph with the version."""
    writer = _store(tmp_path / "writer", url, fs)
    version = publish_version(writer, make_current=False)
    assert writer.current_version() is None
    cached = writer.version_dir(version)
    store_onnx(load_placeholder(cached), b"onnx graph")
    writer.set_current(version)
    root = fs._strip_protocol(url)
    assert fs.cat_file(f"{root}/versions/{version}/model.onnx") == b"onnx graph"
    remote = json.loads(fs.cat_file(f"{root}/versions/{version}/manifest.json"))
    assert "model.onnx" in remote["files"]
    writes = [w.removeprefix(f"{root}/") for w in fs.writes]
    assert writes.index(f"versions/{version}/model.onnx") < writes.index("current")
    replica = _store(tmp_path / "replica", url, fs, poll_seconds=0.0)
    wait_until(lambda: replica.current_version() == version, timeout_s=10, what="the replica")
    cached_there = tmp_path / "replica" / "versions" / version
    verify_version_dir(cached_there)
    assert (cached_there / "model.onnx").read_bytes() == b"onnx graph"


def load_placeholder(folder: Path) -> ModelBundle:
    """A bundle of a placeholder version, enough for store_onnx (no weights are read)."""
    manifest = read_manifest(folder)
    return ModelBundle(
        model=None,  # type: ignore[arg-type]
        label_space=None,  # type: ignore[arg-type]
        thresholds=[],
        preprocess=manifest.preprocess,
        manifest=manifest,
        path=folder,
    )


def test_a_version_already_in_the_store_is_not_published_again(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    a = _store(tmp_path / "a", url, fs)
    version = publish_version(a)
    b = _store(tmp_path / "b", url, fs)  # a writer that drew the same name (no allocator)
    with b.staging() as staged, pytest.raises(StoreError, match="already exists"):
        stage_placeholder(staged)
        b.publish(staged, manifest_named(version))
    assert not (tmp_path / "b" / "versions" / version).exists()
    verify_version_dir(_store(tmp_path / "c", url, fs).version_dir(version))


# -- following current --------------------------------------------------------------------------


def test_a_replica_follows_current_and_serves_verified_files(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    writer = _store(tmp_path / "writer", url, fs)
    replica = _store(tmp_path / "replica", url, fs, poll_seconds=0.0)
    assert replica.current_version() is None
    first = publish_version(writer, extra_files={"evaluation/report.md": b"# report"})
    wait_until(lambda: replica.current_version() == first, timeout_s=10, what="the replica")
    cached = tmp_path / "replica" / "versions" / first
    verify_version_dir(cached)
    assert (cached / "evaluation" / "report.md").read_bytes() == b"# report"
    second = publish_version(writer, seed=1)
    wait_until(lambda: replica.current_version() == second, timeout_s=10, what="the replica")
    assert replica.version_dir(second) == tmp_path / "replica" / "versions" / second
    assert ModelStore(tmp_path / "replica").current_version() == second


def test_the_pointer_is_read_at_most_every_poll_seconds_even_with_a_store_per_request(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    version = publish_version(_store(tmp_path / "writer", url, fs))
    fs.pointer_reads = 0
    # ProjectModels builds a store per lookup: the poll state is per (remote, cache), not object.
    answers = [
        _store(tmp_path / "replica", url, fs, poll_seconds=3600).current_version()
        for _ in range(50)
    ]
    assert answers == [version] * 50
    assert fs.pointer_reads == 1


def test_a_slow_store_never_holds_up_a_request(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    writer = _store(tmp_path / "writer", url, fs)
    replica = _store(tmp_path / "replica", url, fs, poll_seconds=0.0)
    first = publish_version(writer)
    assert replica.current_version() == first
    second = publish_version(writer, seed=1)
    fs.hold.clear()  # pointer reads now block until released
    for _ in range(20):
        assert replica.current_version() == first  # answered while the poll hangs
    fs.hold.set()
    wait_until(lambda: replica.current_version() == second, timeout_s=10, what="the replica")


def test_a_corrupt_version_is_refused_and_the_last_good_one_served(
    tmp_path: Path, fs: ScriptedMemory, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    writer = _store(tmp_path / "writer", url, fs)
    replica = _store(tmp_path / "replica", url, fs, poll_seconds=0.0)
    good = publish_version(writer)
    assert replica.refresh() == good
    bad = publish_version(writer, seed=1, make_current=False)
    _corrupt(fs, url, bad)
    writer.set_current(bad)  # the writer's cached copy is fine; the remote one is not
    with caplog.at_level(logging.ERROR, logger="labelloop.objectstore"):
        for _ in range(5):
            assert replica.refresh() == good
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1  # once, not at every poll
    assert bad in refusals[0].getMessage() and "model.pth" in refusals[0].getMessage()
    with pytest.raises(StoreError, match=rf"{bad}: model.pth .* does not match its checksum"):
        replica.version_dir(bad)
    assert not (tmp_path / "replica" / "versions" / bad).exists()
    assert not list((tmp_path / "replica" / "versions").glob(".staging-*"))


def test_a_torn_upload_is_invisible(tmp_path: Path, fs: ScriptedMemory, url: str) -> None:
    writer = _store(tmp_path / "writer", url, fs)
    good = publish_version(writer)
    root = fs._strip_protocol(url)
    torn = "v2-20240101T000000"
    fs.pipe_file(f"{root}/versions/{torn}/model.pth", b"half of it")  # killed before the manifest
    replica = _store(tmp_path / "replica", url, fs)
    assert replica.versions() == [good]
    with pytest.raises(StoreError, match="never finished"):
        replica.set_current(torn)
    with pytest.raises(StoreError, match="no complete version"):
        replica.version_dir(torn)
    assert replica.next_version_name().startswith("v3-")  # its number is not handed out again
    assert replica.refresh() == good


def test_torn_uploads_an_hour_old_are_swept_and_their_numbers_stay_taken(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    writer = _store(tmp_path / "writer", url, fs)
    good = publish_version(writer)
    root = fs._strip_protocol(url)
    old, recent = "v2-20240101T000000", "v3-20240101T005959"
    for torn in (old, recent):  # writers killed before the manifest
        fs.pipe_file(f"{root}/versions/{torn}/model.pth", b"half of it")
        fs.pipe_file(f"{root}/versions/{torn}/classes.json", b"{}")
    now = datetime(2024, 1, 1, 1, 0, 30, tzinfo=UTC)

    assert writer.sweep_torn(now=now) == [old]
    assert fs.find(f"{root}/versions/{old}") == [f"{root}/versions/{old}/.torn"]
    # Thirty seconds short of an hour: perhaps still uploading, left alone.
    assert len(fs.find(f"{root}/versions/{recent}")) == 2
    assert writer.sweep_torn(now=now) == []  # a swept upload is not swept again
    assert writer.versions() == [good]
    assert writer.next_version_name().startswith("v4-")
    with pytest.raises(StoreError, match="never finished"):
        writer.set_current(old)

    # Each publish sweeps (with the real clock, both torn uploads are old by now).
    published = publish_version(writer)
    assert published.startswith("v4-")
    assert fs.find(f"{root}/versions/{recent}") == [f"{root}/versions/{recent}/.torn"]
    assert writer.next_version_name().startswith("v5-")


def test_a_pruned_version_cannot_become_current(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    writer = _store(tmp_path / "writer", url, fs)
    replica = _store(tmp_path / "replica", url, fs)
    current = publish_version(writer)
    candidates = [
        publish_version(writer, seed=i, metrics=rejected(), make_current=False) for i in range(3)
    ]
    replica.version_dir(candidates[0])  # cached before the prune
    assert writer.prune_rejected(keep=1) == candidates[:2]
    root = fs._strip_protocol(url)
    for version in candidates[:2]:
        manifest = json.loads(fs.cat_file(f"{root}/versions/{version}/manifest.json"))
        assert manifest["weights_pruned"] and "model.pth" not in manifest["files"]
        assert not fs.exists(f"{root}/versions/{version}/model.pth")
    assert fs.exists(f"{root}/versions/{candidates[2]}/model.pth")
    assert writer.versions() == [current, *candidates]  # manifests and metrics stay
    assert writer.prune_rejected(keep=1) == []
    # A replica's cached copy follows the prune when it next reads the manifest.
    assert replica.manifest(candidates[0]).weights_pruned
    assert not (tmp_path / "replica" / "versions" / candidates[0] / "model.pth").exists()
    with pytest.raises(StoreError, match="pruned"):
        replica.set_current(candidates[0])
    assert replica.refresh() == current


# -- outages ---------------------------------------------------------------------------------------


def test_an_outage_serves_the_last_version_warns_once_and_recovers(
    tmp_path: Path, fs: ScriptedMemory, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    writer = _store(tmp_path / "writer", url, fs)
    replica = _store(tmp_path / "replica", url, fs, poll_seconds=0.0)
    first = publish_version(writer)
    assert replica.refresh() == first
    fs.down = True
    with caplog.at_level(logging.WARNING, logger="labelloop.objectstore"):
        for _ in range(5):
            assert replica.refresh() == first
            assert replica.current_version() == first
        with pytest.raises(ObjectStoreError, match="cannot reach the object store") as failed:
            publish_version(writer, seed=1)  # fails at next_version_name, before any work
        assert failed.value.unavailable
        with writer.staging() as staged, pytest.raises(ObjectStoreError) as failed:
            writer.publish(staged, manifest_named("v7-20240101T000000"))
    assert str(failed.value).startswith("cannot publish v7-20240101T000000: cannot reach")
    warnings = [r for r in caplog.records if "serving" in r.getMessage()]
    assert len(warnings) == 1 and first in warnings[0].getMessage()
    assert replica.version_dir(first).is_dir()  # cached: no store needed
    assert replica.manifest(first).version == first
    caplog.clear()
    fs.down = False
    with caplog.at_level(logging.WARNING, logger="labelloop.objectstore"):
        second = publish_version(writer, seed=1)
        assert replica.refresh() == second
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_an_upload_cut_short_publishes_nothing(
    tmp_path: Path, fs: ScriptedMemory, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = _store(tmp_path / "writer", url, fs)
    first = publish_version(writer)
    put_file = ScriptedMemory.put_file

    def dies_at_the_manifest(self: ScriptedMemory, lpath: str, rpath: str, **kw: Any) -> Any:
        if rpath.endswith("manifest.json"):
            raise ConnectionResetError(104, "Connection reset by peer")
        return put_file(self, lpath, rpath, **kw)

    monkeypatch.setattr(ScriptedMemory, "put_file", dies_at_the_manifest)
    with pytest.raises(ObjectStoreError, match="only in the local cache"):
        publish_version(writer, seed=1)
    monkeypatch.undo()
    assert writer.versions() == [first]
    assert _store(tmp_path / "replica", url, fs).refresh() == first
    assert writer.next_version_name().startswith("v3-")


def test_a_replica_starting_during_an_outage_serves_its_cache(
    tmp_path: Path, fs: ScriptedMemory, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = publish_version(_store(tmp_path / "writer", url, fs))
    assert _store(tmp_path / "replica", url, fs).refresh() == version
    monkeypatch.setattr(objectstore, "_watches", {})  # a new process
    fs.down = True
    restarted = _store(tmp_path / "replica", url, fs)
    assert restarted.current_version() == version
    assert restarted.load_current is not None
    with pytest.raises(ObjectStoreError, match="cannot reach"):
        restarted.versions()


# -- version numbers ---------------------------------------------------------------------------


def test_writers_with_an_allocator_draw_distinct_increasing_numbers(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    counter = itertools.count(1)
    lock = threading.Lock()
    floors: list[int] = []

    def allocate(at_least: int) -> int:
        with lock:
            floors.append(at_least)
            return max(next(counter), at_least)

    writers = [_store(tmp_path / f"w{i}", url, fs, allocate=allocate) for i in range(2)]
    names = [publish_version(writers[i % 2], seed=i) for i in range(6)]
    numbers = [int(n.split("-")[0][1:]) for n in names]
    assert numbers == sorted(set(numbers))
    assert writers[0].versions() == names
    assert floors[0] == 1


def test_without_an_allocator_the_number_follows_remote_and_cache(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    a = _store(tmp_path / "a", url, fs)
    b = _store(tmp_path / "b", url, fs)
    publish_version(a)
    assert b.next_version_name().startswith("v2-")
    behind = _store(tmp_path / "c", url, fs, allocate=lambda at_least: 1)
    with pytest.raises(StoreError, match="allocator returned 1 .* numbers up to 1"):
        behind.next_version_name()  # a counter behind the store would reuse a number


# -- projects, URLs and errors -------------------------------------------------------------------


def test_remote_projects_lists_lineages_with_a_complete_version(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    for project in (12, 3):
        publish_version(_store(tmp_path / str(project), project_url(url, project), fs))
    root = fs._strip_protocol(url)
    fs.pipe_file(f"{root}/projects/5/versions/v1-20240101T000000/model.pth", b"torn")
    fs.pipe_file(f"{root}/projects/notes/versions/v1-20240101T000000/manifest.json", b"{}")
    assert remote_projects(url, fs=fs) == [3, 12]
    assert remote_projects(f"memory:///empty-{uuid.uuid4().hex}", fs=fs) == []
    with pytest.raises(ValueError, match="positive integer"):
        project_url(url, 0)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("/srv/models", "not an object-store URL"),
        ("bucket/prefix", "not an object-store URL"),
        ("nosuch://bucket/prefix", "cannot open nosuch://bucket/prefix"),
        ("s3:///prefix", "names no bucket"),
    ],
)
def test_open_remote_says_what_is_wrong_with_a_url(url: str, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        open_remote(url)


def test_open_remote_s3_makes_no_request_and_keeps_clients_apart() -> None:
    fs, root = open_remote("s3://bucket/some/prefix/")
    other, _ = open_remote("s3://bucket/some/prefix")
    assert root == "bucket/some/prefix"
    assert fs is not other  # each store its own client: credentials are read per client
    assert fs.config_kwargs["retries"]["total_max_attempts"] == 3


def _client_error(code: str, status: int = 400) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {}}
    response["ResponseMetadata"]["HTTPStatusCode"] = status
    return ClientError(response, "GetObject")


def _translated(cause: BaseException, as_type: type[OSError]) -> OSError:
    """What s3fs raises: an OSError chained to botocore's error."""
    try:
        raise as_type(str(cause)) from cause
    except OSError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "kind", "says"),
    [
        (EndpointConnectionError(endpoint_url="http://h:1/x"), "unreachable", "AWS_ENDPOINT_URL"),
        (ConnectionRefusedError(111, "refused"), "unreachable", "Check that it is up"),
        (NoCredentialsError(), "no-credentials", "set AWS_ACCESS_KEY_ID"),
        (
            _translated(_client_error("InvalidAccessKeyId", 403), PermissionError),
            "credentials",
            "Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ),
        (
            _translated(_client_error("NoSuchBucket", 404), FileNotFoundError),
            "bucket",
            "aws s3 mb s3://models",
        ),
        (_client_error("ServiceUnavailable", 503), "server", "try again"),
        (OSError(121, "Internal Server Error"), "server", "try again"),
        (ValueError("odd"), "other", "could not read current"),
    ],
)
def test_errors_say_what_is_wrong_and_how_to_fix_it(
    exc: BaseException, kind: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:pw@127.0.0.1:9000")
    assert classify(exc) == kind
    error = remote_error("s3://models/prefix", "read current", exc)
    assert error.kind == kind
    assert says in str(error)
    assert "pw" not in str(error)


def test_no_secret_reaches_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    exc = _translated(_client_error(f"SignatureDoesNotMatch for {secret}", 403), PermissionError)
    error = remote_error("s3://models/prefix", "write current", exc)
    assert error.kind == "credentials"
    assert secret not in str(error)


def test_a_remote_without_a_pointer_serves_nothing(
    tmp_path: Path, fs: ScriptedMemory, url: str
) -> None:
    writer = _store(tmp_path / "writer", url, fs)
    version = publish_version(writer)
    fs.rm_file(f"{fs._strip_protocol(url)}/current")
    assert writer.refresh() is None
    with pytest.raises(StoreError, match="has no current model"):
        writer.load_current()
    # The folder's own pointer is left alone: it may have been a MODEL_DIR of its own.
    assert ModelStore(tmp_path / "writer").current_version() == version


def test_a_shared_folder_works_as_the_store(tmp_path: Path) -> None:
    url = (tmp_path / "shared" / "models").as_uri()
    writer = MirroredStore(tmp_path / "writer", url)
    version = publish_version(writer)
    replica = MirroredStore(tmp_path / "replica", url)
    assert replica.current_version() == version
    verify_version_dir(replica.version_dir(version))
    assert (tmp_path / "shared" / "models" / "current").read_text() == f"{version}\n"
    assert remote_projects(url) == []


def test_history_entries_are_fetched_once(tmp_path: Path, fs: ScriptedMemory, url: str) -> None:
    store = _store(tmp_path / "a", url, fs)
    first = publish_version(store)
    second = publish_version(store)
    store.set_current(first, reason="rollback")
    reads = []
    cat_file = fs.cat_file

    def counting(path: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(path)
        return cat_file(path, *args, **kwargs)

    fs.cat_file = counting  # type: ignore[method-assign]
    expected = [(first, "promotion"), (second, "promotion"), (first, "rollback")]
    for _ in range(3):
        assert [(h["version"], h["reason"]) for h in store.history()] == expected
    assert len([r for r in reads if "/history/" in r]) == 3
