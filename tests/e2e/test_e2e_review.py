"""Label review end to end: annotations made in a real Label Studio, some of them wrong on
purpose, reach the backend as webhooks; `labelloop review` flags the wrong ones and pushes them
back to Label Studio as review predictions that reviewers can filter for."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import httpx
import pytest
from helpers import result_for
from servers import wait_until

from labelloop.dev.demo import COMPONENTS, generate_demo_dataset

pytestmark = pytest.mark.e2e

N_TASKS = 100
N_FLIPPED = 10  # 10 % of the tasks get one wrong component
TOP = 20


@pytest.fixture(scope="module")
def world(label_studio, backend_factory, tmp_path_factory):
    server, client = label_studio
    demo_dataset = generate_demo_dataset(
        tmp_path_factory.mktemp("review-data"), n=N_TASKS, seed=5, size=64
    )
    # From an empty model folder: the project's first model is the cold start's pretrained
    # backbone (the session's starter is random-init, its features say nothing), trained once
    # all the annotations are in; no refresh, no full update.
    backend = backend_factory(
        empty=True,
        args=(
            "--auto-train-after",
            str(N_TASKS),
            "--quiet-seconds",
            "86400",
            "--no-auto-full",
            "--no-refresh",
        ),
    )
    config = demo_dataset.label_config.read_text()
    pid = client.create_project("e2e review", config)["id"]
    images = sorted(demo_dataset.images_dir.glob("*.png"))
    task_ids = client.import_files(pid, images)
    client.connect_ml_backend(pid, backend.url, title="labelloop-review")
    truth = demo_dataset.labels()
    rng = random.Random(7)
    flipped: dict[int, str] = {}
    for task_id in rng.sample(task_ids, N_FLIPPED):
        flipped[task_id] = rng.choice(COMPONENTS)
    annotations: dict[int, dict[str, list[str]]] = {}
    for task_id, image in zip(task_ids, images, strict=True):
        labels = {group: list(names) for group, names in truth[image.name].items()}
        if task_id in flipped:
            label = flipped[task_id]
            present = label in labels["components"]
            labels["components"] = [
                c for c in COMPONENTS if (c in labels["components"]) != (c == label)
            ]
            assert (label in labels["components"]) is not present
        annotations[task_id] = labels
        client.create_annotation(task_id, result_for(labels))
    wait_until(
        lambda: backend.get("/status")["training"]["ledger"]["live"] >= N_TASKS,
        timeout_s=60,
        what="webhooks for every annotation",
    )
    wait_until(
        lambda: backend.get(f"/versions?project={pid}")["current"],
        timeout_s=600,
        what="the project's first model",
        interval_s=1.0,
    )
    return {
        "server": server,
        "client": client,
        "backend": backend,
        "project": pid,
        "flipped": flipped,
        "annotations": annotations,
    }


def review(
    world, *args: str, credentials: bool = True, returncode: int = 0
) -> subprocess.CompletedProcess:
    """`labelloop review` of the module's project as a real command: JSON, the top TOP."""
    server = world["server"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    if credentials:
        env.update(
            LABEL_STUDIO_URL=server.settings.url,
            LABEL_STUDIO_API_KEY=server.settings.token,
            LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(server.settings.document_root),
        )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "labelloop",
            "review",
            "--project",
            str(world["project"]),
            "--model-dir",
            str(world["backend"].model_dir),
            "--top",
            str(TOP),
            "--format",
            "json",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == returncode, done.stdout + done.stderr
    return done


def is_flipped(world, flag: dict) -> bool:
    return world["flipped"].get(flag["task_id"]) == flag["label"]


def test_review_flags_the_wrong_labels_far_more_often_than_the_right_ones(world) -> None:
    flags = json.loads(review(world, "--top", "1000").stdout)
    for flag in flags:  # each flag is an annotation as made in Label Studio
        annotated = world["annotations"][flag["task_id"]][flag["control"]]
        assert (flag["label"] in annotated) is flag["annotated"]
    entries = N_TASKS * 9  # (task, label) pairs: 5 components + 4 defects
    wrong = [f for f in flags if is_flipped(world, f)]
    wrong_rate = len(wrong) / N_FLIPPED
    right_rate = (len(flags) - len(wrong)) / (entries - N_FLIPPED)
    print(f"flagged: {wrong_rate:.0%} of the wrong labels, {right_rate:.0%} of the right ones")
    assert wrong_rate >= 0.4 and wrong_rate >= 2.5 * right_rate, (wrong_rate, right_rate)
    # And ranked ahead: by chance, 20 of the 900 entries would hold 0.2 of the 10 wrong ones
    # (two or more: 2 % of the time).
    first = [f for f in flags[:TOP] if is_flipped(world, f)]
    assert len(first) >= 2, [f for f in flags if is_flipped(world, f)]


def test_review_pushes_the_flagged_tasks_for_reviewers(world) -> None:
    client, pid = world["client"], world["project"]
    done = review(world, "--push")
    flags = json.loads(done.stdout)  # stdout is the list alone, the push reports on stderr
    assert 0 < len(flags) <= TOP

    version = world["backend"].get(f"/versions?project={pid}")["served"]
    assert version.startswith("v")
    assert f"as model version review-{version}" in done.stderr
    pushed = [
        p for p in client.predictions(project_id=pid) if p["model_version"].startswith("review-")
    ]
    assert {p["model_version"] for p in pushed} == {f"review-{version}"}
    flagged_tasks = {f["task_id"] for f in flags}
    assert sorted(p["task"] for p in pushed) == sorted(flagged_tasks)  # one per flagged task
    for prediction in pushed:
        task_flags = [f for f in flags if f["task_id"] == prediction["task"]]
        proposed = {
            item["from_name"]: set(item["value"]["choices"]) for item in prediction["result"]
        }
        for flag in task_flags:
            # The proposal turns the flagged label over; the flag travels with it.
            assert (flag["label"] in proposed.get(flag["control"], set())) is not flag["annotated"]
        assert prediction["score"] == pytest.approx(
            1 - max(f["score"] for f in task_flags), abs=1e-4
        )

    # Reviewers find them with the Data Manager's filter on the predictions' model version.
    server = world["server"]
    query = {
        "filters": {
            "conjunction": "and",
            "items": [
                {
                    "filter": "filter:tasks:predictions_model_versions",
                    "operator": "contains",
                    "type": "List",
                    "value": f"review-{version}",
                }
            ],
        }
    }
    reply = httpx.get(
        f"{server.settings.url}/api/tasks/",
        params={"project": pid, "page_size": 1000, "query": json.dumps(query)},
        headers={"Authorization": f"Token {server.settings.token}"},
        timeout=60,
    )
    reply.raise_for_status()
    assert {t["id"] for t in reply.json()["tasks"]} == flagged_tasks

    # Again: the earlier review predictions are replaced, not added to.
    review(world, "--push")
    again = [
        p for p in client.predictions(project_id=pid) if p["model_version"].startswith("review-")
    ]
    assert sorted(p["task"] for p in again) == sorted(flagged_tasks)
    assert not {p["id"] for p in pushed} & {p["id"] for p in again}


def test_review_push_without_label_studio_credentials_is_a_clear_error(world) -> None:
    done = review(world, "--push", credentials=False, returncode=2)
    assert "LABEL_STUDIO_URL" in done.stdout + done.stderr
