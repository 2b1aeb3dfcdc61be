"""Model versions on an object store (S3 via s3fs, or any fsspec URL); the local folder a cache.

A `MirroredStore` is a `ModelStore` whose truth is a remote prefix. Every replica and every
writer reads and writes that prefix; each keeps its own local cache (the `ModelStore` root, e.g.
under MODEL_DIR), from which models are loaded. Remote layout, mirroring the local one::

    <prefix>/current                          one line: the version in use
    <prefix>/versions/<version>/<file>        model.pth, classes.json, ..., manifest.json
    <prefix>/history/<stamp>-<uuid>.json      one object per change of `current`

Publishing uploads every file of a version and its `manifest.json` last, then writes `current`:
S3 has no rename, but a single PUT is atomic, so the manifest's PUT is the moment a version
becomes visible (a version without one is a torn upload, invisible to `versions()`) and the
pointer's PUT the moment it is served. S3 cannot append either, hence one history object per
change. Downloads land in a staging folder, are checked against the manifest's sha256 of every
file and are renamed into the cache, so a cached version is always whole and verified.

S3 credentials and endpoint come from the environment as boto users know them
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION`,
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for MinIO, SeaweedFS, ...): botocore >= 1.31 reads
them all itself, so nothing is passed explicitly and profiles and instance roles keep working.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import urlsplit

import fsspec.core
from pydantic import ValidationError

from labelloop.errors import StoreError
from labelloop.store import (
    _VERSION_RE,
    CURRENT_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    ONNX_FILE,
    VERSIONS_DIR,
    Manifest,
    ModelBundle,
    ModelStore,
    load_bundle,
    read_manifest,
    sha256_file,
    utc_stamp,
    verify_version_dir,
    write_bytes_atomic,
)

logger = logging.getLogger(__name__)

# A torn upload's name has to be this old before a sweep deletes its objects: a writer
# uploading a version takes seconds to minutes, never an hour.
TORN_AFTER_S = 3600.0
# What a swept torn upload keeps (an empty object): its number stays taken.
TORN_MARKER = ".torn"

HISTORY_DIR = "history"
PROJECTS_DIR = "projects"  # the same name as lineages.PROJECTS_DIR, which sits above this layer

# Failing fast matters more than retrying hard: serving falls back to the last good version and
# a failed publish is retried by the next job, while botocore's defaults (legacy mode, five
# attempts) hold a call for 13 s against an endpoint that refuses connections.
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"mode": "standard", "total_max_attempts": 3},
    },
    # Replicas must see each other's writes: s3fs would otherwise answer listings from memory.
    "use_listings_cache": False,
    # fsspec would hand every store of the process one cached client, whose credentials and
    # endpoint are those of the environment when it first connected.
    "skip_instance_cache": True,
}

# A pointer naming a version that failed verification is retried this often, not at every poll:
# each retry downloads the whole version again.
_REFUSED_RETRY_S = 60.0

_T = TypeVar("_T")


class ObjectStoreError(StoreError):
    """The object store could not be used; `kind` says why: unreachable, server (it answered
    with an error), credentials, no-credentials, bucket, other."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def unavailable(self) -> bool:
        """The store is down or failing, as opposed to refusing us (credentials, bucket)."""
        return self.kind in ("unreachable", "server")


# -- opening a URL, and errors a person can act on ---------------------------------------------


def open_remote(url: str, **options: Any) -> tuple[Any, str]:
    """The fsspec filesystem of `url` and the root path inside it (no protocol, no trailing /).

    `options` go to the filesystem's constructor (for s3://, after `S3_DEFAULTS`). Makes no
    request: a store opened while the server is down works once it is back."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if not scheme:
        raise StoreError(
            f"{url!r} is not an object-store URL; expected one like s3://bucket/prefix "
            "(or file:///shared/folder, memory://name)"
        )
    if scheme in ("s3", "s3a"):
        bucket = urlsplit(url).netloc.rpartition("@")[2]
        if not bucket:
            raise StoreError(f"{_public_url(url)} names no bucket; expected s3://bucket/prefix")
        # A deep copy: botocore rewrites the retries dict it is given, in place.
        defaults = copy.deepcopy(S3_DEFAULTS)
        config = {**defaults["config_kwargs"], **options.pop("config_kwargs", {})}
        options = {**defaults, **options, "config_kwargs": config}
    elif scheme in ("file", "local"):
        options.setdefault("auto_mkdir", True)  # object stores have no folders to make first
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        hint = (
            "install the distributed extra: pip install 'labelloop[distributed]'"
            if scheme in ("s3", "s3a")
            else f"install the fsspec driver for {scheme}://"
        )
        raise StoreError(f"cannot open {_public_url(url)}: {_redact(str(exc))}; {hint}") from exc
    except ValueError as exc:
        raise StoreError(f"cannot open {_public_url(url)}: {_redact(str(exc))}") from exc
    return fs, str(root).rstrip("/")


def project_url(url: str, project_id: int) -> str:
    """The prefix of a project's lineage under a deployment's prefix (as lineages.project_root)."""
    if isinstance(project_id, bool) or not isinstance(project_id, int) or project_id < 1:
        raise ValueError(f"a Label Studio project id is a positive integer, got {project_id!r}")
    return f"{url.rstrip('/')}/{PROJECTS_DIR}/{project_id}"


def remote_projects(url: str, fs: Any = None) -> list[int]:
    """Projects with a lineage under `<url>/projects/<id>/` that has at least one complete
    version (as lineages.projects_with_lineage for the local folder), by id."""
    if fs is None:
        fs, root = open_remote(url)
    else:
        root = _strip(fs, url)
    base = f"{root}/{PROJECTS_DIR}"
    where = _public_url(url)
    paths = _call_or_none(where, "list the projects", _find, fs, base) or []
    ids = set()
    for path in paths:
        parts = PurePosixPath(_relative(path, base)).parts
        if (
            len(parts) == 4
            and parts[0].isdigit()
            and int(parts[0]) > 0
            and parts[1] == VERSIONS_DIR
            and _VERSION_RE.match(parts[2])
            and parts[3] == MANIFEST_FILE
        ):
            ids.add(int(parts[0]))
    return sorted(ids)


def _strip(fs: Any, url: str) -> str:
    return str(fs._strip_protocol(url)).rstrip("/")


def _find(fs: Any, path: str) -> list[str]:
    # Filesystems given by the caller may cache listings; another replica's writes must show.
    fs.invalidate_cache(path)
    return [str(p) for p in fs.find(path)]


def _relative(path: str, base: str) -> str:
    return path.strip("/")[len(base.strip("/")) :].lstrip("/")


def _public_url(url: str) -> str:
    """`url` without user:password@, which a URL may carry and no message should."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url)


def _redact(text: str) -> str:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return re.sub(r"://[^/\s@]+@", "://***@", text)


def _endpoint(where: str) -> str:
    """Which server a URL's requests go to, for messages."""
    if not where.startswith(("s3://", "s3a://")):
        return "the object store"
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return f"the object store at {_public_url(os.environ[name])} ({name})"
    return "AWS S3 (AWS_ENDPOINT_URL is not set)"


_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "FSTimeoutError",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_REFUSED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
    "403",
}
_SERVER_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "500", "502", "503", "504"}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        return str(code) if code is not None else None
    return None


def classify(exc: BaseException) -> str:
    """What a failed call to the store means; the kinds of `ObjectStoreError`."""
    for e in _chain(exc):
        names = {c.__name__ for c in type(e).__mro__}
        code = _error_code(e)
        if code == "NoSuchBucket" or "bucket does not exist" in str(e).lower():
            return "bucket"
        if names & _NO_CREDENTIALS:
            return "no-credentials"
        if code in _REFUSED_CODES or isinstance(e, PermissionError):
            return "credentials"
        if names & _UNREACHABLE or isinstance(e, ConnectionError | TimeoutError | socket.timeout):
            return "unreachable"
        if code in _SERVER_CODES or (isinstance(e, OSError) and e.errno == errno.EREMOTEIO):
            return "server"
    return "other"


def remote_error(where: str, what: str, exc: BaseException) -> ObjectStoreError:
    """An `ObjectStoreError` for a failed call: what is wrong and how to fix it, no secrets."""
    kind = classify(exc)
    reason = _redact(f"{type(exc).__name__}: {exc}")
    server = _endpoint(where)
    s3 = where.startswith(("s3://", "s3a://"))
    if kind == "unreachable":
        message = f"cannot reach {server} to {what} ({where}): {reason}. Check that it is up"
        message += " and that AWS_ENDPOINT_URL points at it." if s3 else "."
    elif kind == "server":
        message = (
            f"{server} failed to {what} ({where}): {reason}. It is up but answering with "
            "errors; try again when it has recovered."
        )
    elif kind == "no-credentials":
        message = (
            f"no credentials to {what} ({where}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run with an instance role)."
        )
    elif kind == "credentials":
        message = f"{server} refused the credentials to {what} ({where}): {reason}."
        if s3:
            message += (
                " Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for "
                "temporary ones), and that they may read and write this prefix."
            )
    elif kind == "bucket":
        bucket = urlsplit(where).netloc.rpartition("@")[2] or where
        message = (
            f"the bucket {bucket!r} does not exist at {server} ({where}); create it "
            f"(e.g. `aws s3 mb s3://{bucket}`) or fix the URL."
        )
    else:
        message = f"could not {what} ({where}): {reason}"
    return ObjectStoreError(message, kind)


def _call(where: str, what: str, func: Callable[..., _T], *args: Any) -> _T:
    """`func(*args)` with its failures as ObjectStoreError, except a missing object, which stays
    FileNotFoundError (a missing bucket is never just a missing object)."""
    try:
        return func(*args)
    except StoreError:
        raise
    except FileNotFoundError as exc:
        if classify(exc) == "bucket":
            raise remote_error(where, what, exc) from exc
        raise
    except Exception as exc:  # botocore's and aiohttp's errors are not OSErrors
        raise remote_error(where, what, exc) from exc


def _call_or_none(where: str, what: str, func: Callable[..., _T], *args: Any) -> _T | None:
    """As `_call`, with None for a missing object."""
    try:
        return _call(where, what, func, *args)
    except FileNotFoundError:
        return None


def _rewrapped(exc: StoreError, message: str) -> StoreError:
    if isinstance(exc, ObjectStoreError):
        return ObjectStoreError(message, exc.kind)
    return StoreError(message)


# -- following the remote pointer --------------------------------------------------------------


@dataclass
class _Watch:
    """What one cache knows of its lineage's remote pointer; shared by every MirroredStore on
    the same (remote, cache) in the process, so a caller that builds a store per request (as
    `ProjectModels` does) still reads the pointer at most every poll_seconds."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    version: str | None = None  # the last good version: what current_version() answers
    checked_at: float | None = None  # monotonic time of the last attempt; None: never tried
    outage: str | None = None  # the message of the ongoing outage, logged once
    refused: dict[str, float] = field(default_factory=dict)  # version -> when it failed
    history: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # object -> entry


_watches: dict[tuple[str, str, str], _Watch] = {}
_watches_lock = threading.Lock()


def _watch_for(key: tuple[str, str, str]) -> _Watch:
    with _watches_lock:
        return _watches.setdefault(key, _Watch())


class MirroredStore(ModelStore):
    """A lineage whose truth is an object-store prefix and whose local folder is a cache.

    `allocate(at_least)`: where version numbers come from when several writers publish (the
    database's counter), given one more than the highest number seen remotely or locally;
    without it, that number itself.
    `poll_seconds`: how stale `current_version()` may be; serving calls it per request.
    `fs`: an fsspec filesystem to use instead of opening `remote_url` (tests, custom options).
    """

    def __init__(
        self,
        cache_root: Path,
        remote_url: str,
        *,
        poll_seconds: float = 2.0,
        allocate: Callable[[int], int] | None = None,
        fs: Any = None,
    ) -> None:
        super().__init__(Path(cache_root))
        if fs is None:
            fs, root = open_remote(remote_url)
        else:
            root = _strip(fs, remote_url)
        self.fs = fs
        self.remote_root = root
        self.remote_url = _public_url(remote_url.rstrip("/"))
        self.poll_seconds = float(poll_seconds)
        self.allocate = allocate
        self._watch = _watch_for(
            (type(fs).__name__, root, str(self.root.expanduser().resolve(strict=False)))
        )

    def __repr__(self) -> str:
        return f"MirroredStore({str(self.root)!r}, {self.remote_url!r})"

    # -- remote paths and calls ----------------------------------------------------------------

    def _remote_path(self, *parts: str) -> str:
        return "/".join([self.remote_root, *parts])

    def _call(self, what: str, func: Callable[..., _T], *args: Any) -> _T:
        return _call(self.remote_url, what, func, *args)

    def _call_or_none(self, what: str, func: Callable[..., _T], *args: Any) -> _T | None:
        return _call_or_none(self.remote_url, what, func, *args)

    def check(self) -> None:
        """Reach the store and read the pointer: raises ObjectStoreError saying what is wrong
        (unreachable, credentials, bucket); for a start-up check."""
        self._read_pointer()

    def _read_pointer(self) -> str | None:
        raw = self._call_or_none("read current", self.fs.cat_file, self._remote_path(CURRENT_FILE))
        name = bytes(raw).decode("utf-8").strip() if raw is not None else ""
        return name or None

    def _remote_manifest(self, version: str) -> tuple[Manifest, bytes] | None:
        """The remote manifest of `version` and its bytes; None when it has none (incomplete)."""
        path = self._remote_path(VERSIONS_DIR, version, MANIFEST_FILE)
        raw = self._call_or_none(f"read {version}'s manifest", self.fs.cat_file, path)
        if raw is None:
            return None
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise StoreError(
                f"{self.remote_url}: {version}/{MANIFEST_FILE} is not a valid manifest: "
                f"{exc.errors()[0]['msg']}"
            ) from None
        if manifest.version != version:
            raise StoreError(
                f"{self.remote_url}: {version}/{MANIFEST_FILE} describes {manifest.version}"
            )
        return manifest, bytes(raw)

    def _remote_version_files(self) -> dict[str, set[str]]:
        """Every remote version folder -> the relative paths of its objects (one listing)."""
        base = self._remote_path(VERSIONS_DIR)
        out: dict[str, set[str]] = {}
        for path in self._call_or_none("list the versions", _find, self.fs, base) or []:
            version, _, rest = _relative(path, base).partition("/")
            if _VERSION_RE.match(version) and rest:
                out.setdefault(version, set()).add(rest)
        return out

    # -- reading ---------------------------------------------------------------------------------

    def current_version(self) -> str | None:
        """The remote pointer, at most `poll_seconds` old, and always a version whose files are
        in the cache and verified. While the store is unreachable, or when the pointer names a
        version that fails verification, the last good version."""
        watch = self._watch
        if watch.checked_at is None:
            with watch.lock:  # the first answer of a process waits for the store
                if watch.checked_at is None:
                    self._refresh()
            return watch.version
        stale = time.monotonic() - watch.checked_at >= self.poll_seconds
        if stale and watch.lock.acquire(blocking=False):
            # Off the request path: a download or a dead endpoint never holds up a request,
            # which keeps being answered with the last good version meanwhile.
            threading.Thread(
                target=self._refresh_and_release, name="labelloop-pointer", daemon=True
            ).start()
        return watch.version

    def refresh(self) -> str | None:
        """Read the remote pointer now (waiting for it) and return what current_version() will
        answer; for the CLI and tests, which must not see a stale pointer."""
        with self._watch.lock:
            self._refresh()
        return self._watch.version

    def _refresh_and_release(self) -> None:
        try:
            self._refresh()
        finally:
            self._watch.lock.release()

    def _refresh(self) -> None:
        """One poll of the remote pointer; the caller holds the watch's lock."""
        watch = self._watch
        if watch.checked_at is None:
            # What the cache last served: the answer of a replica that starts during an outage
            # or while the pointer names a version it refuses.
            cached = super().current_version()
            if cached is not None and (self.versions_dir / cached / MANIFEST_FILE).is_file():
                watch.version = cached
        try:
            self._follow(watch)
        except StoreError as exc:  # unavailable, refused: the last known version keeps serving
            message = str(exc).rstrip(".")
            if watch.outage is None:
                logger.warning(
                    "%s; serving %s until it is back", message, watch.version or "nothing"
                )
            watch.outage = message
        except Exception:  # a poll must never take the server down, whatever went wrong
            logger.exception("%s: reading the remote pointer failed", self.remote_url)
        finally:
            watch.checked_at = time.monotonic()

    def _follow(self, watch: _Watch) -> None:
        remote = self._read_pointer()
        if watch.outage is not None:
            logger.warning("%s is reachable again", self.remote_url)
            watch.outage = None
        if remote is None:
            # The cache's own pointer stays: the folder may be a MODEL_DIR that served before
            # it was pointed at an empty bucket, and deleting is no cache's business.
            watch.version = None
            return
        if remote == watch.version and (self.versions_dir / remote / MANIFEST_FILE).is_file():
            return
        failed_at = watch.refused.get(remote)
        if failed_at is not None and time.monotonic() - failed_at < _REFUSED_RETRY_S:
            return
        try:
            self._materialise(remote)
        except ObjectStoreError:
            raise  # an outage, not a bad version
        except StoreError as exc:
            watch.refused[remote] = time.monotonic()
            if failed_at is None:
                logger.error(
                    "%s/current names %s, which is refused: %s; serving %s instead",
                    self.remote_url,
                    remote,
                    exc,
                    watch.version or "nothing",
                )
            return
        watch.refused.pop(remote, None)
        if watch.version != remote:
            logger.info("%s: current is %s (was %s)", self.remote_url, remote, watch.version)
        watch.version = remote
        self._write_local_pointer(remote)

    def versions(self) -> list[str]:
        """Complete remote versions (those with a manifest), oldest first."""
        names = [v for v, files in self._remote_version_files().items() if MANIFEST_FILE in files]
        return sorted(names, key=_version_number)

    def version_dir(self, version: str) -> Path:
        """The version's folder in the cache, downloaded and verified first if needed."""
        if not _VERSION_RE.match(version):
            raise StoreError(f"no version {version!r} in {self.remote_url} (not a version name)")
        return self._materialise(version)

    def manifest(self, version: str) -> Manifest:
        """The remote manifest (the cached one while the store is unavailable)."""
        try:
            found = self._remote_manifest(version)
        except ObjectStoreError as exc:
            cached = self.versions_dir / version
            if exc.unavailable and (cached / MANIFEST_FILE).is_file():
                return read_manifest(cached)
            raise
        if found is None:
            raise StoreError(self._unknown(version))
        manifest, _ = found
        self._sync_pruned(manifest)
        return manifest

    def history(self) -> list[dict[str, Any]]:
        """Every change of `current`, oldest first: {at, version, reason}."""
        base = self._remote_path(HISTORY_DIR)
        listing = self._call_or_none("list the history", _find, self.fs, base) or []
        paths = sorted(p for p in listing if p.endswith(".json"))
        if not paths:
            return []
        known = self._watch.history
        unseen = [p for p in paths if p not in known]
        if unseen:  # entries never change: each is fetched once per process
            contents = self._call("read the history", self.fs.cat, unseen)
            for path in unseen:
                try:
                    entry = json.loads(contents[path])
                except (KeyError, ValueError):
                    entry = None
                known[path] = entry if isinstance(entry, dict) else None
        return [dict(entry) for p in paths if (entry := known.get(p)) is not None]

    def next_version_name(self, now: datetime | None = None) -> str:
        # Torn uploads count too: their number is never handed out again.
        remote = [_version_number(v) for v in self._remote_version_files()]
        local = [_version_number(v) for v in super().versions()]
        floor = max([*remote, *local], default=0) + 1
        number = floor
        if self.allocate is not None:
            # The floor covers versions published before the counter existed (or by a writer
            # without one); the counter makes concurrent writers draw distinct numbers.
            number = self.allocate(floor)
            if isinstance(number, bool) or not isinstance(number, int) or number < floor:
                raise StoreError(
                    f"the version allocator returned {number!r} for {self.remote_url}, which "
                    f"already has numbers up to {floor - 1}"
                )
        return f"v{number}-{utc_stamp(now)}"

    def load_current(self) -> ModelBundle:
        version = self.current_version()
        if version is None:
            raise StoreError(
                f"{self.remote_url} has no current model; publish one (`labelloop train` or the "
                "loop) or choose a version with `labelloop rollback`"
            )
        return load_bundle(self.version_dir(version))

    # -- writing ---------------------------------------------------------------------------------

    def publish(self, staged: Path, manifest: Manifest, *, make_current: bool = True) -> Path:
        """Publish into the cache, upload every file with the manifest last, then (if asked)
        move `current`. Returns the version's folder in the cache."""
        version = manifest.version
        try:
            exists = self._remote_manifest(version) is not None
        except StoreError as exc:
            raise _rewrapped(exc, f"cannot publish {version}: {exc}") from exc
        if exists:
            raise StoreError(f"version {version} already exists in {self.remote_url}")
        final = super().publish(staged, manifest, make_current=False)
        try:
            self._upload(version, final)
        except StoreError as exc:
            raise _rewrapped(
                exc,
                f"cannot publish {version}: {exc} It is only in the local cache ({final}), "
                "invisible to other replicas, and current is unchanged.",
            ) from exc
        logger.info("Uploaded %s to %s", version, self.remote_url)
        if make_current:
            self.set_current(version)
        try:
            self.sweep_torn()
        except StoreError as exc:  # housekeeping: the version is published either way
            logger.warning("Could not sweep torn uploads in %s: %s", self.remote_url, exc)
        return final

    def sweep_torn(
        self, *, older_than_s: float = TORN_AFTER_S, now: datetime | None = None
    ) -> list[str]:
        """Delete the objects of torn uploads (a version folder without a manifest: its writer
        died mid-upload) whose name is more than `older_than_s` old, and leave a marker in
        each, so that its number is never handed out again (`next_version_name`). Returns the
        versions swept. Each publish calls it; a sweep that fails is only logged there."""
        cutoff = (now or datetime.now(UTC)).timestamp() - older_than_s
        swept = []
        for version, files in self._remote_version_files().items():
            if MANIFEST_FILE in files or files <= {TORN_MARKER}:
                continue
            match = _VERSION_RE.match(version)
            assert match is not None  # _remote_version_files lists only version names
            stamp = datetime.strptime(match.group(2), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
            if stamp.timestamp() > cutoff:
                continue  # perhaps still being uploaded
            folder = self._remote_path(VERSIONS_DIR, version)
            # The marker first: the folder never looks empty, so the number stays taken.
            self._call(f"mark {version} torn", self.fs.pipe_file, f"{folder}/{TORN_MARKER}", b"")
            for name in sorted(files - {TORN_MARKER}):
                self._call_or_none(f"delete {version}/{name}", self.fs.rm_file, f"{folder}/{name}")
            logger.info(
                "Swept torn upload %s from %s (%d objects; its writer never finished it)",
                version,
                self.remote_url,
                len(files - {TORN_MARKER}),
            )
            swept.append(version)
        return swept

    def _upload(self, version: str, folder: Path) -> None:
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        manifest = folder / MANIFEST_FILE
        # The manifest's PUT makes the version visible, so it comes after everything it vouches
        # for: a writer killed before it leaves only an invisible torn upload.
        for path in [*(p for p in files if p != manifest), manifest]:
            rel = path.relative_to(folder).as_posix()
            target = self._remote_path(VERSIONS_DIR, version, rel)
            self._call(f"upload {version}/{rel}", self.fs.put_file, str(path), target)

    def _upload_additions(self, version: str, cached: Path, remote: Manifest) -> None:
        """Files the cached copy gained since its upload (the ONNX export `store_onnx` keeps
        after the first load) go up before `current` moves, then the manifest that vouches for
        them: every replica then loads the graph instead of exporting it again (seconds)."""
        local = read_manifest(cached)
        added = sorted(set(local.files) - set(remote.files))
        if not added:
            return
        try:
            for name in added:
                target = self._remote_path(VERSIONS_DIR, version, name)
                self._call(f"upload {version}/{name}", self.fs.put_file, str(cached / name), target)
            target = self._remote_path(VERSIONS_DIR, version, MANIFEST_FILE)
            self._call(
                f"upload {version}/{MANIFEST_FILE}",
                self.fs.put_file,
                str(cached / MANIFEST_FILE),
                target,
            )
        except StoreError as exc:  # an optimisation: replicas export the graph themselves
            logger.warning("Could not upload %s of %s: %s", ", ".join(added), version, exc)

    def set_current(self, version: str, *, reason: str = "promotion") -> None:
        """Point the remote `current` at a complete version whose files check out."""
        if not _VERSION_RE.match(version):
            raise StoreError(self._unknown(version))
        found = self._remote_manifest(version)
        if found is None:
            raise StoreError(self._unknown(version))
        manifest, _ = found
        if manifest.weights_pruned:
            raise StoreError(
                f"{version} was a rejected candidate whose weights were pruned; only its "
                "manifest and metrics remain. Pick another version (`labelloop versions`)."
            )
        cached = self._materialise(version)
        verify_version_dir(cached)
        self._upload_additions(version, cached, manifest)
        pointer = (version + "\n").encode("utf-8")
        with self._watch.lock:
            self._call("write current", self.fs.pipe_file, self._remote_path(CURRENT_FILE), pointer)
            # Written after the switch: an entry says what happened, never what was intended.
            entry = json.dumps({"at": time.time(), "version": version, "reason": reason})
            name = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex}.json"
            try:
                self._call(
                    "write the history",
                    self.fs.pipe_file,
                    self._remote_path(HISTORY_DIR, name),
                    entry.encode("utf-8"),
                )
            except StoreError as exc:  # current has moved: failing now would say it had not
                logger.warning("current -> %s, but its history entry was lost: %s", version, exc)
            self._watch.version = version
            self._watch.refused.pop(version, None)
            self._watch.checked_at = time.monotonic()
            self._write_local_pointer(version)
        logger.info("%s: current -> %s", self.remote_url, version)

    def prune_rejected(self, *, keep: int) -> list[str]:
        """Delete the weights of rejected candidates (never current, gate said no) except the
        newest `keep`, remotely and in the cache; their manifests and metrics stay."""
        current = self._read_pointer()
        rejected = []
        for version in self.versions():
            if version == current:
                continue
            try:
                found = self._remote_manifest(version)
            except ObjectStoreError:
                raise
            except StoreError:
                continue  # an unreadable manifest is left for a person to look at
            if found is None:
                continue
            manifest, _ = found
            gate = (manifest.metrics.get("incremental") or {}).get("gate") or {}
            if gate.get("promote") is False and not manifest.weights_pruned:
                rejected.append(manifest)
        pruned = []
        for manifest in rejected[: max(0, len(rejected) - keep)]:
            files = {k: v for k, v in manifest.files.items() if k not in (MODEL_FILE, ONNX_FILE)}
            updated = manifest.model_copy(update={"files": files, "weights_pruned": True})
            payload = (json.dumps(updated.model_dump(mode="json"), indent=2) + "\n").encode()
            folder = self._remote_path(VERSIONS_DIR, manifest.version)
            # The manifest first: no reader is ever told to expect weights that are gone.
            self._call(
                f"rewrite {manifest.version}'s manifest",
                self.fs.pipe_file,
                f"{folder}/{MANIFEST_FILE}",
                payload,
            )
            for name in (MODEL_FILE, ONNX_FILE):
                self._call_or_none(
                    f"delete {manifest.version}/{name}", self.fs.rm_file, f"{folder}/{name}"
                )
            self._sync_pruned(updated)
            pruned.append(manifest.version)
        return pruned

    # -- the cache ---------------------------------------------------------------------------------

    def _materialise(self, version: str) -> Path:
        """The version in the cache: there already, or downloaded, verified and renamed in."""
        final = self.versions_dir / version
        if (final / MANIFEST_FILE).is_file():
            return final
        found = self._remote_manifest(version)
        if found is None:
            raise StoreError(self._unknown(version))
        manifest, raw = found
        prefix = self._remote_path(VERSIONS_DIR, version)
        listing = self._call(f"list {version}", _find, self.fs, prefix)
        with self.staging() as staged:
            for path in listing:
                rel = _relative(path, prefix)
                parts = PurePosixPath(rel).parts
                if not parts or rel == MANIFEST_FILE or ".." in parts or parts[0].startswith("."):
                    continue
                target = staged.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                self._call(f"download {version}/{rel}", self.fs.get_file, path, str(target))
            for name, expected in manifest.files.items():
                local = staged / name
                if not local.is_file():
                    raise StoreError(
                        f"{version}: {name} is listed in its manifest but missing from "
                        f"{self.remote_url}; the version is refused"
                    )
                if sha256_file(local) != expected:
                    raise StoreError(
                        f"{version}: {name} downloaded from {self.remote_url} does not match its "
                        "checksum in the manifest (corrupt); the version is refused"
                    )
            write_bytes_atomic(staged / MANIFEST_FILE, raw)
            try:
                staged.rename(final)
            except OSError as exc:
                if not (final / MANIFEST_FILE).is_file():
                    raise StoreError(
                        f"cannot cache {version}: {final} is in the way ({exc}); remove it"
                    ) from exc
                # Another thread or process downloaded it meanwhile: theirs is as good.
        logger.info("Downloaded %s from %s into %s", version, self.remote_url, final)
        return final

    def _sync_pruned(self, remote: Manifest) -> None:
        """Bring a cached copy in line with a prune done by any writer."""
        folder = self.versions_dir / remote.version
        if not remote.weights_pruned or not (folder / MANIFEST_FILE).is_file():
            return
        try:
            if read_manifest(folder).weights_pruned:
                return
        except StoreError:
            pass
        for name in (MODEL_FILE, ONNX_FILE):
            (folder / name).unlink(missing_ok=True)
        payload = json.dumps(remote.model_dump(mode="json"), indent=2) + "\n"
        write_bytes_atomic(folder / MANIFEST_FILE, payload.encode("utf-8"))

    def _write_local_pointer(self, version: str) -> None:
        """The cache's own `current`: what a replica that restarts during an outage serves,
        and what `load_bundle(cache_root)` loads without the store."""
        if super().current_version() == version:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.root / CURRENT_FILE, (version + "\n").encode("utf-8"))

    def _unknown(self, version: str) -> str:
        try:
            known = ", ".join(self.versions()) or "none"
        except StoreError:
            known = "unknown: the store is unavailable"
        return (
            f"no complete version {version!r} in {self.remote_url} (known: {known}); a version "
            f"without its {MANIFEST_FILE} is an upload that never finished"
        )


def _version_number(version: str) -> int:
    match = _VERSION_RE.match(version)
    return int(match.group(1)) if match else 0
