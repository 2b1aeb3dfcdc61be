"""The image fetcher against a local stand-in for Label Studio over real HTTP: tokens,
redirects, timeouts, size limits, the disk cache and the allowed destinations."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from PIL import Image
from servers import serve_in_thread, wait_until

from labelloop.labelstudio.auth import LabelStudioAuth
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.urls import FetchSettings, ImageFetchError
from labelloop.ml.images import ImageError

pytestmark = pytest.mark.timeout(60)

TOKEN = "1abe11009de0c0ffee5eed5ca1ab1e0123456789"
LS = "http://ls.example:8080"


# --------------------------------------------------------------------------- fake Label Studio


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def make_jwt(payload: dict[str, Any]) -> str:
    return f"{_b64({'alg': 'HS256'})}.{_b64(payload)}.unsigned"


def _jwt_id(token: str) -> str | None:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))).get("jti")


def blob(name: str, size: int) -> bytes:
    """Deterministic bytes of a given size, distinct per name."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@dataclass
class Seen:
    """Requests the fake Label Studio received: (host header, path, Authorization or None)."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    presigned: list[tuple[int, str]] = field(default_factory=list)
    exchanges: int = 0
    revoked_jtis: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]

    def auth_for(self, path: str) -> list[str | None]:
        return [auth for _, p, auth in self.requests if p == path]


SEEN = Seen()


def _authorised(request: Request) -> bool:
    header = request.headers.get("authorization", "")
    if header == f"Token {TOKEN}":
        return True
    if header.startswith("Bearer "):
        return _jwt_id(header.removeprefix("Bearer ")) not in SEEN.revoked_jtis
    return False


def _build_app() -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def record(request: Request, call_next):  # type: ignore[no-untyped-def]
        with SEEN.lock:
            SEEN.requests.append(
                (request.headers["host"], request.url.path, request.headers.get("authorization"))
            )
        return await call_next(request)

    def other_host(request: Request) -> str:
        return f"http://localhost:{request.url.port}"

    def label_studio(request: Request) -> str:
        return f"http://127.0.0.1:{request.url.port}"

    @app.post("/api/token/refresh/")
    async def refresh() -> JSONResponse:
        with SEEN.lock:
            SEEN.exchanges += 1
            jti = str(SEEN.exchanges)
        access = make_jwt({"token_type": "access", "exp": int(time.time()) + 300, "jti": jti})
        return JSONResponse({"access": access})

    @app.get("/data/upload/{path:path}")
    async def upload(path: str, request: Request) -> Response:
        if not _authorised(request):
            return JSONResponse({"detail": "Authentication credentials were not provided."}, 401)
        return Response(f"upload:{path}".encode(), media_type="image/png")

    @app.get("/data/local-files/")
    async def local_files(d: str, request: Request) -> Response:
        if not _authorised(request):
            return JSONResponse({"detail": "Authentication credentials were not provided."}, 401)
        return Response(f"ls-local:{d}".encode())

    @app.get("/files/{name}")
    async def files(name: str, size: int = 1000) -> Response:
        return Response(blob(name, size), media_type="application/octet-stream")

    @app.get("/to-other-host")
    async def to_other_host(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{other_host(request)}/files/redirected", 302)

    @app.get("/back-to-ls")
    async def back_to_ls(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{label_studio(request)}/data/upload/1/back.png", 307)

    @app.get("/loop/{name}")
    async def loop(name: str) -> RedirectResponse:
        return RedirectResponse("/loop/b" if name == "a" else "/loop/a", 302)

    @app.get("/chain/{n}")
    async def chain(n: int) -> RedirectResponse:
        return RedirectResponse(f"/chain/{n + 1}", 302)

    @app.get("/status/{code}")
    async def status(code: int) -> Response:
        return Response(b"nope", status_code=code)

    @app.get("/slow")
    async def slow() -> Response:
        await asyncio.sleep(2.0)
        return Response(b"late")

    @app.get("/trickle")
    async def trickle() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(20):
                await asyncio.sleep(0.1)
                yield b"x" * 10

        return StreamingResponse(chunks())

    @app.get("/big-stream")
    async def big_stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"y" * 500

        return StreamingResponse(chunks())  # chunked: no Content-Length to refuse early

    @app.get("/tasks/{task_id}/presign/")
    async def presign(task_id: int, fileuri: str, request: Request) -> Response:
        if not _authorised(request):
            return JSONResponse({"detail": "Authentication credentials were not provided."}, 401)
        uri = base64.urlsafe_b64decode(fileuri).decode()
        with SEEN.lock:
            SEEN.presigned.append((task_id, uri))
        key = uri.split("://", 1)[1]
        return RedirectResponse(f"{other_host(request)}/signed/{key}?X-Amz-Signature=s3cr3t", 303)

    @app.get("/signed/{key:path}")
    async def signed(key: str) -> Response:
        return Response(f"signed:{key}".encode())

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_in_thread(_build_app()) as url:
        yield url


@pytest.fixture(autouse=True)
def _reset_seen() -> None:
    global SEEN
    SEEN = Seen()


@pytest.fixture
def make_fetcher(server: str) -> Iterator[Any]:
    fetchers: list[ImageFetcher] = []

    def make(api_key: str | None = TOKEN, **settings: Any) -> ImageFetcher:
        auth = LabelStudioAuth(server, api_key) if api_key else None
        fetcher = ImageFetcher(FetchSettings(label_studio_url=server, **settings), auth)
        fetchers.append(fetcher)
        return fetcher

    yield make
    for fetcher in fetchers:
        fetcher.close()


def other(server: str) -> str:
    """The same test server under another host name: a different origin for the fetcher."""
    return server.replace("127.0.0.1", "localhost")


# --------------------------------------------------------------------------- resolve_url


def _upload_on_disk(data_dir: Path, name: str = "a1b2c3d4-a b.jpg") -> Path:
    path = data_dir / "media" / "upload" / "3" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"uploaded")
    return path


def _encode(image: Image.Image, fmt: str, path: Path | None = None, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


# --------------------------------------------------------------------------- fetching


def test_upload_url_is_fetched_with_the_token(make_fetcher: Any) -> None:
    assert make_fetcher().fetch_bytes("/data/upload/1/a.png") == b"upload:1/a.png"
    assert SEEN.auth_for("/data/upload/1/a.png") == [f"Token {TOKEN}"]


def test_other_host_gets_no_token(make_fetcher: Any, server: str) -> None:
    data = make_fetcher().fetch_bytes(f"{other(server)}/files/plain?size=10")
    assert data == blob("plain", 10)
    assert SEEN.requests == [(other(server).removeprefix("http://"), "/files/plain", None)]


def test_redirect_to_other_host_drops_the_token(make_fetcher: Any, server: str) -> None:
    assert make_fetcher().fetch_bytes(f"{server}/to-other-host") == blob("redirected", 1000)
    assert SEEN.auth_for("/to-other-host") == [f"Token {TOKEN}"]
    assert SEEN.auth_for("/files/redirected") == [None]


def test_redirect_back_to_label_studio_sends_the_token_again(
    make_fetcher: Any, server: str
) -> None:
    assert make_fetcher().fetch_bytes(f"{other(server)}/back-to-ls") == b"upload:1/back.png"
    assert SEEN.auth_for("/back-to-ls") == [None]
    assert SEEN.auth_for("/data/upload/1/back.png") == [f"Token {TOKEN}"]


def test_redirect_loop_is_refused(make_fetcher: Any) -> None:
    with pytest.raises(ImageFetchError, match="redirect loop"):
        make_fetcher().fetch_bytes("/loop/a")
    assert len(SEEN.requests) == 2


def test_too_many_redirects_are_refused(make_fetcher: Any) -> None:
    with pytest.raises(ImageFetchError, match="too many redirects"):
        make_fetcher(max_redirects=3).fetch_bytes("/chain/0")
    assert SEEN.paths() == ["/chain/0", "/chain/1", "/chain/2", "/chain/3"]


def test_missing_token_says_to_set_it(make_fetcher: Any) -> None:
    with pytest.raises(ImageFetchError, match="no API token was sent; set LABEL_STUDIO_API_KEY"):
        make_fetcher(api_key=None).fetch_bytes("/data/upload/1/a.png")


def test_wrong_token_says_to_set_it(make_fetcher: Any) -> None:
    with pytest.raises(ImageFetchError) as info:
        make_fetcher(api_key="0" * 40).fetch_bytes("/data/upload/1/a.png")
    assert "HTTP 401" in info.value.reason
    assert "refused the API token" in info.value.reason
    assert "LABEL_STUDIO_API_KEY" in info.value.reason
    assert "0" * 40 not in info.value.reason


def test_401_from_another_host_explains_why_no_token_was_sent(
    make_fetcher: Any, server: str
) -> None:
    with pytest.raises(ImageFetchError, match="not LABEL_STUDIO_URL"):
        make_fetcher().fetch_bytes(f"{other(server)}/data/upload/1/a.png")


def test_revoked_access_token_is_renewed_once(make_fetcher: Any) -> None:
    SEEN.revoked_jtis.add("1")  # the first access token issued is refused
    fetcher = make_fetcher(api_key=make_jwt({"token_type": "refresh", "exp": 2**31}))
    assert fetcher.fetch_bytes("/data/upload/1/a.png") == b"upload:1/a.png"
    assert SEEN.exchanges == 2
    assert len(SEEN.auth_for("/data/upload/1/a.png")) == 2


def test_404_is_reported_with_the_status(make_fetcher: Any) -> None:
    with pytest.raises(ImageFetchError, match="HTTP 404 Not Found from .*/status/404"):
        make_fetcher().fetch_bytes("/status/404")


def test_slow_server_times_out(make_fetcher: Any) -> None:
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"timed out after 0\.5 s"):
        make_fetcher(timeout_s=0.5).fetch_bytes("/slow")
    assert time.monotonic() - start < 1.5


def test_trickling_server_times_out(make_fetcher: Any) -> None:
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"timed out after 0\.5 s"):
        make_fetcher(timeout_s=0.5).fetch_bytes("/trickle")
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("path", ["/files/big?size=2000", "/big-stream"])
def test_oversize_body_is_refused(make_fetcher: Any, path: str) -> None:
    with pytest.raises(ImageFetchError, match="larger than"):
        make_fetcher(max_image_bytes=1000).fetch_bytes(path)


def test_presign_flow_for_s3(make_fetcher: Any) -> None:
    data = make_fetcher().fetch_bytes("s3://bucket/dir/a.png", task_id=7)
    assert data == b"signed:bucket/dir/a.png"
    assert SEEN.presigned == [(7, "s3://bucket/dir/a.png")]
    assert SEEN.auth_for("/tasks/7/presign/") == [f"Token {TOKEN}"]
    assert SEEN.auth_for("/signed/bucket/dir/a.png") == [None]


def test_signed_url_is_not_shown_in_errors(make_fetcher: Any, server: str) -> None:
    with pytest.raises(ImageFetchError) as info:
        make_fetcher().fetch_bytes(f"{other(server)}/status/403?X-Amz-Signature=s3cr3t")
    assert "s3cr3t" not in info.value.reason


def test_local_file_is_read_from_the_document_root(make_fetcher: Any, tmp_path: Path) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "a.png").write_bytes(b"on disk")
    fetcher = make_fetcher(document_root=root, cache_dir=cache)
    assert fetcher.fetch_bytes("/data/local-files/?d=dir/a.png") == b"on disk"
    assert SEEN.requests == []
    assert list(cache.iterdir()) == []  # local files are not cached
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"):
        fetcher.fetch_bytes("/data/local-files/?d=dir/missing.png")


def test_upload_is_read_from_label_studio_data_dir(make_fetcher: Any, tmp_path: Path) -> None:
    _upload_on_disk(tmp_path, "a.png")
    fetcher = make_fetcher(label_studio_data_dir=tmp_path)
    assert fetcher.fetch_bytes("/data/upload/3/a.png") == b"uploaded"
    assert SEEN.requests == []
    assert fetcher.fetch_bytes("/data/upload/3/b.png") == b"upload:3/b.png"  # not on disk
    assert len(SEEN.requests) == 1


def test_local_file_over_the_size_limit_is_refused(make_fetcher: Any, tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(b"z" * 2000)
    fetcher = make_fetcher(document_root=tmp_path, max_image_bytes=1000)
    with pytest.raises(ImageFetchError, match="larger than"):
        fetcher.fetch_bytes("/data/local-files/?d=big.png")


def test_local_files_without_document_root_are_downloaded(make_fetcher: Any) -> None:
    assert make_fetcher().fetch_bytes("/data/local-files/?d=dir/a.png") == b"ls-local:dir/a.png"
    assert SEEN.auth_for("/data/local-files/") == [f"Token {TOKEN}"]


def test_cache_hit_avoids_a_second_request(make_fetcher: Any, server: str, tmp_path: Path) -> None:
    fetcher = make_fetcher(cache_dir=tmp_path)
    assert fetcher.fetch_bytes("/data/upload/1/a.png") == b"upload:1/a.png"
    assert fetcher.fetch_bytes("/data/upload/1/a.png") == b"upload:1/a.png"
    assert len(SEEN.requests) == 1
    key = hashlib.sha256(f"{server}/data/upload/1/a.png".encode()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == [key]
    # The key is the URL, not the token: another fetcher with another token hits it too.
    other_token = make_fetcher(api_key="f" * 40, cache_dir=tmp_path)
    assert other_token.fetch_bytes("/data/upload/1/a.png") == b"upload:1/a.png"
    assert len(SEEN.requests) == 1


def test_cache_evicts_least_recently_used(
    make_fetcher: Any, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    (tmp_path / "notes.txt").write_text("not ours")  # never evicted: the cache did not write it
    fetcher = make_fetcher(cache_dir=tmp_path, cache_max_bytes=2500)
    probe = tmp_path_factory.mktemp("clock") / "probe"  # same file system, outside the cache

    def later_than_every_entry() -> bool:
        newest = max(p.stat().st_mtime_ns for p in tmp_path.iterdir())
        probe.touch()
        return probe.stat().st_mtime_ns > newest

    def fetch(name: str) -> None:
        assert fetcher.fetch_bytes(f"/files/{name}") == blob(name, 1000)
        # Distinct mtimes even on coarse-grained file systems: wait until the file system's
        # clock has moved past the entry just written or touched.
        wait_until(
            later_than_every_entry,
            timeout_s=10,
            what="the file system clock to pass the newest cache entry",
            interval_s=0.002,
        )

    fetch("a")
    fetch("b")
    fetch("a")  # hit: a is now more recent than b
    fetch("c")  # 3000 bytes > 2500: b goes
    assert SEEN.paths() == ["/files/a", "/files/b", "/files/c"]
    cached = [p for p in tmp_path.iterdir() if p.name != "notes.txt"]
    assert len(cached) == 2
    assert sum(p.stat().st_size for p in cached) <= 2500
    fetch("a")
    fetch("c")
    assert SEEN.paths() == ["/files/a", "/files/b", "/files/c"]
    fetch("b")
    assert SEEN.paths()[-1] == "/files/b"
    assert (tmp_path / "notes.txt").exists()


def test_concurrent_fetches_share_the_client_and_cache(make_fetcher: Any, tmp_path: Path) -> None:
    fetcher = make_fetcher(cache_dir=tmp_path, cache_max_bytes=5000)
    names = [f"n{i}" for i in range(16)]
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def work(batch: list[str]) -> None:
        try:
            for name in batch:
                results[name] = fetcher.fetch_bytes(f"/files/{name}")
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(names[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not errors
    assert results == {name: blob(name, 1000) for name in names}
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 5000


def test_fetch_image_decodes(make_fetcher: Any, tmp_path: Path) -> None:
    _encode(Image.new("RGBA", (4, 3), (10, 20, 30, 40)), "PNG", tmp_path / "a.png")
    image = make_fetcher(document_root=tmp_path).fetch_image("/data/local-files/?d=a.png")
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (4, 3), (10, 20, 30))


def test_token_for_another_label_studio_is_refused(server: str) -> None:
    with pytest.raises(ValueError, match="same LABEL_STUDIO_URL"):
        ImageFetcher(FetchSettings(label_studio_url=other(server)), LabelStudioAuth(server, TOKEN))


def test_cache_leaves_foreign_and_fresh_temp_files(tmp_path: Path, make_fetcher: Any) -> None:
    stale, fresh = tmp_path / ".old.tmp", tmp_path / ".new.tmp"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"being written")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    make_fetcher(cache_dir=tmp_path).fetch_bytes("/files/t")
    assert not stale.exists()
    assert fresh.exists()


# --------------------------------------------------------------------------- destinations


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/",  # AWS/GCP/Azure metadata (link-local)
        "http://[fe80::1]/x.png",
        "http://100.100.100.200/latest/meta-data/",  # Alibaba Cloud metadata
        "http://0.0.0.0:80/x.png",
    ],
)
def test_metadata_and_link_local_hosts_are_refused(make_fetcher: Any, url: str) -> None:
    with pytest.raises(ImageError, match="link-local or metadata"):
        make_fetcher().fetch_bytes(url)


def test_allow_list_limits_other_hosts_but_not_label_studio(make_fetcher: Any, server: str) -> None:
    fetcher = make_fetcher(allowed_hosts=("images.example.org",))
    with pytest.raises(ImageError, match="not among the allowed image hosts"):
        fetcher.fetch_bytes(f"{other(server)}/files/x")
    assert fetcher.fetch_bytes(f"{server}/files/x?size=10") == blob("x", 10)
    # A redirect from Label Studio to a host outside the list is refused at that hop.
    with pytest.raises(ImageError, match="not among the allowed"):
        fetcher.fetch_bytes(f"{server}/to-other-host")
    assert make_fetcher(allowed_hosts=("localhost",)).fetch_bytes(
        f"{other(server)}/files/y?size=10"
    ) == blob("y", 10)
