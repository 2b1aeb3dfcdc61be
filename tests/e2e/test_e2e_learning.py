"""The loop learns: annotations made in a real Label Studio make the served model agree better
with 200 held-out tasks (never annotated) than the first model did, by more than the noise of
those tasks (a paired bootstrap over them). Once from an empty model folder (the default cold-start
backbone), once from a weak starter model. Each test builds its own dataset, project and
backend, so neither depends on task ids or on other tests."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import result_for
from servers import wait_until

from labelloop.dev.demo import DemoDataset, generate_demo_dataset
from labelloop.labelstudio.label_config import parse_label_config

pytestmark = pytest.mark.e2e

N_HELDOUT = 200  # 100 left a bootstrap band (~0.06) wider than a weak run's gain
N_ANNOTATED = 150
FIRST_BATCH = 20


def settled(backend, n_changes: int) -> bool:
    """Every annotation recorded, a finished job trained on all of them (each annotation made
    here is one change of the ledger), and nothing queued or running."""
    training = backend.get("/status")["training"]
    trained = [
        j["trained_seq"] or 0
        for j in training["jobs"]
        if j["state"] in ("succeeded", "rejected", "skipped")
    ]
    return (
        training["ledger"]["live"] >= n_changes
        and max(trained, default=0) >= n_changes
        and training["running"] is None
        and not any(j["state"] == "queued" for j in training["jobs"])
    )


class Project:
    """A Label Studio project of `dataset`'s images, connected to `backend`."""

    def __init__(self, label_studio, backend, dataset: DemoDataset, title: str) -> None:
        _, self.client = label_studio
        self.backend = backend
        self.config = dataset.label_config.read_text()
        self.id = self.client.create_project(title, self.config)["id"]
        images = sorted(dataset.images_dir.glob("*.png"))
        self.tasks = self.client.import_files(self.id, images)
        labels = dataset.labels()
        self.truth = {t: labels[image.name] for t, image in zip(self.tasks, images, strict=True)}
        self.client.connect_ml_backend(self.id, backend.url, title=title)
        self.heldout = self.tasks[-N_HELDOUT:]
        self.pool = self.tasks[:-N_HELDOUT]
        controls = parse_label_config(self.config).controls
        self.classes = [c for control in controls for c in control.choices]
        self.annotated = 0

    def annotate(self, n: int) -> None:
        for task in self.pool[self.annotated : self.annotated + n]:
            self.client.create_annotation(task, result_for(self.truth[task]))
        self.annotated += n
        wait_until(
            lambda: settled(self.backend, self.annotated),
            timeout_s=900,
            what=f"training on {self.annotated} annotations to settle",
            interval_s=1.0,
        )

    def heldout_predictions(self) -> tuple[str, np.ndarray]:
        """The served model's answer for every held-out task, through /predict as Label Studio
        asks it; one version for all."""
        tasks = [{"id": t, "data": self.client.get_task(t)["data"]} for t in self.heldout]
        reply = httpx.post(
            f"{self.backend.url}/predict",
            json={"tasks": tasks, "label_config": self.config, "project": f"{self.id}.0"},
            timeout=300,
        )
        reply.raise_for_status()
        results = reply.json()["results"]
        versions = {r["model_version"] for r in results}
        assert len(versions) == 1, versions
        chosen = [{c for item in r["result"] for c in item["value"]["choices"]} for r in results]
        pred = np.array([[c in names for c in self.classes] for names in chosen])
        return versions.pop(), pred

    def print_jobs(self) -> None:
        """The trainer's jobs, printed so that a failed assertion shows what the loop did."""
        for j in self.backend.get("/status")["training"]["jobs"]:
            gate = {k: j["metrics"].get(k) for k in ("candidate_f1", "current_f1", "n_items")}
            print(j["id"], j["kind"], j["state"], j["trained_seq"], j["promoted_version"], gate)

    def heldout_truth(self) -> np.ndarray:
        return np.array(
            [[c in sum(self.truth[t].values(), []) for c in self.classes] for t in self.heldout]
        )


def macro_f1(y: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro-F1 over the classes present in `y`, for each bootstrap weighting (B, n)."""
    present = y.sum(axis=0) > 0
    y, pred = y[:, present].astype(float), pred[:, present].astype(float)
    tp, fp, fn = weights @ (y * pred), weights @ ((1 - y) * pred), weights @ (y * (1 - pred))
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=1)


def assert_learned(y: np.ndarray, first: np.ndarray, final: np.ndarray) -> None:
    """Final beats first on the held-out tasks, beyond the 5th percentile of a paired bootstrap
    over those tasks (the noise of judging on that many tasks)."""
    n = len(y)
    rng = np.random.default_rng(0)
    weights = rng.multinomial(n, np.full(n, 1 / n), size=2000).astype(float)
    diffs = macro_f1(y, final, weights) - macro_f1(y, first, weights)
    point = float(macro_f1(y, final, np.ones((1, n)))[0] - macro_f1(y, first, np.ones((1, n)))[0])
    low = float(np.percentile(diffs, 5))
    print(f"held-out macro-F1 difference {point:+.3f}, 5th percentile {low:+.3f}")
    assert low > 0, f"no learning beyond noise: difference {point:+.3f}, 5th percentile {low:+.3f}"


def test_from_an_empty_model_folder_the_default_backbone_learns(
    label_studio, backend_factory, tmp_path: Path
) -> None:
    dataset = generate_demo_dataset(tmp_path / "data", n=N_ANNOTATED + N_HELDOUT, seed=11, size=64)
    backend = backend_factory(
        empty=True,
        args=("--auto-train-after", "10", "--quiet-seconds", "2", "--no-auto-full"),
    )
    assert backend.health()["model_version"] == "untrained"
    project = Project(label_studio, backend, dataset, "e2e learning from cold")
    project.annotate(FIRST_BATCH)
    first_version, first = project.heldout_predictions()
    assert first_version != "untrained"  # the cold start made a first model
    assert backend.get(f"/versions?project={project.id}")["current"] == first_version

    project.annotate(N_ANNOTATED - FIRST_BATCH)
    final_version, final = project.heldout_predictions()
    project.print_jobs()
    assert final_version != first_version
    assert_learned(project.heldout_truth(), first, final)


def test_from_a_weak_starter_model_annotations_make_it_better(
    label_studio, backend_factory, tmp_path: Path
) -> None:
    # The session's starter: ResNet18 at 32 px, random init, 2 epochs on 120 other images.
    dataset = generate_demo_dataset(tmp_path / "data", n=N_ANNOTATED + N_HELDOUT, seed=21, size=48)
    backend = backend_factory(args=("--auto-train-after", "10", "--quiet-seconds", "2"))
    project = Project(label_studio, backend, dataset, "e2e learning from a starter")
    first_version, first = project.heldout_predictions()

    project.annotate(N_ANNOTATED)
    final_version, final = project.heldout_predictions()
    project.print_jobs()
    assert final_version != first_version
    assert_learned(project.heldout_truth(), first, final)
