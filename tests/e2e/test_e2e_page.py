"""The project page in a real headless Chromium, against `labelloop serve` as a process.

No Label Studio: the test speaks its protocol to the backend (/setup, then ANNOTATIONS_CREATED
webhooks with demo images under the document root), and each batch of 30 annotations starts a
fast update that --tolerance 1.0 always promotes. The page is opened before any version of the
project exists and must follow both promotions by reloading itself, then show the version, the
charts drawn, the per-class, labels-to-re-check and job tables, without a console error, at
1280x800.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from browser import chromium, ensure_chromium, severe_console_entries
from helpers import result_for, wait_until
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from servers import BackendProcess

from labelloop.dev.demo import LABEL_GROUPS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "img" / "project-page.png"
PROJECT = 41
AUTH = ("ls", "page-s3cret")
BATCH = 30

# Count the chart's coloured pixels: grid, axes and text are grey or black, only the series
# (green and red dots, the coloured PR curves) are saturated.
COLOURED_PIXELS = """
const canvas = document.querySelector(arguments[0] + " canvas");
if (!canvas) { return -1; }
const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let n = 0;
for (let i = 0; i < px.length; i += 4) {
  const hi = Math.max(px[i], px[i + 1], px[i + 2]), lo = Math.min(px[i], px[i + 1], px[i + 2]);
  if (px[i + 3] > 0 && hi - lo > 60) { n++; }
}
return n;
"""


@pytest.fixture(scope="session")
def browser_installed() -> None:
    try:
        ensure_chromium()
    except RuntimeError as exc:
        pytest.fail(str(exc))


def _annotations(demo_dataset, start: int) -> tuple[list[dict], list[dict]]:
    labels = demo_dataset.labels()
    names = sorted(labels)[start : start + BATCH]
    annotations = [
        {
            "id": 1000 + start + i,
            "task": 1 + start + i,
            "result": result_for(labels[name]),
            "was_cancelled": False,
            "ground_truth": False,
            "completed_by": 1,
            "updated_at": "2026-11-25T00:00:00Z",
        }
        for i, name in enumerate(names)
    ]
    tasks = [
        {"id": 1 + start + i, "data": {"image": f"/data/local-files/?d=images/{name}"}}
        for i, name in enumerate(names)
    ]
    return annotations, tasks


def _succeeded(status: dict) -> list[dict]:
    return [j for j in status["jobs"] if j["state"] == "succeeded"]


def test_the_project_page_follows_the_loop(
    browser_installed, trained_model, demo_dataset, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model[0], model_dir)
    base_version = trained_model[1].version
    config = demo_dataset.label_config.read_text()
    backend = BackendProcess(
        model_dir,
        tmp_path / "backend.log",
        env={
            "LABEL_STUDIO_URL": "http://127.0.0.1:9",  # never contacted: images are local files
            "LABEL_STUDIO_API_KEY": "0" * 40,
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(demo_dataset.root),
            "LOG_LEVEL": "INFO",
        },
        basic_auth=AUTH,
        args=(
            "--auto-train-after",
            "10",
            "--quiet-seconds",
            "1",
            "--no-auto-full",
            "--tolerance",
            "1.0",
            "--no-refresh",
            "--no-rename-backend",
        ),
    )
    status_path = f"/status/projects/{PROJECT}"
    try:
        with httpx.Client(base_url=backend.url, auth=AUTH, timeout=30) as api:
            assert httpx.get(f"{backend.url}/ui", timeout=10).status_code == 401
            setup = api.post("/setup", json={"project": f"{PROJECT}.1", "schema": config})
            assert setup.status_code == 200, setup.text

            with chromium(auth=AUTH) as driver:
                driver.get(f"{backend.url}/ui/projects/{PROJECT}")
                served = driver.find_element(By.ID, "served-version")
                assert served.text == base_version
                assert "No version trained for this project yet" in driver.page_source

                def post_batch(start: int) -> None:
                    annotations, tasks = _annotations(demo_dataset, start)
                    body = {
                        "action": "ANNOTATIONS_CREATED",
                        "project": {"id": PROJECT, "label_config": config},
                        "annotation": annotations,
                        "task": tasks,
                    }
                    assert api.post("/webhook", json=body).json()["recorded"] == BATCH

                post_batch(0)
                first = wait_until(
                    lambda: (s := api.get(status_path).json())["own_lineage"] and s["version"],
                    timeout_s=240,
                    what="the first fast update to be promoted",
                )
                post_batch(BATCH)
                second = wait_until(
                    lambda: (
                        len(_succeeded(s := api.get(status_path).json())) >= 2
                        and s["version"] != first
                        and s["trainer"]["state"] == "idle"
                        and s["version"]
                    ),
                    timeout_s=240,
                    what="the second fast update to be promoted",
                )

                def page_shows_second() -> bool:
                    # The test never reloads: the page's own polling must have done it.
                    try:
                        jobs = driver.find_elements(By.XPATH, "//td/span[text()='succeeded']")
                        shown = driver.find_element(By.ID, "served-version").text
                    except (NoSuchElementException, StaleElementReferenceException):
                        return False
                    return shown == second and len(jobs) >= 2

                wait_until(page_shows_second, timeout_s=60, what="the page to reload itself")
                wait_until(
                    lambda: driver.execute_script("return document.readyState") == "complete",
                    timeout_s=30,
                    what="the reloaded page to finish loading",
                )

                assert driver.title == f"Project {PROJECT} · labelloop"
                for chart in ("#chart-f1", "#chart-labels", "#chart-pr"):
                    assert driver.execute_script(COLOURED_PIXELS, chart) > 30, chart
                per_class = driver.find_element(
                    By.XPATH, "//table[thead/tr/th[text()='Class']]"
                ).text
                for name in (c for classes in LABEL_GROUPS.values() for c in classes):
                    assert name in per_class
                job_rows = driver.find_elements(
                    By.XPATH, "//table[thead/tr/th[text()='Trigger']]/tbody/tr"
                )
                assert sum("succeeded" in row.text and "fast" in row.text for row in job_rows) == 2
                # The labels to re-check of the served version: the rows /status has, in its
                # order, each task a link into Label Studio's Data Manager.
                review = api.get(status_path).json()["review"]
                assert review["version"] == second and review["n_judged"] == 2 * BATCH
                rows = driver.find_elements(By.CSS_SELECTOR, "#review-flags tbody tr")
                assert len(rows) == len(review["flags"]) > 0
                for row, flag in zip(rows, review["flags"], strict=True):
                    link = row.find_element(By.TAG_NAME, "a")
                    assert link.text == str(flag["task_id"]) and flag["label"] in row.text
                    assert link.get_attribute("href") == (
                        f"http://127.0.0.1:9/projects/{PROJECT}/data?task={flag['task_id']}"
                    )
                assert driver.execute_script("return document.documentElement.scrollWidth") <= 1280
                driver.save_screenshot(str(tmp_path / "project-page.png"))
                project_errors = severe_console_entries(driver)

                driver.get(f"{backend.url}/ui")
                row = driver.find_element(
                    By.XPATH, f"//tr[td/a[@href='/ui/projects/{PROJECT}']]"
                ).text
                assert second in row and "idle" in row
                driver.save_screenshot(str(tmp_path / "overview.png"))
                overview_errors = severe_console_entries(driver)
    finally:
        backend.stop()

    assert project_errors == [] and overview_errors == []
    if os.environ.get("LABELLOOP_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "project-page.png", SCREENSHOT)
