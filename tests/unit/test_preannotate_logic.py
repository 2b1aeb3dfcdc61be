"""Pre-annotation logic: which tasks it predicts, and how it pushes the predictions.

Fakes stand in for Label Studio here (the real one is exercised end to end in
test_e2e_preannotate.py): one project state served both as the JSON export and as a Data
Manager listing, the two shapes Label Studio 1.23 answers with, and a client whose imports are
slow, as they are in a big project.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from labelloop.loop.preannotate import _Pusher, tasks_to_predict

VERSION = "v2-20261201T000000"

# id -> (annotations as exported, predictions' model versions)
STATE: dict[int, tuple[list[dict[str, Any]], list[str]]] = {
    1: ([], []),
    2: ([{"id": 10, "was_cancelled": False}], []),  # labelled
    3: ([{"id": 11, "was_cancelled": True}], []),  # skipped only: still unlabelled
    4: ([], [VERSION]),  # already has the current version
    5: ([], ["v1-20261101T000000"]),  # only an older version
    6: ([{"id": 12, "was_cancelled": False}], [VERSION, VERSION]),
}


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def export_tasks(self, project_id: int) -> list[dict[str, Any]]:
        self.calls.append("export")
        return [
            {"id": i, "data": {"image": f"/data/upload/1/{i}.png"}, "annotations": annotations}
            for i, (annotations, _) in STATE.items()
        ]

    def list_tasks(
        self, project_id: int, *, page_size: int = 100, include: tuple[str, ...] | None = None
    ) -> list[dict[str, Any]]:
        self.calls.append("list")
        assert include is not None and "total_annotations" in include
        assert page_size <= 500  # SQLite refuses larger Data Manager pages
        return [
            {
                "id": i,
                "data": {"image": f"/data/upload/1/{i}.png"},
                "total_annotations": sum(not a["was_cancelled"] for a in annotations),
            }
            for i, (annotations, _) in STATE.items()
        ]

    def predictions(self, *, project_id: int) -> list[dict[str, Any]]:
        ids = iter(range(100, 200))
        return [
            {"id": next(ids), "task": i, "model_version": version}
            for i, (_, versions) in STATE.items()
            for version in versions
        ]


def project(*, evaluates_automatically: bool) -> dict[str, Any]:
    return {"id": 1, "evaluate_predictions_automatically": evaluates_automatically}


@pytest.mark.parametrize(
    ("evaluates_automatically", "listed_by"), [(True, "export"), (False, "list")]
)
@pytest.mark.parametrize(
    ("missing_only", "unlabelled_only", "wanted", "replaced"),
    [
        (True, False, [1, 2, 3, 5], {}),
        (True, True, [1, 3, 5], {}),
        (False, False, [1, 2, 3, 4, 5, 6], {4: [100], 6: [102, 103]}),
        (False, True, [1, 3, 4, 5], {4: [100]}),
    ],
)
def test_same_work_whichever_way_tasks_are_listed(
    evaluates_automatically: bool,
    listed_by: str,
    missing_only: bool,
    unlabelled_only: bool,
    wanted: list[int],
    replaced: dict[int, list[int]],
) -> None:
    client = FakeClient()
    work = tasks_to_predict(
        client,  # type: ignore[arg-type]
        project(evaluates_automatically=evaluates_automatically),
        VERSION,
        missing_only=missing_only,
        unlabelled_only=unlabelled_only,
    )
    # With "retrieve predictions automatically" on, a Data Manager listing would make Label
    # Studio call the backend: only the export may be used then.
    assert client.calls == [listed_by]
    assert [t["id"] for t in work.tasks] == wanted
    assert all(t["data"]["image"] == f"/data/upload/1/{t['id']}.png" for t in work.tasks)
    assert work.skipped == len(STATE) - len(wanted)
    assert work.replaced == replaced
    assert work.replaces_whole_version == (replaced == {4: [100], 6: [102, 103]})
    # The labelling order needs the labelled tasks, and only ranks a run that holds every
    # unlabelled task (1, 3, 4 and 5).
    assert [t["id"] for t in work.labelled] == [2, 6]
    assert work.whole_pool == ({1, 3, 4, 5} <= set(wanted))


def test_limit_cuts_the_work_without_counting_as_skipped() -> None:
    work = tasks_to_predict(
        FakeClient(),  # type: ignore[arg-type]
        project(evaluates_automatically=False),
        VERSION,
        missing_only=False,
        limit=4,
    )
    assert [t["id"] for t in work.tasks] == [1, 2, 3, 4]
    assert work.skipped == 0
    assert work.replaced == {4: [100]} and not work.replaces_whole_version
    assert not work.whole_pool  # task 5 is past the limit


class SlowImports:
    """Records what reaches Label Studio; an import lasts until the test opens `gate`, like a
    big project's slow ones (no gate: imports return at once)."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.gate = gate
        self.fail = fail
        self.calls: list[tuple[str, Any]] = []

    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> int:
        if self.gate is not None:
            assert self.gate.wait(timeout=30), "the test never let the import finish"
        if self.fail:
            raise RuntimeError("Label Studio said no")
        self.calls.append(("import", [p["task"] for p in predictions]))
        return len(predictions)

    def delete_prediction(self, prediction_id: int) -> None:
        self.calls.append(("delete", prediction_id))


def test_pushes_gather_while_one_is_in_flight_and_keep_their_order() -> None:
    in_flight = threading.Event()
    client = SlowImports(gate=in_flight)
    with _Pusher(client, 1) as pusher:  # type: ignore[arg-type]
        for task in range(10):
            pusher.add([{"task": task}], stale=[100 + task] if task in (0, 7) else [])
        in_flight.set()  # the first import ends only now, after all ten were added
        pusher.finish()
    # The first push goes at once; the other nine arrive while it is in flight and go as one.
    assert pusher.pushes == 2
    assert client.calls == [
        ("import", [0]),
        ("delete", 100),
        ("import", [1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("delete", 107),  # replaced only after its successor is stored
    ]


def test_a_failed_push_fails_the_run() -> None:
    with _Pusher(SlowImports(fail=True), 1) as pusher:  # type: ignore[arg-type]
        pusher.add([{"task": 1}], stale=[])
        with pytest.raises(RuntimeError, match="Label Studio said no"):
            pusher.finish()


def test_a_setup_never_cancels_a_running_refresh(monkeypatch) -> None:
    """Label Studio sends /setup before every batch of predictions; the rename it asks for
    must not cancel the refresh a promotion started (which renames the entry itself)."""
    import threading

    import labelloop.loop.preannotate as module

    started, release = threading.Event(), threading.Event()
    seen: list[threading.Event] = []

    def slow_preannotate(*args, cancel, **kwargs):
        seen.append(cancel)
        started.set()
        assert release.wait(10)
        return SimpleNamespace()

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(module, "preannotate", slow_preannotate)
    monkeypatch.setattr(module, "rename_backend", lambda *args: True)
    model = SimpleNamespace(version="v2")
    refresher = module.Refresher(
        predictor=None,  # type: ignore[arg-type]
        client=Client,  # type: ignore[arg-type]
        fetcher=lambda: None,  # type: ignore[arg-type,return-value]
        model_for=lambda project: model,  # type: ignore[arg-type,return-value]
        rename_backend="http://backend",
    )
    refresher.on_promote(5, "v2")
    assert started.wait(10)
    refresher.on_connect(5, "v1")  # a /setup while the refresh runs
    assert not seen[0].is_set()
    release.set()
    refresher.wait(10)
    assert len(seen) == 1 and not seen[0].is_set()
    assert 5 in refresher.last


class FakeOrder:
    """A labelling order whose plan is fixed, or fails, or sees the run cancelled."""

    strategy = "margin-diversity"
    needs_pool = True

    def __init__(self, outcome: str, cancel: threading.Event | None = None) -> None:
        self.outcome = outcome
        self.cancel = cancel
        self.seen: list[tuple[list[tuple[int, float]], list[int]]] = []

    def planned(self, model, fetcher, unlabelled, labelled, *, cancel=None, features=None):
        self.seen.append(([(t.id, t.margin) for t in unlabelled], [t.id for t in labelled]))
        self.features = features
        if self.outcome == "fails":
            raise RuntimeError("embedding cache on fire")
        if self.outcome == "cancelled" and self.cancel is not None:
            self.cancel.set()
        return {5: -1.0, 1: -0.5}  # task 5 first, then task 1; task 3 keeps its margin


class PlanClient:
    """Label Studio's stored predictions (this run's version and an older one) and the score
    changes it is sent."""

    def __init__(self) -> None:
        self.patched: list[tuple[int, float]] = []

    def predictions(self, *, project_id: int) -> list[dict[str, Any]]:
        return [{"id": 100 + task, "task": task, "model_version": "v1"} for task in (1, 3, 5)] + [
            {"id": 200, "task": 5, "model_version": "v0"}
        ]

    def set_prediction_score(self, prediction_id: int, score: float) -> None:
        self.patched.append((prediction_id, score))


@pytest.mark.parametrize("outcome", ["planned", "fails", "cancelled"])
def test_the_plan_changes_only_the_planned_scores_or_none(outcome: str) -> None:
    from labelloop.loop import preannotate as module
    from labelloop.loop.ordering import PoolTask

    cancel = threading.Event()
    order = FakeOrder(outcome, cancel)
    client = PlanClient()
    pool = [PoolTask(i, f"/data/{i}.png", 0.1 * i) for i in (1, 3, 5)]
    work = module.Work(tasks=[], skipped=0, labelled=[{"id": 2, "data": {"image": "/data/2.png"}}])
    summary = module.PreannotateSummary("v1")
    model = SimpleNamespace(version="v1")
    features = {1: np.ones(4, np.float32)}  # what the forward passes gave
    module._plan(order, pool, features, work, "image", model, None, client, 9, cancel, summary)  # type: ignore[arg-type]
    assert order.seen == [([(1, 0.1), (3, pytest.approx(0.3)), (5, 0.5)], [2])]
    assert order.features is features
    if outcome == "planned":
        # This version's predictions of the planned tasks only; the older version's untouched.
        assert sorted(client.patched) == [(101, -0.5), (105, -1.0)]
        assert summary.scores == "margin-diversity"
    else:  # the pushed margins stay, and the summary says so
        assert client.patched == [] and summary.scores == "margin"
    assert summary.cancelled is (outcome == "cancelled")
