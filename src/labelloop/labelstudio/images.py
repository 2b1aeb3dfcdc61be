"""Fetch and decode task images from wherever Label Studio says they are.

Task data carries image URLs in a few forms (see docs/label-studio-protocol.md):
``/data/upload/...`` relative to Label Studio (files uploaded through its import dialog),
``.../data/local-files/?d=<path>`` for local storage, plain ``http(s)://`` URLs, and cloud URIs
(``s3://``, ``gs://``, ``azure-blob://``) that Label Studio turns into signed URLs through its
presign endpoint. :func:`resolve_url` decides where to read each one from and whether it may
carry the API token: straight from disk for local storage and, when Label Studio's data
directory is on this machine, for uploads. :class:`ImageFetcher` downloads (or reads) the bytes
with size, time and redirect limits and an optional LRU disk cache; :func:`decode_image` turns
them into an RGB image.

The API token only ever goes to Label Studio itself (same scheme, host and port as
LABEL_STUDIO_URL), on every hop of a redirect chain: signed cloud URLs and other hosts never
see it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import ipaddress
import logging
import os
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data import to_rgb
from .auth import LabelStudioAuth, LabelStudioAuthError

__all__ = [
    "FetchSettings",
    "ImageFetchError",
    "ImageFetcher",
    "ResolvedSource",
    "decode_image",
    "resolve_url",
]

logger = logging.getLogger(__name__)

_STORAGE_SCHEMES = frozenset({"s3", "gs", "azure-blob"})
_HTTP_SCHEMES = frozenset({"http", "https"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_LOCAL_FILES_PATH = "/data/local-files"
# Label Studio serves MEDIA_ROOT (<LABEL_STUDIO_BASE_DATA_DIR>/media) under /data/; uploads live
# in its upload/<project>/ folder.
_MEDIA_URL_PATH = "/data/"
_UPLOAD_PREFIX = "upload/"
# Query keys that are safe to show in messages; any other query (e.g. the signature of a
# presigned URL) is hidden.
_SAFE_QUERY_KEYS = frozenset({"d", "fileuri"})
_MAX_SHOWN_URL_CHARS = 200
_MIB = 1024 * 1024
# A temp file this old in the cache directory was left by a writer that crashed.
_STALE_TEMP_S = 600.0


class ImageFetchError(Exception):
    """An image could not be fetched or decoded; ``reason`` says why, for logs and the task."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FetchSettings:
    """Where Label Studio is and how images may be fetched."""

    label_studio_url: str | None  # LABEL_STUDIO_URL, or the hostname /setup sent
    document_root: Path | None = None  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    # LABEL_STUDIO_BASE_DATA_DIR of a Label Studio on this machine: uploads are read from its
    # media folder instead of being downloaded (Label Studio spends ~25 ms of CPU serving each).
    label_studio_data_dir: Path | None = None
    cache_dir: Path | None = None
    cache_max_bytes: int = 512 * _MIB
    max_image_bytes: int = 50 * _MIB
    timeout_s: float = 15.0
    max_redirects: int = 5
    # Hosts other than Label Studio's that images may come from ("example.com" also admits
    # its subdomains); None admits any host that is not link-local or a cloud metadata address.
    allowed_hosts: tuple[str, ...] | None = None


# Cloud metadata endpoints that are not link-local; link-local (169.254/16, fe80::/10, which
# holds AWS/GCP/Azure's 169.254.169.254) is refused as a whole.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("100.100.100.200", "fd00:ec2::254", "192.0.0.192")
)


def refused_destination(url: str, settings: FetchSettings) -> str | None:
    """Why a request to `url` (not Label Studio itself) must not be made, or None.

    Image URLs come from task data anyone with import rights controls, so without this the
    backend could be pointed at the cloud metadata service or at hosts the operator never meant
    to expose. Redirects are checked hop by hop, so a public URL cannot bounce inwards either.
    """
    host = urlsplit(url).hostname or ""
    allowed = settings.allowed_hosts
    if allowed is not None and not any(
        host == a or host.endswith("." + a.lstrip(".")) for a in allowed
    ):
        return f"host {host!r} is not among the allowed image hosts"
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot resolve host {host!r} ({exc})"
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if _refused_address(address):
            return f"host {host!r} resolves to {address}, a link-local or metadata address"
    return None


def _refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:169.254.169.254 is the same host
    if mapped is not None:
        address = mapped
    return address.is_link_local or address in _METADATA_ADDRESSES or address.is_unspecified


def _refused_peer(response: httpx.Response) -> str | None:
    """The address the response actually came from, when it is one we refuse; else None.

    `refused_destination` resolves the host name itself, and the connection resolves it again:
    a DNS answer that changes in between (DNS rebinding) would slip past the first check. This
    one looks at the connected socket, before a byte of the body is read.
    """
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if not peer:
        return None
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return None
    return str(address) if _refused_address(address) else None


@dataclass(frozen=True)
class ResolvedSource:
    """Where to read an image from.

    ``location`` is an absolute http(s) URL, or for ``local_file`` a resolved path inside the
    document root. ``send_auth`` says whether the first request may carry the API token.
    """

    kind: Literal["local_file", "http", "presign"]
    location: str
    send_auth: bool


# --------------------------------------------------------------------------- URL resolution


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the default port filled in; None for non-http(s) URLs."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    scheme = parsed.scheme.lower()
    if scheme not in _HTTP_SCHEMES or not parsed.host:
        return None
    port = parsed.port or (443 if scheme == "https" else 80)
    return scheme, parsed.host.lower(), port


def _display(url: str) -> str:
    """``url`` for messages and logs: no user:password, no query values that could be secrets."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query and not set(parse_qs(query, keep_blank_values=True)) <= _SAFE_QUERY_KEYS:
        query = "…"
    text = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    return text if len(text) <= _MAX_SHOWN_URL_CHARS else text[:_MAX_SHOWN_URL_CHARS] + "…"


def _label_studio_base(settings: FetchSettings) -> str | None:
    url = (settings.label_studio_url or "").strip().rstrip("/")
    return url or None


def _local_files_path(url: str) -> str | None:
    """The ``d`` parameter of a ``.../data/local-files/?d=<path>`` URL, else None."""
    parts = urlsplit(url)
    if not parts.path.rstrip("/").endswith(_LOCAL_FILES_PATH):
        return None
    values = parse_qs(parts.query, keep_blank_values=True).get("d")
    return values[0] if values else None


def _upload_path(url: str, base: str) -> str | None:
    """For a Label Studio upload URL, its path under the media folder (``upload/<project>/…``),
    else None. ``base`` may carry a path prefix (Label Studio behind a sub-path)."""
    path = urlsplit(url).path
    prefix = urlsplit(base).path.rstrip("/") + _MEDIA_URL_PATH
    if not path.startswith(prefix):
        return None
    relative = unquote(path[len(prefix) :])
    return relative if relative.startswith(_UPLOAD_PREFIX) else None


def _confined_path(
    root_dir: Path, relative: str, *, setting: str = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
) -> Path:
    """``root_dir / relative``, refusing anything that would read outside the root."""
    pure = PurePosixPath(relative)
    if not relative or "\x00" in relative or pure.is_absolute() or ".." in pure.parts:
        raise ImageFetchError(
            f"refusing local file {relative!r}: paths must be relative to {setting} and must "
            "not contain '..'"
        )
    root = root_dir.resolve()
    # resolve() follows symlinks, so a link inside the root that points outside is caught here.
    path = (root / pure).resolve()
    if not path.is_relative_to(root):
        raise ImageFetchError(
            f"refusing local file {relative!r}: it resolves outside {root} ({setting}) "
            "through a symlink"
        )
    return path


def _presign_source(uri: str, base: str | None, task_id: int | None) -> ResolvedSource:
    if base is None:
        raise ImageFetchError(
            f"cannot fetch {_display(uri)}: cloud storage URIs are resolved by Label Studio; "
            "set LABEL_STUDIO_URL"
        )
    if task_id is None:
        raise ImageFetchError(
            f"cannot fetch {_display(uri)}: Label Studio presigns cloud storage URIs per task, "
            "and no task id was given"
        )
    fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
    return ResolvedSource("presign", f"{base}/tasks/{task_id}/presign/?fileuri={fileuri}", True)


def resolve_url(url: str, settings: FetchSettings, *, task_id: int | None = None) -> ResolvedSource:
    """Decide where to read ``url`` from and whether the API token may go with it.

    Touches the filesystem only to resolve symlinks under the document root and to see whether
    an upload is in Label Studio's data directory (if it is not there, e.g. a data directory of
    another instance, the upload is downloaded as usual). Raises ImageFetchError for URLs that
    cannot or must not be fetched.
    """
    url = url.strip()
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:
        raise ImageFetchError(f"malformed image URL {_display(url)}: {exc}") from exc
    base = _label_studio_base(settings)
    if scheme in _STORAGE_SCHEMES:
        return _presign_source(url, base, task_id)
    if scheme == "":
        if not url.startswith("/") or url.startswith("//"):
            raise ImageFetchError(
                f"unsupported image URL {_display(url)}: expected an http(s) URL, a cloud "
                "storage URI, or a path on Label Studio starting with /"
            )
        if base is None:
            raise ImageFetchError(
                f"cannot fetch {_display(url)}: it is relative to Label Studio; set "
                "LABEL_STUDIO_URL (e.g. http://localhost:8080)"
            )
        absolute, on_label_studio = base + url, True
    elif scheme in _HTTP_SCHEMES:
        absolute = url
        on_label_studio = base is not None and _origin(url) == _origin(base)
    else:
        raise ImageFetchError(f"unsupported URL scheme {scheme!r} in {_display(url)}")

    if on_label_studio and settings.document_root is not None:
        relative = _local_files_path(absolute)
        if relative is not None:
            path = _confined_path(settings.document_root, relative)
            return ResolvedSource("local_file", str(path), False)
    if on_label_studio and settings.label_studio_data_dir is not None and base is not None:
        relative = _upload_path(absolute, base)
        if relative is not None:
            path = _confined_path(
                settings.label_studio_data_dir / "media",
                relative,
                setting="LABEL_STUDIO_BASE_DATA_DIR/media",
            )
            if path.is_file():
                return ResolvedSource("local_file", str(path), False)
            logger.debug("upload %s is not under %s: downloading it", _display(url), path)
    return ResolvedSource("http", absolute, on_label_studio)


# --------------------------------------------------------------------------- decoding


def decode_image(
    data: bytes, *, max_pixels: int = Image.MAX_IMAGE_PIXELS, min_side: int | None = None
) -> Image.Image:
    """Decode image bytes to RGB, applying the EXIF orientation (phones rotate via EXIF).

    ``min_side``: the caller will shrink the image until its shorter side is this long, so a
    JPEG may be decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, several times faster) as long as
    both sides stay at least ``min_side``.

    Raises ImageFetchError for empty, corrupt, truncated or non-image data, and for images
    with more than ``max_pixels`` pixels. Pillow's own limit (twice Image.MAX_IMAGE_PIXELS)
    still applies when ``max_pixels`` is larger.
    """
    if not data:
        raise ImageFetchError("empty image file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageFetchError(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels "
                    "(possible decompression bomb)"
                )
            if min_side is not None and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except ImageFetchError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageFetchError(f"image too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageFetchError("not an image (format not recognised)") from exc
    except Exception as exc:  # decoders raise many types on bad input: OSError, SyntaxError, ...
        raise ImageFetchError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------- disk cache


class _DiskCache:
    """Downloaded bytes under sha256(URL), evicted least-recently-used first (by mtime)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = directory
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        # Bytes in the folder, counted from one scan and then kept up to date by our own puts:
        # scanning the folder on every put made a bulk /predict quadratic (15 % of its CPU at
        # 512 tasks). Other writers sharing the folder are seen at the next scan, when the
        # count passes the cap, so the cap is soft by at most what they wrote meanwhile.
        self._total: int | None = None

    def _path(self, url: str) -> Path:
        return self._dir / hashlib.sha256(url.encode()).hexdigest()

    def get(self, url: str) -> bytes | None:
        path = self._path(url)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("image cache: cannot read %s: %s", path, exc)
            return None
        with contextlib.suppress(OSError):  # evicted meanwhile: the bytes are still good
            os.utime(path)
        return data

    def put(self, url: str, data: bytes) -> None:
        if not data or len(data) > self._max_bytes:
            return  # too big: caching it would evict everything else and then itself
        path = self._path(url)
        with self._lock:
            try:
                self._write_atomically(path, data)
            except OSError as exc:
                logger.warning("image cache: cannot write %s: %s", path, exc)
                return
            if self._total is not None:
                self._total += len(data)  # an overwrite overcounts: that only scans sooner
            if self._total is None or self._total > self._max_bytes:
                self._evict(keep=path)

    def _write_atomically(self, path: Path, data: bytes) -> None:
        # Readers in other threads or processes see either no file or the whole file.
        fd, temp = tempfile.mkstemp(dir=self._dir, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def _entries(self) -> list[tuple[int, int, str]]:
        """(mtime_ns, size, path) of cache entries; removes stale temp files on the way."""
        entries: list[tuple[int, int, str]] = []
        now = time.time()
        with os.scandir(self._dir) as scan:
            for entry in scan:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(info.st_mode):
                    continue
                if entry.name.endswith(".tmp"):
                    if now - info.st_mtime > _STALE_TEMP_S:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                    continue
                if _is_cache_key(entry.name):  # never delete files this cache did not write
                    entries.append((info.st_mtime_ns, info.st_size, entry.path))
        return entries

    def _evict(self, keep: Path) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self._max_bytes:
                break
            if path == str(keep):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                logger.debug("image cache: evicted %s (%d bytes)", path, size)
            total -= size
        self._total = total


def _is_cache_key(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


# --------------------------------------------------------------------------- fetching


def _read_local(path: Path, max_bytes: int) -> bytes:
    try:
        info = path.stat()
        # Checked before open(): opening a FIFO or device could block or never end.
        if not stat.S_ISREG(info.st_mode):
            raise ImageFetchError(f"local file {path} is not a regular file")
        if info.st_size > max_bytes:
            raise ImageFetchError(_too_large(str(path), max_bytes))
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise ImageFetchError(
            f"local file {path} not found: check that LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT is "
            "the directory Label Studio serves local files from"
        ) from exc
    except OSError as exc:
        raise ImageFetchError(f"cannot read local file {path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:  # grew since stat()
        raise ImageFetchError(_too_large(str(path), max_bytes))
    return data


def _too_large(what: str, max_bytes: int) -> str:
    return f"image {what} is larger than {max_bytes / _MIB:g} MiB (max_image_bytes)"


class ImageFetcher:
    """Fetches task images; thread-safe, shares one pooled HTTP client.

    ``auth`` None means no API token is sent, so Label Studio answers 401 to downloads from it.
    """

    def __init__(
        self,
        settings: FetchSettings,
        auth: LabelStudioAuth | None,
        *,
        client: httpx.Client | None = None,
    ) -> None:
        base = _label_studio_base(settings)
        if base is not None and _origin(base) is None:
            raise ValueError(
                f"Label Studio URL {settings.label_studio_url!r} must start with http:// or "
                "https:// (set LABEL_STUDIO_URL, e.g. http://localhost:8080)"
            )
        if auth is not None and (base is None or _origin(base) != _origin(auth.base_url)):
            raise ValueError(
                f"the API token is for {auth.base_url} but label_studio_url is {base!r}: "
                "create both from the same LABEL_STUDIO_URL"
            )
        self._settings = settings
        self._auth = auth
        self._label_studio = _origin(base) if base else None
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client()
        self._cache = (
            _DiskCache(settings.cache_dir, settings.cache_max_bytes)
            if settings.cache_dir is not None
            else None
        )

    def close(self) -> None:
        """Close the HTTP client if this fetcher created it."""
        if self._owns_client:
            self._client.close()

    def fetch_image(
        self, url: str, *, task_id: int | None = None, min_side: int | None = None
    ) -> Image.Image:
        """The image at ``url`` as RGB with its EXIF orientation applied (``min_side``: see
        decode_image)."""
        return decode_image(self.fetch_bytes(url, task_id=task_id), min_side=min_side)

    def fetch_bytes(self, url: str, *, task_id: int | None = None) -> bytes:
        """The raw bytes at ``url`` (``task_id`` is needed for cloud storage URIs)."""
        source = resolve_url(url, self._settings, task_id=task_id)
        if source.kind == "local_file":
            return _read_local(Path(source.location), self._settings.max_image_bytes)
        if self._cache is not None:
            cached = self._cache.get(source.location)
            if cached is not None:
                logger.debug("image cache hit for %s", _display(source.location))
                return cached
        data = self._download(source)
        if self._cache is not None:
            self._cache.put(source.location, data)
        return data

    def _download(self, source: ResolvedSource) -> bytes:
        deadline = time.monotonic() + self._settings.timeout_s
        url, send_auth = source.location, source.send_auth
        visited = {url}
        try:
            for _ in range(self._settings.max_redirects + 1):
                response = self._get(url, send_auth, deadline)
                try:
                    if response.status_code not in _REDIRECT_STATUSES:
                        self._check_status(response, url, send_auth)
                        return self._read_body(response, url, deadline)
                    url = self._redirect_target(response, url)
                finally:
                    response.close()
                if url in visited:
                    raise ImageFetchError(f"redirect loop at {_display(url)}")
                visited.add(url)
                # Decided afresh for every hop: the token must never follow a redirect elsewhere.
                send_auth = self._is_label_studio(url)
        except httpx.TimeoutException as exc:
            raise self._timed_out(url) from exc
        except httpx.HTTPError as exc:
            raise ImageFetchError(
                f"could not download {_display(url)} ({type(exc).__name__}: {exc})"
            ) from exc
        raise ImageFetchError(
            f"too many redirects (more than {self._settings.max_redirects}) fetching "
            f"{_display(source.location)}"
        )

    def _timed_out(self, url: str) -> ImageFetchError:
        return ImageFetchError(
            f"timed out after {self._settings.timeout_s:g} s fetching {_display(url)}"
        )

    def _is_label_studio(self, url: str) -> bool:
        return self._label_studio is not None and _origin(url) == self._label_studio

    def _get(self, url: str, send_auth: bool, deadline: float) -> httpx.Response:
        """GET ``url`` as a stream; with a personal access token, retry a 401 once."""
        response = self._send(url, send_auth, deadline)
        if (
            response.status_code == 401
            and send_auth
            and self._auth is not None
            and self._auth.is_personal_access_token()
        ):
            # The access token may have been revoked or expired early: exchange again.
            response.close()
            logger.info("Label Studio answered 401; renewing the access token and retrying once")
            self._auth.invalidate()
            response = self._send(url, send_auth, deadline)
        return response

    def _send(self, url: str, send_auth: bool, deadline: float) -> httpx.Response:
        if not self._is_label_studio(url):
            refused = refused_destination(url, self._settings)
            if refused is not None:
                raise ImageFetchError(f"refusing to fetch {_display(url)}: {refused}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out(url)
        # Images are compressed already; identity keeps the size limit about wire bytes.
        headers = {"Accept-Encoding": "identity"}
        if send_auth and self._auth is not None:
            headers.update(self._auth_headers())
        request = self._client.build_request("GET", url, headers=headers, timeout=remaining)
        response = self._client.send(request, stream=True, follow_redirects=False)
        # Label Studio included: a /setup hostname is not to be trusted more than a task URL.
        peer = _refused_peer(response)
        if peer is not None:
            response.close()
            raise ImageFetchError(
                f"refusing to fetch {_display(url)}: the connection went to {peer}, a link-local "
                "or metadata address (the host's DNS answer changed after it was checked)"
            )
        return response

    def _auth_headers(self) -> dict[str, str]:
        assert self._auth is not None
        try:
            return self._auth.headers()
        except LabelStudioAuthError as exc:
            raise ImageFetchError(str(exc)) from exc

    def _redirect_target(self, response: httpx.Response, url: str) -> str:
        location = response.headers.get("location")
        if not location:
            raise ImageFetchError(
                f"HTTP {response.status_code} redirect without a Location from {_display(url)}"
            )
        target = str(response.url.join(location))
        if _origin(target) is None:
            raise ImageFetchError(
                f"{_display(url)} redirected to an unsupported URL {_display(target)}"
            )
        return target

    def _check_status(self, response: httpx.Response, url: str, sent_auth: bool) -> None:
        code = response.status_code
        if 200 <= code < 300:
            return
        shown = _display(url)
        if code in (401, 403):
            raise ImageFetchError(self._auth_failure(code, shown, sent_auth, url))
        reason = response.reason_phrase or "error"
        raise ImageFetchError(f"HTTP {code} {reason} from {shown}")

    def _auth_failure(self, code: int, shown: str, sent_auth: bool, url: str) -> str:
        if sent_auth and self._auth is not None:
            return (
                f"HTTP {code} from {shown}: Label Studio refused the API token; set "
                "LABEL_STUDIO_API_KEY to a valid token from Account & Settings"
            )
        if self._is_label_studio(url):
            return f"HTTP {code} from {shown}: no API token was sent; set LABEL_STUDIO_API_KEY"
        return (
            f"HTTP {code} from {shown}: no API token was sent because that host is not "
            f"LABEL_STUDIO_URL ({_label_studio_base(self._settings) or 'unset'}); if it is "
            "Label Studio, set LABEL_STUDIO_URL to its address and LABEL_STUDIO_API_KEY"
        )

    def _read_body(self, response: httpx.Response, url: str, deadline: float) -> bytes:
        limit = self._settings.max_image_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageFetchError(_too_large(f"at {_display(url)}", limit))
        chunks: list[bytes] = []
        received = 0
        # Bounded by the byte limit and the deadline (a server trickling bytes would otherwise
        # reset the read timeout forever).
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > limit:
                raise ImageFetchError(_too_large(f"at {_display(url)}", limit))
            if time.monotonic() > deadline:
                raise self._timed_out(url)
            chunks.append(chunk)
        return b"".join(chunks)
