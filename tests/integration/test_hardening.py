"""Bad input against the running backend: every case over real HTTP, one table.

The backend is the app `labelloop serve` runs (build_app: model, ledger, trainer), served by
uvicorn on 127.0.0.1; a second local server stands in for Label Studio's upload endpoint and
serves broken files, error statuses, a slow response and a redirect loop. Each case must get a
clear 4xx, or an empty prediction for its task with the reason in the log; never a 5xx; and
after every case the server still answers /health and a good /predict.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import RedirectResponse, Response
from PIL import Image
from servers import serve_in_thread

from labelloop.loop.trainer import TrainerSettings
from labelloop.serve.app import build_app
from labelloop.serve.settings import settings_from

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOKEN = "c0ffee0123456789abcdef0123456789abcdef01"
# Generous enough that a loaded CI machine serves a small file in time (0.5 s was not: a
# text file's fetch timed out there), short enough that the slow-server case stays quick.
FETCH_TIMEOUT_S = 3.0
SLOW_S = FETCH_TIMEOUT_S * 3
PROJECT = 11


# --------------------------------------------------------------------------- files


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noisy(mode: str = "RGB", size: tuple[int, int] = (48, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(
        mode
    )


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return _encode(_noisy(size=(48, 24)), "JPEG", exif=exif.tobytes())


def _bomb() -> bytes:
    # 10,000 x 10,000 = 100 M pixels, over Pillow's 89 M default: 12 kB on the wire, 100 MB
    # (or far more once converted to RGB) if it were decoded.
    return _encode(Image.new("1", (10_000, 10_000)), "PNG")


def _files() -> dict[str, bytes]:
    png = _encode(_noisy(), "PNG")
    jpeg = _encode(_noisy(), "JPEG")
    ramp = (np.arange(48 * 48, dtype=np.uint32).reshape(48, 48) * 28).astype(np.uint16)
    return {
        "corrupt.png": png[:40] + b"\x00" * 400,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.png": b"",
        "notes.txt": b"this is a text file, not an image\n",
        "bomb.png": _bomb(),
        "16bit.png": _encode(Image.fromarray(ramp), "PNG"),
        "cmyk.jpg": _encode(_noisy("CMYK"), "JPEG"),
        "palette.png": _encode(_noisy("P"), "PNG"),
        "alpha.png": _encode(_noisy("RGBA"), "PNG"),
        "exif.jpg": _exif_rotated(),
        "tiny.png": _encode(_noisy(size=(2, 2)), "PNG"),
    }


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return _files()


@pytest.fixture(scope="module")
def label_studio(files, demo_dataset):
    """Label Studio's upload endpoint (token required) with the bad files, plus misbehaviour."""
    host = FastAPI()

    @host.get("/data/upload/{project}/{name}")
    def upload(project: int, name: str, authorization: str | None = Header(None)) -> Response:
        if authorization != f"Token {TOKEN}":
            raise HTTPException(401, "Authentication credentials were not provided.")
        if name in files:
            return Response(files[name], media_type="application/octet-stream")
        path = demo_dataset.images_dir / name
        if not path.is_file():
            raise HTTPException(404)
        return Response(path.read_bytes(), media_type="image/png")

    @host.get("/status/{code}")
    def status(code: int) -> Response:
        return Response(b"no", status_code=code)

    @host.get("/slow")
    async def slow() -> Response:
        await asyncio.sleep(SLOW_S)
        return Response(files["tiny.png"])

    @host.get("/loop/{name}")
    def loop(name: str) -> RedirectResponse:
        return RedirectResponse("/loop/b" if name == "a" else "/loop/a", 302)

    with serve_in_thread(host) as url:
        yield url


@pytest.fixture(scope="module")
def backend(trained_model, demo_dataset, files, label_studio, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening")
    model_dir = folder / "model"
    shutil.copytree(trained_model[0], model_dir)
    root = folder / "files"
    (root / "images").mkdir(parents=True)
    for name, data in files.items():
        (root / "images" / name).write_bytes(data)
    settings = settings_from(
        {
            "model_dir": model_dir,
            "fetch_timeout_s": FETCH_TIMEOUT_S,
            "refresh": False,
            "rename_backend": False,
        },
        {
            "LABEL_STUDIO_URL": label_studio,
            "LABEL_STUDIO_API_KEY": TOKEN,
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root),
        },
    )
    # No automatic training: webhook cases must not start jobs that compete for the CPUs.
    app = build_app(settings, TrainerSettings(auto_train_after=100_000, quiet_seconds=86_400))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def config(demo_dataset) -> str:
    return demo_dataset.label_config.read_text()


@pytest.fixture(scope="module")
def good_image(demo_dataset) -> str:
    return f"/data/upload/1/{sorted(demo_dataset.images_dir.glob('*.png'))[0].name}"


# --------------------------------------------------------------------------- the table


def predict_body(config: str, *tasks_data: dict[str, Any]) -> dict[str, Any]:
    return {
        "tasks": [{"id": i + 1, "data": data} for i, data in enumerate(tasks_data)],
        "label_config": config,
        "project": f"{PROJECT}.1700000000",
    }


def annotation_event(config: str, result: list[Any], **annotation: Any) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": PROJECT, "label_config": config},
        "annotation": {
            "id": 501,
            "task": 1,
            "result": result,
            "updated_at": "2026-11-25T00:00:00Z",
            **annotation,
        },
        "task": {"id": 1, "data": {"image": "/data/upload/1/x.png"}},
    }


def choices(control: str, *labels: Any) -> dict[str, Any]:
    return {
        "from_name": control,
        "to_name": "image",
        "type": "choices",
        "value": {"choices": list(labels)},
    }


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    # JSON-able body, raw bytes, or a function of the label config giving either.
    body: Any
    status: int
    # Regex the response text must match (a reason, or the shape of the answer).
    answer: str = ""
    # Regex a log record of the backend must match (the logged reason).
    log: str = ""
    # For /predict cases: the task gets a real prediction (True) or an empty one (False).
    predicted: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def empty(case_id: str, image: Any, reason: str, *, key: str = "image") -> Case:
    return Case(
        case_id,
        "/predict",
        lambda cfg: predict_body(cfg, {key: image}),
        200,
        predicted=False,
        log=rf"Task 1 gets no prediction: .*{reason}",
    )


def real(case_id: str, name: str) -> Case:
    return Case(
        case_id,
        "/predict",
        lambda cfg: predict_body(cfg, {"image": f"/data/upload/1/{name}"}),
        200,
        predicted=True,
    )


CASES = [
    # -- images that cannot be read: an empty prediction and the reason in the log
    empty("corrupt", "/data/upload/1/corrupt.png", "corrupt or truncated|not an image"),
    empty("truncated", "/data/upload/1/truncated.jpg", "corrupt or truncated"),
    empty("zero-byte", "/data/upload/1/empty.png", "empty image file"),
    empty("not-an-image", "/data/upload/1/notes.txt", "not an image"),
    empty("decompression-bomb", "/data/upload/1/bomb.png", "decompression bomb"),
    empty(
        "local-file-corrupt",
        "/data/local-files/?d=images/corrupt.png",
        "corrupt or truncated|not an image",
    ),
    empty("url-401", "/status/401", "HTTP 401"),
    empty("url-404", "/data/upload/1/missing.png", "HTTP 404"),
    empty("url-timeout", "/slow", rf"timed out after {FETCH_TIMEOUT_S:g} s"),
    empty("redirect-loop", "/loop/a", "redirect loop"),
    empty("metadata-host", "http://169.254.169.254/latest/meta-data/", "link-local or metadata"),
    empty("file-scheme", "file:///etc/passwd", "unsupported URL scheme"),
    empty("local-file-dotdot", "/data/local-files/?d=../../etc/passwd", "refusing local file"),
    empty("no-image-key", "a photo", "task data has no 'image' image URL", key="text"),
    empty("image-not-a-string", 42, "task data has no 'image' image URL"),
    empty("image-empty-string", "", "task data has no 'image' image URL"),
    # -- unusual but valid images: real predictions
    real("16-bit", "16bit.png"),
    real("cmyk", "cmyk.jpg"),
    real("palette", "palette.png"),
    real("alpha", "alpha.png"),
    real("exif-rotated", "exif.jpg"),
    real("2x2-pixels", "tiny.png"),
    # -- bad /predict requests: a clear 4xx
    Case("malformed-json", "/predict", b'{"tasks": [', 400, "not valid JSON"),
    Case("body-not-an-object", "/predict", b"[1, 2]", 422, "body"),
    Case("missing-tasks", "/predict", lambda cfg: {"label_config": cfg}, 422, "tasks"),
    Case("tasks-not-a-list", "/predict", {"tasks": "all", "label_config": "<View/>"}, 422, "tasks"),
    Case(
        "task-without-id",
        "/predict",
        lambda cfg: {"tasks": [{"data": {"image": "/x.png"}}], "label_config": cfg},
        422,
        r"tasks\.0\.id",
    ),
    Case(
        "missing-label-config",
        "/predict",
        {"tasks": [{"id": 1, "data": {"image": "/x.png"}}]},
        422,
        "label_config is missing",
    ),
    Case(
        "config-not-xml",
        "/predict",
        {"tasks": [{"id": 1, "data": {}}], "label_config": "<View><Image"},
        422,
        "not valid XML",
    ),
    Case(
        "config-without-image",
        "/predict",
        {
            "tasks": [{"id": 1, "data": {}}],
            "label_config": '<View><Text name="t" value="$t"/><Choices name="c" toName="t">'
            '<Choice value="bolt"/></Choices></View>',
        },
        422,
        "Image",
    ),
    Case(
        "choices-match-no-class",
        "/predict",
        {
            "tasks": [{"id": 1, "data": {"image": "/x.png"}}],
            "label_config": '<View><Image name="i" value="$image"/><Choices name="c" '
            'toName="i"><Choice value="cat"/><Choice value="dog"/></Choices></View>',
        },
        422,
        "cat",
    ),
    Case(
        "unpaired-surrogate",
        "/predict",
        b'{"tasks": [{"id": 1, "data": {"image": "/x\\ud800.png"}}], "label_config": "<View/>"}',
        422,
        "not valid Unicode",
    ),
    # -- bad /setup requests
    Case("setup-config-not-xml", "/setup", {"schema": "<View", "project": "11.1"}, 422, "XML"),
    Case(
        "setup-hostname-not-a-url",
        "/setup",
        lambda cfg: {"schema": cfg, "hostname": "localhost:8080", "access_token": "t" * 40},
        200,
        "ignored the hostname",
        log="ignored the hostname /setup sent",
    ),
    Case(
        "setup-token-not-ascii",
        "/setup",
        lambda cfg: {"schema": cfg, "hostname": "http://127.0.0.1:9", "access_token": "tökén"},
        200,
        "ignored the access token",
    ),
    # -- webhooks
    Case(
        "webhook-unknown-action",
        "/webhook",
        {"action": "SOMETHING_NEW", "project": {"id": PROJECT}},
        200,
        '"ignored":true',
    ),
    Case("webhook-missing-action", "/webhook", {"project": {"id": PROJECT}}, 422, "action"),
    Case("webhook-body-a-list", "/webhook", [{"action": "X"}], 422, "body"),
    Case(
        "webhook-unknown-label",
        "/webhook",
        lambda cfg: annotation_event(cfg, [choices("components", "bolt", "flux-capacitor")]),
        200,
        '"recorded":1',
        log=r"labels \['flux-capacitor'\] are not among the choices of 'components'",
    ),
    Case(
        "webhook-unknown-control",
        "/webhook",
        lambda cfg: annotation_event(cfg, [choices("mood", "happy")], id=502),
        200,
        '"recorded":1',
        log=r"ignoring controls not in the label config: \['mood'\]",
    ),
    Case(
        "webhook-result-item-not-an-object",
        "/webhook",
        lambda cfg: annotation_event(cfg, [7], id=503),
        422,
        r"result\[0\] is int",
    ),
    Case(
        "webhook-choices-not-a-list",
        "/webhook",
        lambda cfg: annotation_event(
            cfg, [{"from_name": "c", "type": "choices", "value": "bolt"}], id=504
        ),
        422,
        "value.choices",
    ),
    Case(
        "webhook-id-beyond-64-bits",
        "/webhook",
        lambda cfg: annotation_event(cfg, [], id=2**70),
        422,
        "no integer id",
    ),
    Case(
        "webhook-project-id-beyond-64-bits",
        "/webhook",
        {"action": "ANNOTATIONS_CREATED", "project": {"id": 2**64}, "annotation": []},
        422,
        "without a project id",
    ),
    Case(
        "webhook-updated-at-out-of-range",
        "/webhook",
        lambda cfg: annotation_event(cfg, [], id=505, updated_at="9999-12-31T23:59:59-12:00"),
        422,
        "ISO 8601",
    ),
    Case(
        "webhook-deleted-without-list",
        "/webhook",
        {"action": "ANNOTATIONS_DELETED", "project": {"id": PROJECT}},
        422,
        "annotations",
    ),
    Case(
        "webhook-unpaired-surrogate",
        "/webhook",
        b'{"action": "PROJECT_UPDATED", "project": {"id": 11, "label_config": "\\udfff"}}',
        422,
        "not valid Unicode",
    ),
]


def _send(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


def _assert_still_serving(client: httpx.Client, config: str, good_image: str) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["model_loaded"]
    response = client.post("/predict", json=predict_body(config, {"image": good_image}))
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    assert prediction and prediction["model_version"] == health.json()["model_version"]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_clear_answer_and_the_server_keeps_serving(
    case: Case,
    backend: httpx.Client,
    config: str,
    good_image: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = case.body(config) if callable(case.body) else case.body
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        response = _send(backend, case.path, body)
    assert response.status_code == case.status, response.text
    assert time.monotonic() - started < SLOW_S + 5
    assert "Traceback" not in response.text
    if case.answer:
        assert re.search(case.answer, response.text), response.text
    if case.log:
        assert any(re.search(case.log, r.getMessage()) for r in caplog.records), caplog.text
    if case.predicted is not None:
        [prediction] = response.json()["results"]
        if case.predicted:
            version = backend.get("/health").json()["model_version"]
            assert prediction["model_version"] == version
            assert 0.0 <= prediction["score"] <= 1.0
        else:
            assert prediction == []
    unhandled = [r for r in caplog.records if r.getMessage().startswith("Unhandled error")]
    assert not unhandled
    _assert_still_serving(backend, config, good_image)


def test_the_table_covers_every_route_that_takes_a_body() -> None:
    assert {c.path for c in CASES} == {"/predict", "/setup", "/webhook"}
    assert len({c.id for c in CASES}) == len(CASES)


def test_a_huge_batch_is_answered_in_bounded_time(
    backend: httpx.Client, config: str, good_image: str
) -> None:
    """2,000 tasks, most without a readable image: one answer per task, in order, quickly."""
    n = 2000
    data: list[dict[str, Any]] = []
    for i in range(n):
        if i % 20 == 0:
            data.append({"image": "/data/local-files/?d=images/tiny.png"})
        elif i % 2:
            data.append({"text": "no image"})
        else:
            data.append({"image": f"/data/local-files/?d=images/missing-{i}.png"})
    failed_before = sum(backend.get("/status").json()["predict"]["failed"].values())
    started = time.monotonic()
    response = backend.post("/predict", json=predict_body(config, *data))
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == n
    assert [bool(r) for r in results] == [i % 20 == 0 for i in range(n)]
    failed_after = sum(backend.get("/status").json()["predict"]["failed"].values())
    assert failed_after - failed_before == n - n // 20
    assert elapsed < 60, f"{n} tasks took {elapsed:.1f} s"
    print(f"huge batch: {n} tasks in {elapsed:.2f} s")
    _assert_still_serving(backend, config, good_image)


# --------------------------------------------------------------------------- DNS rebinding


def test_dns_rebinding_is_caught_on_the_connected_socket(label_studio: str, monkeypatch) -> None:
    """The host name is checked when first resolved; a different answer when the connection
    resolves it again (DNS rebinding) is caught on the socket before the body is read.

    Loopback stands in for the metadata address (only 127.0.0.1 may be bound here), and the
    resolver is replaced for one made-up name: the first answer is a public address, every
    later one is 127.0.0.1.
    """
    import ipaddress
    import socket

    from labelloop.labelstudio import urls as images
    from labelloop.labelstudio.fetcher import ImageFetcher
    from labelloop.labelstudio.urls import FetchSettings, ImageFetchError

    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        answer = "203.0.113.7" if not lookups else "127.0.0.1"
        lookups.append(answer)
        return real_getaddrinfo(answer, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://rebind.test:{httpx.URL(label_studio).port}/status/200"
    fetcher = ImageFetcher(FetchSettings(label_studio_url=None, timeout_s=5), None)
    try:
        # Not refused: the connection really reaches the server under the rebound name.
        assert fetcher.fetch_bytes(url) == b"no"
        lookups.clear()
        monkeypatch.setattr(
            images,
            "_METADATA_ADDRESSES",
            images._METADATA_ADDRESSES | {ipaddress.ip_address("127.0.0.1")},
        )
        fetcher.close()
        fetcher = ImageFetcher(FetchSettings(label_studio_url=None, timeout_s=5), None)
        with pytest.raises(ImageFetchError, match="connection went to 127.0.0.1"):
            fetcher.fetch_bytes(url)
        assert lookups[0] == "203.0.113.7"  # what the first check saw, and let through
    finally:
        fetcher.close()


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("169.254.169.254", True),
        ("::ffff:169.254.169.254", True),  # the same host written as IPv4-mapped IPv6
        ("fe80::1", True),
        ("100.100.100.200", True),
        ("0.0.0.0", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
    ],
)
def test_refused_addresses(address: str, refused: bool) -> None:
    import ipaddress

    from labelloop.labelstudio.urls import refused_address

    assert refused_address(ipaddress.ip_address(address)) is refused
