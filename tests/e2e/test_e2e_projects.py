"""One backend, two real Label Studio projects with different label configs: each project has
its own model lineage, and nothing one does reaches the other's model, predictions or files.

Project A uses the demo config, whose classes the backend's base model knows: its lineage starts
from the base. Project B names its controls and choices differently: it shares no class with the
base and starts cold. The gate tolerance is 1.0 here (every candidate is promoted): this test is
about isolation; whether the loop learns is test_e2e_learning's question.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import result_for
from servers import wait_until

from labelloop.dev.demo import generate_demo_dataset
from labelloop.labelstudio.label_config import parse_label_config

pytestmark = pytest.mark.e2e

N_TASKS = 60
RENAMED = {"components": "parts", "defects": "faults"}


def renamed_config(config: str, classes: list[str]) -> str:
    """The demo config with other control names and other choice names ("p_<class>")."""
    for old, new in RENAMED.items():
        config = config.replace(f'name="{old}"', f'name="{new}"')
    for name in classes:
        config = config.replace(f'value="{name}"', f'value="p_{name}"')
    return config


def lineage_files(model_dir: Path, project_id: int) -> dict[str, str]:
    """Every file of a project's lineage and its checksum (empty when it has none)."""
    root = model_dir / "projects" / str(project_id)
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Project:
    def __init__(self, label_studio, backend, images, labels, config: str, title: str) -> None:
        _, self.client = label_studio
        self.backend = backend
        self.config = config
        self.id = self.client.create_project(title, config)["id"]
        self.tasks = self.client.import_files(self.id, images)
        self.labels = dict(zip(self.tasks, labels, strict=True))
        self.ml = self.client.connect_ml_backend(self.id, backend.url, title=title)
        self.controls = {c.name: set(c.choices) for c in parse_label_config(config).controls}
        self.annotated = 0

    def annotate(self, n: int) -> None:
        for task in self.tasks[self.annotated : self.annotated + n]:
            self.client.create_annotation(task, result_for(self.labels[task]))
        self.annotated += n

    def jobs(self) -> list[dict]:
        return [
            j for j in self.backend.get("/status")["training"]["jobs"] if j["project_id"] == self.id
        ]

    def settled(self) -> bool:
        """A finished job trained on every annotation made, nothing of it queued or running."""
        jobs = self.jobs()
        trained = [j["trained_seq"] or 0 for j in jobs if j["state"] not in ("queued", "running")]
        return max(trained, default=0) >= self.annotated and not any(
            j["state"] in ("queued", "running") for j in jobs
        )

    def wait_settled(self) -> None:
        wait_until(self.settled, timeout_s=600, what=f"project {self.id} to settle", interval_s=1)

    def current(self) -> str | None:
        return self.backend.get(f"/versions?project={self.id}")["current"]

    def predict(self) -> tuple[set[str], list[dict]]:
        """The versions and the results /predict gives for the project's last 5 tasks."""
        tasks = [{"id": t, "data": self.client.get_task(t)["data"]} for t in self.tasks[-5:]]
        reply = httpx.post(
            f"{self.backend.url}/predict",
            json={"tasks": tasks, "label_config": self.config, "project": f"{self.id}.0"},
            timeout=120,
        )
        reply.raise_for_status()
        results = [r for r in reply.json()["results"] if r]
        return {r["model_version"] for r in results}, results

    def assert_valid(self, results: list[dict]) -> None:
        """Every result names one of this project's controls and only its choices."""
        assert results
        for result in results:
            for item in result["result"]:
                assert item["from_name"] in self.controls, item
                assert set(item["value"]["choices"]) <= self.controls[item["from_name"]], item

    def stored_versions(self) -> set[str]:
        """The model versions of the predictions Label Studio stores for the project."""
        return {p["model_version"] for p in self.client.predictions(project_id=self.id)}


def rollback(backend, project_id: int, version: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "labelloop",
            "rollback",
            version,
            "--project",
            str(project_id),
            "--model-dir",
            str(backend.model_dir),
        ],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_two_projects_have_their_own_lineages(label_studio, backend_factory, tmp_path) -> None:
    dataset = generate_demo_dataset(tmp_path / "data", n=N_TASKS, seed=5, size=64)
    images = sorted(dataset.images_dir.glob("*.png"))
    truth = dataset.labels()
    config_a = dataset.label_config.read_text()
    classes = [c for control in parse_label_config(config_a).controls for c in control.choices]
    backend = backend_factory(
        args=(
            "--auto-train-after",
            "10",
            "--quiet-seconds",
            "2",
            "--no-auto-full",
            "--tolerance",
            "1.0",
        )
    )
    base = backend.health()["model_version"]
    a = Project(
        label_studio, backend, images, [truth[i.name] for i in images], config_a, "e2e project A"
    )
    b = Project(
        label_studio,
        backend,
        images,
        [
            {RENAMED[g]: [f"p_{c}" for c in names] for g, names in truth[i.name].items()}
            for i in images
        ],
        renamed_config(config_a, classes),
        "e2e project B",
    )
    # A's entry is named after the version it is served from the first connect on.
    wait_until(
        lambda: a.client.get_ml_backend(a.ml["id"])["title"] == base,
        timeout_s=60,
        what="A's backend entry to be named after the base model",
    )
    # A is served the base model; B shares no class with it: no prediction until it learns.
    assert a.predict()[0] == {base}
    assert b.predict() == (set(), [])

    # B learns from its own annotations, from cold; A's model, predictions and files stay.
    b.annotate(30)
    b.wait_settled()
    b_first = b.current()
    assert b_first is not None
    versions, results = b.predict()
    assert versions == {b_first}
    b.assert_valid(results)
    assert a.predict()[0] == {base} and a.current() is None
    assert lineage_files(backend.model_dir, a.id) == {}
    # The refresh after B's promotion pushed B's version to B only, and renamed B's entry.
    wait_until(lambda: b_first in b.stored_versions(), timeout_s=120, what="B's refresh")
    b_lineage = set(backend.get(f"/versions?project={b.id}")["versions"])
    assert b.stored_versions() <= b_lineage
    assert not a.stored_versions() & b_lineage
    wait_until(
        lambda: b.client.get_ml_backend(b.ml["id"])["title"] == b_first,
        timeout_s=60,
        what="B's backend entry to be renamed",
    )

    # A learns twice; B's files and version are untouched meanwhile.
    b_files = lineage_files(backend.model_dir, b.id)
    a.annotate(20)
    a.wait_settled()
    a_first = a.current()
    a.annotate(10)
    a.wait_settled()
    a_second = a.current()
    assert a_first and a_second and a_second != a_first
    versions, results = a.predict()
    assert versions == {a_second}
    a.assert_valid(results)
    assert lineage_files(backend.model_dir, b.id) == b_files
    assert b.predict()[0] == {b_first}

    # A rollback in A: served from the next request, A's entry renamed; B left alone.
    assert "current -> " in rollback(backend, a.id, a_first)
    assert a.predict()[0] == {a_first}
    wait_until(
        lambda: a.client.get_ml_backend(a.ml["id"])["title"] == a_first,
        timeout_s=60,
        what="A's backend entry to follow the rollback",
    )
    assert b.predict()[0] == {b_first}
    assert lineage_files(backend.model_dir, b.id) == b_files

    # A restart keeps everything.
    backend.restart()
    assert a.predict()[0] == {a_first}
    versions, results = b.predict()
    assert versions == {b_first}
    b.assert_valid(results)
    assert backend.health()["model_version"] == base
