"""End-to-end: a REAL Label Studio 1.23.2, installed in its own venv and booted once.

The first run installs Label Studio into ``<repo>/.venv-ls`` (about 1.5 min, ~1 GB; override
with LABELLOOP_LS_VENV). Booting costs ~45 s on a fresh data dir (database migrations).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from PIL import Image

from labelloop.dev.launcher import LABEL_STUDIO_VERSION, LabelStudioServer, ensure_label_studio
from labelloop.labelstudio.client import LabelStudioAPIError, LabelStudioClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("LABELLOOP_LS_VENV", REPO / ".venv-ls"))

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <Choices name="color" toName="image" choice="multiple">
    <Choice value="red"/>
    <Choice value="green"/>
    <Choice value="blue"/>
  </Choices>
  <Choices name="shape" toName="image" choice="single">
    <Choice value="round"/>
    <Choice value="square"/>
  </Choices>
</View>
"""


def _png(path: Path, color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


@pytest.fixture(scope="module")
def server(label_studio) -> LabelStudioServer:
    """The run's one Label Studio (conftest.py boots it once)."""
    return label_studio[0]


@pytest.fixture(scope="module")
def client(label_studio) -> LabelStudioClient:
    return label_studio[1]


@pytest.fixture(scope="module")
def project(client: LabelStudioClient) -> dict:
    return client.create_project("labelloop e2e", LABEL_CONFIG)


@pytest.fixture(scope="module")
def imported(
    server: LabelStudioServer, client: LabelStudioClient, project: dict
) -> dict[str, list[int]]:
    """3 uploaded PNGs and 2 PNGs from local storage (plus a file the regex must skip)."""
    up_dir = Path(server.settings.data_dir).parent / "to-upload"
    uploads = [_png(up_dir / f"up{i}.png", (80 * i, 0, 0)) for i in range(3)]
    uploaded = client.import_files(project["id"], uploads, batch=2)  # 2 requests: 2 + 1 files

    local_dir = Path(server.settings.document_root) / "dataset"
    _png(local_dir / "local0.png", (0, 200, 0))
    _png(local_dir / "local1.png", (0, 0, 200))
    (local_dir / "notes.txt").write_text("not an image")
    storage = client.add_local_storage(project["id"], local_dir)
    assert storage["status"] == "completed", storage
    assert storage["last_sync_count"] == 2, storage
    return {"uploaded": uploaded, "local_count": [storage["last_sync_count"]]}


def _non_loopback_ips() -> set[str]:
    ips = set()
    try:
        ips.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    try:  # the address of the default route's interface; UDP connect sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            ips.add(s.getsockname()[0])
    except OSError:
        pass
    return {ip for ip in ips if not ip.startswith("127.") and ip != "0.0.0.0"}


def _listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                found.append(addr)
    return found


def test_health_and_loopback_only(server: LabelStudioServer, client: LabelStudioClient) -> None:
    assert client.health()
    assert client.version()["release"] == LABEL_STUDIO_VERSION
    assert server.boot_seconds is not None

    port = server.settings.port
    listening = _listening_addresses(port)
    if Path("/proc/net/tcp").exists():
        assert listening == ["0100007F"], listening  # 127.0.0.1 only, no IPv6 / wildcard

    for ip in _non_loopback_ips():
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=2).close()


def test_tasks_from_upload_and_local_storage(
    server: LabelStudioServer,
    client: LabelStudioClient,
    project: dict,
    imported: dict[str, list[int]],
) -> None:
    uploaded = imported["uploaded"]
    assert len(uploaded) == 3 and len(set(uploaded)) == 3

    tasks = client.list_tasks(project["id"], page_size=2)  # 3 pages
    assert len(tasks) == 5
    assert len({t["id"] for t in tasks}) == 5
    by_id = {t["id"]: t for t in tasks}

    pid = project["id"]
    upload_urls = [by_id[i]["data"]["image"] for i in uploaded]
    assert all(u.startswith(f"/data/upload/{pid}/") for u in upload_urls), upload_urls
    # Upload order is kept: file0 -> first id.
    assert [u.rsplit("-", 1)[-1] for u in upload_urls] == ["up0.png", "up1.png", "up2.png"]

    local_urls = sorted(t["data"]["image"] for t in tasks if t["id"] not in uploaded)
    assert local_urls == [
        f"{server.url}/data/local-files/?d={quote('dataset/local0.png')}",
        f"{server.url}/data/local-files/?d={quote('dataset/local1.png')}",
    ]

    # The images are served back, with the token (and only with it).
    headers = {"Authorization": f"Token {server.settings.token}"}
    with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as http:
        for url in (upload_urls[0], local_urls[0]):
            r = http.get(url, headers=headers)
            assert r.status_code == 200, (url, r.status_code)
            assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert http.get(upload_urls[0]).status_code in (401, 403)


def test_annotation_roundtrip(
    client: LabelStudioClient, project: dict, imported: dict[str, list[int]]
) -> None:
    task_id = imported["uploaded"][0]
    result = [
        {
            "from_name": "color",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": ["red", "blue"]},
        },
        {
            "from_name": "shape",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": ["round"]},
        },
    ]
    created = client.create_annotation(task_id, result)
    assert created["task"] == task_id

    task = client.get_task(task_id)
    [annotation] = task["annotations"]
    assert annotation["id"] == created["id"]
    got = {r["from_name"]: r["value"]["choices"] for r in annotation["result"]}
    assert got == {"color": ["red", "blue"], "shape": ["round"]}

    client.delete_annotation(created["id"])
    assert client.get_task(task_id)["annotations"] == []


def test_errors_carry_the_status(server: LabelStudioServer, client: LabelStudioClient) -> None:
    with pytest.raises(LabelStudioAPIError) as info:
        client.get_task(987654321)
    assert info.value.status == 404
    assert info.value.method == "GET" and info.value.path == "/api/tasks/987654321/"

    with LabelStudioClient(server.url, "0" * 40) as bad:
        with pytest.raises(LabelStudioAPIError) as info:
            bad.get_project(1)
    assert info.value.status == 401
    assert len(info.value.body) <= 500


def test_ensure_label_studio_is_cached() -> None:
    start = time.monotonic()
    assert ensure_label_studio(LS_VENV) == LS_VENV.absolute() / "bin" / "label-studio"
    assert time.monotonic() - start < 1.0
