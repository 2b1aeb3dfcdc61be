"""The project page (labelloop.serve.page) through the app, on a model folder written by hand:
the page reads manifests, the ledger and evaluation files, never weights, so no model is
trained here. Escaping, the 404 page, basic auth and the refusal of names outside the store."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from labelloop.config import PreprocessConfig
from labelloop.lineages import project_store
from labelloop.loop.ledger import Ledger
from labelloop.runtime.projects import ProjectModels
from labelloop.serve.app import create_app
from labelloop.serve.settings import settings_from
from labelloop.store import Manifest, ModelStore

EVIL_CLASS = "<script>alert(1)</script>"
EVIL_ERROR = "<img src=x onerror=alert(2)>"
BASE_V = "v1-20260101T000000"
OWN_V1 = "v1-20260102T000000"
OWN_V2 = "v2-20260103T000000"
PROJECT = 5  # its own lineage: OWN_V1 promoted and current, OWN_V2 rejected
COLD = 6  # only in the ledger: served by the base model, a job running
# What the fast update of OWN_V1 kept (loop/updates.py `_review`): its first flags of 12.
REVIEW = {
    "flags": [
        {
            "task_id": 31,
            "control": "parts",
            "label": EVIL_CLASS,
            "annotated": True,
            "probability": 0.02,
            "score": 0.98,
        },
        {
            "task_id": 7,
            "control": "parts",
            "label": "bolt",
            "annotated": False,
            "probability": 0.91,
            "score": 0.91,
        },
    ],
    "n_flagged": 12,
    "n_judged": 30,
    "seconds": 0.2,
}
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16  # served as bytes, never decoded


def _version(
    store: ModelStore, version: str, created_at: str, metrics: dict, *, report: str | None = None
) -> None:
    folder = store.versions_dir / version
    (folder / "evaluation").mkdir(parents=True)
    manifest = Manifest(
        version=version,
        created_at=created_at,
        backbone="resnet18",
        num_classes=2,
        label_groups={"parts": ["bolt", EVIL_CLASS]},
        preprocess=PreprocessConfig(),
        metrics=metrics,
    )
    (folder / "manifest.json").write_text(manifest.model_dump_json(), encoding="utf-8")
    if report is not None:
        (folder / "evaluation" / "report.md").write_text(report, encoding="utf-8")


def _per_class(f1: float) -> dict:
    return {
        name: {"precision": f1, "recall": f1, "f1": f1, "support": 7, "average_precision": f1}
        for name in ("bolt", EVIL_CLASS)
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    base = ModelStore(root)
    _version(
        base,
        BASE_V,
        "2026-01-01T00:00:00+00:00",
        {"test": {"n_samples": 30, "f1_macro": 0.5, "per_class": _per_class(0.5)}},
        report="# Base report\n",
    )
    (base.versions_dir / BASE_V / "evaluation" / "pr_curves.png").write_bytes(PNG)
    (root / "current").write_text(BASE_V + "\n")
    own = project_store(root, PROJECT)
    evaluation = {
        "n_items": 24,
        "f1_macro": 0.61,
        "per_class": _per_class(0.61),
        "pr_curves": {"bolt": {"recall": [1.0, 0.5, 0.0], "precision": [0.4, 0.8, 1.0]}},
    }
    _version(
        own,
        OWN_V1,
        "2026-01-02T00:00:00+00:00",
        {
            "candidate_f1": 0.61,
            "current_f1": 0.5,
            "incremental": {
                "n_labelled": 30,
                "gate": {"promote": True, "reason": "macro-F1 0.61 vs 0.50"},
                "evaluation": evaluation,
                "review": REVIEW,
            },
        },
        report="# Own report\n",
    )
    _version(
        own,
        OWN_V2,
        "2026-01-03T00:00:00+00:00",
        {
            "candidate_f1": 0.4,
            "current_f1": 0.61,
            "incremental": {
                "n_labelled": 45,
                "gate": {"promote": False, "reason": "<b>worse</b> by 0.21"},
            },
        },
    )
    (own.root / "current").write_text(OWN_V1 + "\n")
    (own.root / "history.jsonl").write_text(
        json.dumps({"at": 1767312000.0, "version": OWN_V1, "reason": "promotion"}) + "\n"
    )
    # Outside every version: no route may ever serve these ("..", "secret" as version names).
    for folder in (root / "secret", root, own.root):
        (folder / "evaluation").mkdir(parents=True, exist_ok=True)
        (folder / "evaluation" / "report.md").write_text("TOP SECRET")
        (folder / "evaluation" / "pr_curves.png").write_text("TOP SECRET")
    return root


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    config = '<View><Image name="image" value="$image"/></View>'
    ledger.set_label_config(PROJECT, config)
    ledger.set_label_config(COLD, config)
    now = time.time()
    rejected = ledger.create_job(PROJECT, "fast", "auto")
    ledger.update_job(
        rejected.id,
        state="rejected",
        started_at=now - 60,
        finished_at=now - 55,
        candidate_version=OWN_V2,
        metrics={"candidate_f1": 0.4, "current_f1": 0.61, "gate": {"reason": "<b>worse</b>"}},
    )
    failed = ledger.create_job(PROJECT, "full", "start_training")
    ledger.update_job(
        failed.id, state="failed", started_at=now - 50, finished_at=now - 40, error=EVIL_ERROR
    )
    running = ledger.create_job(COLD, "fast", "auto")
    ledger.update_job(running.id, state="running", started_at=now - 3, progress="fitting the head")
    try:
        yield ledger
    finally:
        ledger.close()


def _client(model_dir: Path, ledger: Ledger | None, **env: str) -> TestClient:
    settings = settings_from({"model_dir": model_dir}, env)
    app = create_app(settings, ProjectModels(model_dir), ledger=ledger)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(model_dir: Path, ledger: Ledger) -> Iterator[TestClient]:
    with _client(model_dir, ledger) as c:
        yield c


def _page_data(text: str) -> dict:
    found = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', text)
    assert found, "the page carries no data for its charts"
    return json.loads(found.group(1))


def test_overview_lists_every_project(client: TestClient) -> None:
    reply = client.get("/ui")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in reply.headers["content-security-policy"]
    text = reply.text
    assert f'href="/ui/projects/{PROJECT}"' in text and f'href="/ui/projects/{COLD}"' in text
    assert OWN_V1 in text and BASE_V in text
    assert "fitting the head" in text and "ETA unknown" in text  # the running job, no history
    assert f'href="/ui/base/versions/{BASE_V}/report"' in text
    assert _page_data(text)["watch"]["url"] == "/status"


def test_project_page_shows_versions_evaluation_jobs_and_history(client: TestClient) -> None:
    reply = client.get(f"/ui/projects/{PROJECT}")
    assert reply.status_code == 200
    text = reply.text
    assert f'<code id="served-version">{OWN_V1}</code>' in text
    assert 'id="chart-f1"' in text and 'id="chart-labels"' in text and 'id="chart-pr"' in text
    assert "rejected</span>" in text and "&lt;b&gt;worse&lt;/b&gt; by 0.21" in text
    assert f'href="/ui/projects/{PROJECT}/versions/{OWN_V1}/report"' in text
    assert f"/ui/projects/{PROJECT}/versions/{OWN_V2}/report" not in text  # it has none
    assert "0.610" in text and "held-out annotations" in text  # the served version's table
    assert "state-failed" in text and "state-rejected" in text
    assert "2026-01-02 00:00:00 UTC" in text  # the history's promotion
    data = _page_data(text)
    assert [(v["version"], v["promoted"], v["n_labelled"]) for v in data["versions"]] == [
        (OWN_V1, True, 30),
        (OWN_V2, False, 45),
    ]
    assert data["versions"][0]["t"] == 1767312000.0
    assert data["pr_curves"]["bolt"]["precision"] == [0.4, 0.8, 1.0]
    assert data["watch"]["initial"]["version"] == OWN_V1


def test_a_project_on_the_base_model_shows_its_offline_curves_image(client: TestClient) -> None:
    text = client.get(f"/ui/projects/{COLD}").text
    assert f'<img src="/ui/base/versions/{BASE_V}/pr_curves.png"' in text
    assert "offline test split" in text and "state-running" in text
    image = client.get(f"/ui/base/versions/{BASE_V}/pr_curves.png")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == PNG


def test_every_value_is_escaped(client: TestClient) -> None:
    for path in ("/ui", f"/ui/projects/{PROJECT}", f"/ui/projects/{COLD}"):
        text = client.get(path).text
        assert "<script>alert" not in text and "<img src=x" not in text and "<b>" not in text
    text = client.get(f"/ui/projects/{PROJECT}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # the class, in its table row
    assert "&lt;img src=x onerror=alert(2)&gt;" in text  # the failed job's error
    # In the JSON for the charts, "<" is \u003c: nothing there can close the script element.
    raw = re.search(r'id="page-data">(.*?)</script>', text, re.S)
    assert raw and "<" not in raw.group(1)


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/ui/projects/999", "unknown here"),
        ("/ui/projects/0", "not a project id"),
        ("/ui/projects/-3", "not a project id"),
        ("/ui/projects/abc", "not a project id"),
        ("/ui/projects/1e3", "not a project id"),
        ("/ui/projects/99999999999999999999999", "not a project id"),
    ],
)
def test_unknown_or_invalid_projects_get_a_404_page(client: TestClient, path, says) -> None:
    reply = client.get(path)
    assert reply.status_code == 404 and reply.headers["content-type"].startswith("text/html")
    assert says in reply.text and 'href="/ui"' in reply.text


def test_reports_of_listed_versions_only(client: TestClient) -> None:
    base = client.get(f"/ui/base/versions/{BASE_V}/report")
    assert base.status_code == 200 and base.text == "# Base report\n"
    assert base.headers["content-type"].startswith("text/plain")
    own = client.get(f"/ui/projects/{PROJECT}/versions/{OWN_V1}/report")
    assert own.status_code == 200 and own.text == "# Own report\n"
    refused = [
        f"/ui/projects/{PROJECT}/versions/{OWN_V2}/report",  # listed, without a report
        f"/ui/projects/{PROJECT}/versions/{BASE_V}/report",  # the base's, not the project's
        f"/ui/base/versions/{OWN_V1}/report",
        f"/ui/projects/{COLD}/versions/{OWN_V1}/report",
        f"/ui/projects/0/versions/{OWN_V1}/report",
        "/ui/base/versions/../secret/report",
        "/ui/base/versions/..%2Fsecret/report",
        "/ui/base/versions/%2e%2e%2fsecret/report",
        "/ui/base/versions/..%2F..%2Fmodel%2Fsecret/report",
        "/ui/base/versions/secret/report",
        "/ui/base/versions/%2e%2e/report",
        "/ui/base/versions/%2e%2e/pr_curves.png",
        f"/ui/projects/{PROJECT}/versions/%2e%2e/report",
        f"/ui/projects/{PROJECT}/versions/%2E%2E/pr_curves.png",
        f"/ui/projects/{PROJECT}/versions/{OWN_V1}%2F..%2F..%2F..%2F..%2Fsecret/report",
        f"/ui/projects/{PROJECT}/versions/{OWN_V2}/pr_curves.png",
        "/ui/base/versions/..%2Fsecret/pr_curves.png",
    ]
    for path in refused:
        reply = client.get(path)
        assert reply.status_code == 404, path
        assert "TOP SECRET" not in reply.text, path


def test_static_files_are_a_fixed_list(client: TestClient) -> None:
    script = client.get("/ui/static/uplot/uPlot.iife.min.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "uPlot" in script.text
    assert client.get("/ui/static/page.css").status_code == 200
    for path in ("/ui/static/uplot/LICENSE", "/ui/static/../page.py", "/ui/static/%2e%2e/page.py"):
        assert client.get(path).status_code == 404, path


def test_basic_auth_guards_the_page(model_dir: Path, ledger: Ledger) -> None:
    with _client(model_dir, ledger, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret") as c:
        paths = [
            "/ui",
            f"/ui/projects/{PROJECT}",
            f"/ui/projects/{PROJECT}/versions/{OWN_V1}/report",
            f"/ui/base/versions/{BASE_V}/report",
            f"/ui/base/versions/{BASE_V}/pr_curves.png",
            "/ui/static/page.js",
        ]
        good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
        bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
        for path in paths:
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=bad).status_code == 401, path
            assert c.get(path, headers=good).status_code == 200, path


def test_without_a_ledger_the_overview_says_so(model_dir: Path) -> None:
    with _client(model_dir, None) as c:
        reply = c.get("/ui")
        assert reply.status_code == 200
        assert "without an annotation ledger" in reply.text and BASE_V in reply.text
        assert c.get(f"/ui/projects/{PROJECT}").status_code == 404
        # The JSON health check Label Studio calls stays where it was.
        assert c.get("/").headers["content-type"] == "application/json"


def _review_rows(text: str) -> list[str]:
    found = re.search(r'<div id="review-flags">(.*?)</div>', text, re.S)
    assert found, "the page has no review table"
    return re.findall(r"<tr>(.*?)</tr>", found.group(1), re.S)[1:]  # the header row left out


def test_the_project_page_lists_the_labels_to_recheck(model_dir: Path, ledger: Ledger) -> None:
    with _client(model_dir, ledger, LABEL_STUDIO_URL="http://ls.example:8080") as client:
        text = client.get(f"/ui/projects/{PROJECT}").text
        status = client.get(f"/status/projects/{PROJECT}").json()
    assert status["review"] == {"version": OWN_V1, **REVIEW}
    assert "Labels to re-check" in text and "<strong>12</strong> suspect labels" in text
    first, second = _review_rows(text)
    # Most suspect first, each task a link into Label Studio's Data Manager, values escaped.
    assert '<a href="http://ls.example:8080/projects/5/data?task=31"' in first
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in first and "present" in first
    assert "0.020" in first
    assert "?task=7" in second and "absent" in second and "0.910" in second
    assert f"labelloop review --project {PROJECT}" in text


def test_without_a_review_the_page_says_where_the_list_comes_from(
    model_dir: Path, ledger: Ledger
) -> None:
    # No Label Studio URL known: task ids without links. COLD is served the base model, whose
    # offline version has no review.
    with _client(model_dir, ledger) as client:
        own = client.get(f"/ui/projects/{PROJECT}").text
        cold = client.get(f"/ui/projects/{COLD}").text
        assert client.get(f"/status/projects/{COLD}").json()["review"] is None
    assert "<a href" not in "".join(_review_rows(own))
    assert 'id="review-flags"' not in cold
    assert "Each fast update lists the annotations its model disagrees with" in cold
