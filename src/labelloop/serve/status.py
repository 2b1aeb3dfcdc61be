"""What the backend knows about each project, as JSON-safe dicts: `/status`, the CLI and the
project page read these, so the three never disagree.

Everything here reads the ledger and the lineages' manifests; nothing loads a model.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from typing import Any

from labelloop.errors import StoreError
from labelloop.loop.jobs import JobState
from labelloop.loop.ledger import AnnotationLedger, Job
from labelloop.runtime.projects import ProjectModels
from labelloop.store import Manifest, ModelStore

logger = logging.getLogger(__name__)

_ENDED = frozenset({JobState.SUCCEEDED, JobState.REJECTED, JobState.SKIPPED, JobState.FAILED})


def job_summary(job: Job) -> dict[str, Any]:
    """A job as the page and `labelloop status` show it: kind, trigger, state, duration, the
    gate's numbers and the reason of a rejection or failure."""
    metrics = job.metrics or {}
    gate = metrics.get("gate") or {}
    duration = job.finished_at - job.started_at if job.finished_at and job.started_at else None
    return {
        "id": job.id,
        "project_id": job.project_id,
        "kind": str(job.kind),
        "trigger": job.trigger,
        "state": str(job.state),
        "requested_at": job.requested_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "duration_s": round(duration, 2) if duration is not None else None,
        "progress": job.progress,
        "error": job.error,
        "candidate_version": job.candidate_version,
        "promoted_version": job.promoted_version,
        "candidate_f1": metrics.get("candidate_f1"),
        "current_f1": metrics.get("current_f1"),
        "n_items": metrics.get("n_items"),
        "n_labelled": metrics.get("n_labelled"),
        "reason": gate.get("reason") or job.error,
    }


def trainer_state(jobs: list[Job]) -> dict[str, Any]:
    """idle, queued or running (with progress and an ETA from earlier jobs of the same kind)."""
    running = next((j for j in jobs if j.state == JobState.RUNNING), None)
    queued = [j for j in jobs if j.state == JobState.QUEUED]
    if running is None:
        return {"state": "queued" if queued else "idle", "queued": len(queued)}
    past = [
        j.finished_at - j.started_at
        for j in jobs
        if j.kind == running.kind and j.state in _ENDED and j.finished_at and j.started_at
    ]
    elapsed = time.time() - (running.started_at or time.time())
    eta = max(0.0, statistics.median(past) - elapsed) if past else None
    return {
        "state": "running",
        "queued": len(queued),
        "job": job_summary(running),
        "elapsed_s": round(elapsed, 1),
        "eta_s": round(eta, 1) if eta is not None else None,
    }


def _counts(ledger: AnnotationLedger, project_id: int) -> dict[str, int]:
    stats = ledger.stats(project_id)
    return {
        "labelled": stats["live"] - stats["cancelled"],
        "skipped": stats["cancelled"],
        "deleted": stats["deleted"],
        "training_tasks": stats["training_tasks"],
    }


def overview(
    ledger: AnnotationLedger, models: ProjectModels, *, task_counts: dict[int, int] | None = None
) -> dict[str, Any]:
    """Every project the backend knows: its served version, counts and trainer state.

    `task_counts` (project -> tasks in Label Studio), when known, gives unlabelled counts."""
    projects = sorted(set(ledger.projects()) | set(models.projects()))
    versions = models.versions()
    listed = []
    for project_id in projects:
        jobs = ledger.jobs(project_id=project_id, limit=50)
        counts = _counts(ledger, project_id)
        if task_counts and project_id in task_counts:
            counts["unlabelled"] = max(0, task_counts[project_id] - counts["labelled"])
        own = versions.get(str(project_id))
        listed.append(
            {
                "id": project_id,
                "version": own or versions.get("base"),
                "own_lineage": own is not None,
                "counts": counts,
                "trainer": trainer_state(jobs),
                "last_job": job_summary(jobs[0]) if jobs else None,
            }
        )
    return {"base_version": versions.get("base"), "projects": listed}


def _version_row(store: ModelStore, name: str, current: str | None) -> dict[str, Any]:
    manifest = store.manifest(name)
    metrics = manifest.metrics
    incremental = metrics.get("incremental") or {}
    gate = incremental.get("gate") or {}
    training = (manifest.training_config or {}).get("incremental") or {}
    return {
        "version": name,
        "created_at": manifest.created_at,
        "parent_version": manifest.parent_version,
        "kind": training.get("kind", "offline"),
        "trigger": training.get("trigger"),
        "promoted": gate.get("promote", True),
        "reason": gate.get("reason"),
        "candidate_f1": metrics.get("candidate_f1", gate.get("candidate_f1")),
        "current_f1": metrics.get("current_f1", gate.get("current_f1")),
        "n_labelled": incremental.get("n_labelled"),
        "test_f1_macro": (metrics.get("test") or {}).get("f1_macro"),
        "weights_pruned": manifest.weights_pruned,
        "current": name == current,
        "has_report": (store.versions_dir / name / "evaluation" / "report.md").is_file(),
    }


def evaluation_of(store: ModelStore, manifest: Manifest) -> dict[str, Any] | None:
    """Per-class precision, recall, F1 and support of a version of `store`, and its PR curves:
    from the gate's items for a version the loop trained, from the test split for an offline
    one."""
    version, metrics = manifest.version, manifest.metrics
    evaluation = (metrics.get("incremental") or {}).get("evaluation")
    if evaluation:
        return {"source": "held-out annotations and offline test images", **evaluation}
    folder = store.versions_dir / version / "evaluation"
    try:
        test = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        test = metrics.get("test")
    if not test:
        return None
    return {
        "source": "offline test split",
        "n_items": test.get("n_samples"),
        "f1_macro": test.get("f1_macro"),
        "per_class": test.get("per_class") or {},
        # The offline report draws its curves as an image (evaluation/pr_curves.png).
        "pr_curves": {},
        "pr_curves_png": (folder / "pr_curves.png").is_file(),
    }


def review_of(manifest: Manifest) -> dict[str, Any] | None:
    """The labels to re-check that a version's fast update found (loop/updates.py keeps the
    first ones with the version), or None for a version that has no list (an offline or full
    update's)."""
    review = (manifest.metrics.get("incremental") or {}).get("review")
    return {"version": manifest.version, **review} if isinstance(review, dict) else None


def project_detail(
    ledger: AnnotationLedger, models: ProjectModels, project_id: int
) -> dict[str, Any]:
    """One project: its versions over time (promoted and rejected), the served version's
    evaluation and labels to re-check, the last jobs and the history of `current` (promotions
    and rollbacks)."""
    store = models.store(project_id)
    current = store.current_version()
    base = models.base_store
    rows: list[dict[str, Any]] = []
    for name in store.versions():
        try:
            rows.append(_version_row(store, name, current))
        except StoreError as exc:
            logger.warning("Project %d: version %s is unreadable: %s", project_id, name, exc)
    served = current or base.current_version()
    evaluation = review = None
    if served is not None:
        owner = store if current else base
        try:
            manifest = owner.manifest(served)
            evaluation = evaluation_of(owner, manifest)
            review = review_of(manifest)
        except StoreError as exc:
            logger.warning("Project %d: cannot read %s: %s", project_id, served, exc)
    jobs = ledger.jobs(project_id=project_id, limit=30)
    return {
        "id": project_id,
        "version": served,
        "own_lineage": current is not None,
        "base_version": base.current_version(),
        "counts": _counts(ledger, project_id),
        "trainer": trainer_state(jobs),
        "versions": rows,
        "evaluation": evaluation,
        "review": review,
        "jobs": [job_summary(j) for j in jobs],
        "history": store.history(),
    }
