"""Read the bytes of a task image: from disk, the cache, or over HTTP with limits.

:class:`ImageFetcher` follows :func:`labelloop.labelstudio.urls.resolve_url`: it reads local files
and uploads from disk, consults the LRU disk cache, and downloads the rest with size, time and
redirect limits, checking the connected peer on every hop. Decoding is
:func:`labelloop.ml.images.decode_image`, the one decoder training uses too.

The API token only ever goes to Label Studio itself (same scheme, host and port as
LABEL_STUDIO_URL), on every hop of a redirect chain: signed cloud URLs and other hosts never
see it.
"""

from __future__ import annotations

import ipaddress
import logging
import stat
import time
from pathlib import Path

import httpx
from PIL import Image

from labelloop.labelstudio.auth import LabelStudioAuth, LabelStudioAuthError
from labelloop.labelstudio.disk_cache import DiskCache
from labelloop.labelstudio.urls import (
    MIB,
    FetchSettings,
    ImageFetchError,
    ResolvedSource,
    display_url,
    http_base_url,
    label_studio_base,
    origin_of,
    refused_address,
    refused_destination,
    resolve_url,
)
from labelloop.ml.images import ImageError, decode_image

__all__ = [
    "FetchSettings",
    "ImageFetchError",
    "ImageFetcher",
    "ResolvedSource",
    "decode_image",
    "resolve_url",
]

logger = logging.getLogger(__name__)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


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
    return str(address) if refused_address(address) else None


# --------------------------------------------------------------------------- URL resolution


# --------------------------------------------------------------------------- decoding


# --------------------------------------------------------------------------- disk cache


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
    return f"image {what} is larger than {max_bytes / MIB:g} MiB (max_image_bytes)"


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
        base = label_studio_base(settings)
        if base is not None:
            http_base_url(base)
        if auth is not None and (base is None or origin_of(base) != origin_of(auth.base_url)):
            raise ValueError(
                f"the API token is for {auth.base_url} but label_studio_url is {base!r}: "
                "create both from the same LABEL_STUDIO_URL"
            )
        self._settings = settings
        self._auth = auth
        self._label_studio = origin_of(base) if base else None
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client()
        self._cache = (
            DiskCache(settings.cache_dir, settings.cache_max_bytes)
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
        decode_image); ImageFetchError when it cannot be fetched or decoded."""
        data = self.fetch_bytes(url, task_id=task_id)
        try:
            return decode_image(data, min_side=min_side)
        except ImageError as exc:
            raise ImageFetchError(exc.reason) from exc

    def fetch_bytes(self, url: str, *, task_id: int | None = None) -> bytes:
        """The raw bytes at ``url`` (``task_id`` is needed for cloud storage URIs)."""
        source = resolve_url(url, self._settings, task_id=task_id)
        if source.kind == "local_file":
            return _read_local(Path(source.location), self._settings.max_image_bytes)
        if self._cache is not None:
            cached = self._cache.get(source.location)
            if cached is not None:
                logger.debug("image cache hit for %s", display_url(source.location))
                return cached
        data = self._download(source)
        if self._cache is not None:
            self._cache.put(source.location, data)
        return data

    def bytes_or_none(self, url: str, *, task_id: int, left_out_of: str) -> bytes | None:
        """`fetch_bytes`, or None with one warning when the image cannot be had: a task whose
        image is unreadable is left out of `left_out_of` (training, a review), not fatal."""
        try:
            return self.fetch_bytes(url, task_id=task_id)
        except ImageFetchError as exc:
            logger.warning("Task %d left out of %s: %s", task_id, left_out_of, exc.reason)
            return None

    def _download(self, source: ResolvedSource) -> bytes:
        deadline = time.monotonic() + self._settings.timeout_s
        url, send_auth = source.location, source.send_auth
        visited = {url}
        try:
            for _ in range(self._settings.max_redirects + 1):
                response = self._send(url, send_auth, deadline)
                try:
                    if response.status_code not in _REDIRECT_STATUSES:
                        self._check_status(response, url, send_auth)
                        return self._read_body(response, url, deadline)
                    url = self._redirect_target(response, url)
                finally:
                    response.close()
                if url in visited:
                    raise ImageFetchError(f"redirect loop at {display_url(url)}")
                visited.add(url)
                # Decided afresh for every hop: the token must never follow a redirect elsewhere.
                send_auth = self._is_label_studio(url)
        except httpx.TimeoutException as exc:
            raise self._timed_out(url) from exc
        except httpx.HTTPError as exc:
            raise ImageFetchError(
                f"could not download {display_url(url)} ({type(exc).__name__}: {exc})"
            ) from exc
        raise ImageFetchError(
            f"too many redirects (more than {self._settings.max_redirects}) fetching "
            f"{display_url(source.location)}"
        )

    def _timed_out(self, url: str) -> ImageFetchError:
        return ImageFetchError(
            f"timed out after {self._settings.timeout_s:g} s fetching {display_url(url)}"
        )

    def _is_label_studio(self, url: str) -> bool:
        return self._label_studio is not None and origin_of(url) == self._label_studio

    def _send(self, url: str, send_auth: bool, deadline: float) -> httpx.Response:
        """GET ``url`` as a stream; with the token, LabelStudioAuth retries a 401 once."""
        if not self._is_label_studio(url):
            refused = refused_destination(url, self._settings)
            if refused is not None:
                raise ImageFetchError(f"refusing to fetch {display_url(url)}: {refused}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out(url)
        # Images are compressed already; identity keeps the size limit about wire bytes.
        headers = {"Accept-Encoding": "identity"}
        request = self._client.build_request("GET", url, headers=headers, timeout=remaining)
        auth = self._auth if send_auth and self._auth is not None else httpx.USE_CLIENT_DEFAULT
        try:
            response = self._client.send(request, stream=True, follow_redirects=False, auth=auth)
        except LabelStudioAuthError as exc:
            raise ImageFetchError(str(exc)) from exc
        # Label Studio included: a /setup hostname is not to be trusted more than a task URL.
        peer = _refused_peer(response)
        if peer is not None:
            response.close()
            raise ImageFetchError(
                f"refusing to fetch {display_url(url)}: the connection went to {peer}, a "
                "link-local or metadata address (the host's DNS answer changed after it was "
                "checked)"
            )
        return response

    def _redirect_target(self, response: httpx.Response, url: str) -> str:
        location = response.headers.get("location")
        if not location:
            raise ImageFetchError(
                f"HTTP {response.status_code} redirect without a Location from {display_url(url)}"
            )
        target = str(response.url.join(location))
        if origin_of(target) is None:
            raise ImageFetchError(
                f"{display_url(url)} redirected to an unsupported URL {display_url(target)}"
            )
        return target

    def _check_status(self, response: httpx.Response, url: str, sent_auth: bool) -> None:
        code = response.status_code
        if 200 <= code < 300:
            return
        shown = display_url(url)
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
            f"LABEL_STUDIO_URL ({label_studio_base(self._settings) or 'unset'}); if it is "
            "Label Studio, set LABEL_STUDIO_URL to its address and LABEL_STUDIO_API_KEY"
        )

    def _read_body(self, response: httpx.Response, url: str, deadline: float) -> bytes:
        limit = self._settings.max_image_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageFetchError(_too_large(f"at {display_url(url)}", limit))
        chunks: list[bytes] = []
        received = 0
        # Bounded by the byte limit and the deadline (a server trickling bytes would otherwise
        # reset the read timeout forever).
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > limit:
                raise ImageFetchError(_too_large(f"at {display_url(url)}", limit))
            if time.monotonic() > deadline:
                raise self._timed_out(url)
            chunks.append(chunk)
        return b"".join(chunks)
