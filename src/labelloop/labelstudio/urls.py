"""Where a task's image URL may be read from, and with which credentials.

Task data carries image URLs in a few forms (docs/serving.md, *Images*):
``/data/upload/...`` relative to Label Studio (files uploaded through its import dialog),
``.../data/local-files/?d=<path>`` for local storage, plain ``http(s)://`` URLs, and cloud URIs
(``s3://``, ``gs://``, ``azure-blob://``) that Label Studio turns into signed URLs through its
presign endpoint. :func:`resolve_url` decides where to read each one from and whether it may
carry the API token: straight from disk for local storage and, when Label Studio's data
directory is on this machine, for uploads. :func:`refused_destination` keeps requests away from
link-local and metadata addresses."""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import httpx

from labelloop.ml.images import ImageError

logger = logging.getLogger(__name__)

_STORAGE_SCHEMES = frozenset({"s3", "gs", "azure-blob"})


HTTP_SCHEMES = frozenset({"http", "https"})


_LOCAL_FILES_PATH = "/data/local-files"


# Label Studio serves MEDIA_ROOT (<LABEL_STUDIO_BASE_DATA_DIR>/media) under /data/; uploads live
# in its upload/<project>/ folder.
_MEDIA_URL_PATH = "/data/"


_UPLOAD_PREFIX = "upload/"


# Query keys that are safe to show in messages; any other query (e.g. the signature of a
# presigned URL) is hidden.
_SAFE_QUERY_KEYS = frozenset({"d", "fileuri"})


_MAX_SHOWN_URL_CHARS = 200


MIB = 1024 * 1024


class ImageFetchError(ImageError):
    """An image could not be fetched; ``reason`` says why, for logs and the task."""


class BaseURLError(ValueError):
    """A Label Studio base URL that is not an http(s) URL with a host, or carries a password."""


_USERINFO = re.compile(r"//[^/@]*@")


def http_base_url(value: str, what: str = "LABEL_STUDIO_URL") -> str:
    """``value`` without surrounding blanks and trailing slashes, when it is an http(s) URL with
    a host and without ``user:password@``; else BaseURLError naming ``what`` and the value.

    Credentials are refused because a base URL ends up in logs and error messages.
    """
    url = value.strip().rstrip("/")
    try:
        parsed = httpx.URL(url)
        usable = parsed.scheme.lower() in HTTP_SCHEMES and bool(parsed.host)
        usable = usable and not parsed.userinfo
    except (httpx.InvalidURL, TypeError, ValueError):
        usable = False
    if not usable:
        raise BaseURLError(
            f"{what}: expected an http(s) URL with a host and without user:password@, such as "
            f"http://localhost:8080; got {_shown_value(value)}"
        )
    return url


def _shown_value(value: str) -> str:
    """``value`` quoted for a message: user:password and any query hidden, truncated."""
    shown = _USERINFO.sub("//…@", value.strip(), count=1)
    if "?" in shown:
        shown = shown.split("?", 1)[0] + "?…"
    if len(shown) > _MAX_SHOWN_URL_CHARS:
        shown = shown[:_MAX_SHOWN_URL_CHARS] + "…"
    return repr(shown)


@dataclass(frozen=True)
class FetchSettings:
    """Where Label Studio is and how images may be fetched."""

    label_studio_url: str | None  # LABEL_STUDIO_URL, or the hostname /setup sent
    document_root: Path | None = None  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    # LABEL_STUDIO_BASE_DATA_DIR of a Label Studio on this machine: uploads are read from its
    # media folder instead of being downloaded (Label Studio spends ~25 ms of CPU serving each).
    label_studio_data_dir: Path | None = None
    cache_dir: Path | None = None
    cache_max_bytes: int = 512 * MIB
    max_image_bytes: int = 50 * MIB
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
        # IPv6 answers may carry a zone ("fe80::1%eth0"); getaddrinfo gives a str host here.
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if refused_address(address):
            return f"host {host!r} resolves to {address}, a link-local or metadata address"
    return None


def refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:169.254.169.254 is the same host
    if mapped is not None:
        address = mapped
    return address.is_link_local or address in _METADATA_ADDRESSES or address.is_unspecified


@dataclass(frozen=True)
class ResolvedSource:
    """Where to read an image from.

    ``location`` is an absolute http(s) URL, or for ``local_file`` a resolved path inside the
    document root. ``send_auth`` says whether the first request may carry the API token.
    """

    kind: Literal["local_file", "http", "presign"]
    location: str
    send_auth: bool


def origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the default port filled in; None for non-http(s) URLs."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    scheme = parsed.scheme.lower()
    if scheme not in HTTP_SCHEMES or not parsed.host:
        return None
    port = parsed.port or (443 if scheme == "https" else 80)
    return scheme, parsed.host.lower(), port


def display_url(url: str) -> str:
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


def label_studio_base(settings: FetchSettings) -> str | None:
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
            f"cannot fetch {display_url(uri)}: cloud storage URIs are resolved by Label Studio; "
            "set LABEL_STUDIO_URL"
        )
    if task_id is None:
        raise ImageFetchError(
            f"cannot fetch {display_url(uri)}: Label Studio presigns cloud storage URIs per task, "
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
        raise ImageFetchError(f"malformed image URL {display_url(url)}: {exc}") from exc
    base = label_studio_base(settings)
    if scheme in _STORAGE_SCHEMES:
        return _presign_source(url, base, task_id)
    if scheme == "":
        if not url.startswith("/") or url.startswith("//"):
            raise ImageFetchError(
                f"unsupported image URL {display_url(url)}: expected an http(s) URL, a cloud "
                "storage URI, or a path on Label Studio starting with /"
            )
        if base is None:
            raise ImageFetchError(
                f"cannot fetch {display_url(url)}: it is relative to Label Studio; set "
                "LABEL_STUDIO_URL (e.g. http://localhost:8080)"
            )
        absolute, on_label_studio = base + url, True
    elif scheme in HTTP_SCHEMES:
        absolute = url
        on_label_studio = base is not None and origin_of(url) == origin_of(base)
    else:
        raise ImageFetchError(f"unsupported URL scheme {scheme!r} in {display_url(url)}")

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
            logger.debug("upload %s is not under %s: downloading it", display_url(url), path)
    return ResolvedSource("http", absolute, on_label_studio)
