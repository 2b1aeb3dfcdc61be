"""The background trainer with a real model, ledger, embedding cache and image fetcher (images
read from a local-files document root, exactly as the server reads them)."""

from __future__ import annotations

import csv
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import wait_until

from labelloop.labelstudio.annotations import AnnotationRecord
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.urls import FetchSettings
from labelloop.loop.ledger import Ledger
from labelloop.loop.priority import run_at_lower_priority
from labelloop.loop.trainer import Trainer, TrainerSettings, split_of
from labelloop.ml.embeddings import EmbeddingCache
from labelloop.ml.head import head_of
from labelloop.ml.transforms import resize_size, train_decode_side
from labelloop.runtime.projects import ProjectModels
from labelloop.store import ModelStore, StoreError, load_bundle
from labelloop.training import core as training_core
from labelloop.training.ddp import processes_for, state_digest

PROJECT = 7


def config_xml(extra_defect: str | None = None) -> str:
    defects = ["scratch", "crack", "rust", "dent"] + ([extra_defect] if extra_defect else [])
    components = ["bolt", "nut", "washer", "gear", "bracket"]

    def choices(name: str, values: list[str]) -> str:
        inner = "".join(f'<Choice value="{v}"/>' for v in values)
        return f'<Choices name="{name}" toName="image" choice="multiple">{inner}</Choices>'

    return (
        '<View><Image name="image" value="$image"/>'
        f"{choices('components', components)}{choices('defects', defects)}</View>"
    )


def truth(demo_dataset) -> dict[str, dict[str, tuple[str, ...]]]:
    with demo_dataset.metadata_csv.open() as handle:
        return {
            row["image_id"]: {
                "components": tuple(x for x in row["components"].split(";") if x),
                "defects": tuple(x for x in row["defects"].split(";") if x),
            }
            for row in csv.DictReader(handle)
        }


def records(demo_dataset, n: int, *, start: int = 0, relabel=None) -> list[AnnotationRecord]:
    labels = truth(demo_dataset)
    names = sorted(labels)[start : start + n]
    return [
        AnnotationRecord(
            project_id=PROJECT,
            annotation_id=1000 + start + i,
            task_id=1 + start + i,
            image_ref=f"/data/local-files/?d=images/{name}",
            labels=relabel(labels[name]) if relabel else labels[name],
            updated_at=f"2026-11-25T00:00:{i % 60:02d}Z",
            was_cancelled=False,
            ground_truth=False,
            completed_by=1,
        )
        for i, name in enumerate(names)
    ]


@pytest.fixture()
def setup(trained_model, demo_dataset, tmp_path: Path):
    """A copy of the trained model dir, a ledger, and a trainer reading the demo images."""
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model[0], model_dir)
    models = ProjectModels(model_dir)
    ledger = Ledger(model_dir / "ledger.sqlite3")
    ledger.set_label_config(PROJECT, config_xml())
    fetcher = ImageFetcher(
        FetchSettings(label_studio_url="http://127.0.0.1:1", document_root=demo_dataset.root),
        None,
    )
    cache = EmbeddingCache(tmp_path / "embeddings.sqlite3")

    def make(**settings) -> Trainer:
        # Full updates are scheduled only where a test asks for them (they take minutes).
        settings.setdefault("auto_full", False)
        return Trainer(
            ledger=ledger,
            models=models,
            fetcher=lambda: fetcher,
            embeddings=cache,
            settings=TrainerSettings(poll_seconds=0.05, **settings),
        )

    yield model_dir, models, ledger, make
    fetcher.close()
    cache.close()
    ledger.close()


def wait_for_job(ledger: Ledger, job_id: int, timeout_s: float = 120) -> object:
    """The job once it has ended (any state but queued or running); a job not queued yet (a
    follow-up the trainer queues right after the job before it) is waited for too."""
    return wait_until(
        lambda: (
            (job := ledger.job(job_id)) is not None
            and job.state not in ("queued", "running")
            and job
        ),
        timeout_s=timeout_s,
        what=f"job {job_id} to end",
        interval_s=0.05,
    )


def test_split_is_stable_and_roughly_proportional() -> None:
    settings = TrainerSettings(holdout_percent=20, val_percent=20)
    splits = [split_of(t, settings) for t in range(2000)]
    assert splits == [split_of(t, settings) for t in range(2000)]
    share = splits.count("holdout") / len(splits)
    assert 0.15 < share < 0.25


def test_requests_coalesce(setup) -> None:
    _, _, ledger, make = setup
    trainer = make()
    first = trainer.request(PROJECT, ["fast"], "start_training")
    second = trainer.request(PROJECT, ["fast"], "auto")
    assert [j.id for j in first] == [j.id for j in second]
    assert len(ledger.pending_jobs()) == 1


def test_auto_training_after_n_changes_then_a_fast_update_promotes(setup, demo_dataset) -> None:
    model_dir, models, ledger, make = setup
    before = models.serving(PROJECT).version
    # tolerance 1.0: the gate promotes whatever comes out; this test is about the trigger.
    trainer = make(auto_train_after=40, quiet_seconds=3600, tolerance=1.0)
    ledger.upsert(records(demo_dataset, 39))
    trainer.tick()  # one whole pass of the trainer's loop, here and now
    assert ledger.jobs(project_id=PROJECT) == []  # 39 < 40 and not quiet for an hour
    trainer.start()
    try:
        ledger.upsert(records(demo_dataset, 41, start=39))
        trainer.notify_change()
        [job] = wait_until(
            lambda: ledger.jobs(project_id=PROJECT),
            timeout_s=10,
            what="the 80th change to queue a job",
            interval_s=0.05,
        )
        assert job.trigger == "auto"
        done = wait_for_job(ledger, job.id)
    finally:
        trainer.stop()
    assert done.state == "succeeded", (done.state, done.error, done.metrics)
    assert done.metrics["n_train"] + done.metrics["gate"]["sources"]["annotated"] == 80
    # The offline images no annotation relabels: replayed (train, val) or evaluated on (test).
    assert done.metrics["n_replay"] + done.metrics["gate"]["sources"]["offline_test"] == 120 - 80
    store = models.store(PROJECT)
    # The project's first version starts its own lineage; the base model is left as it was.
    assert done.candidate_version.startswith("v1-")
    assert models.serving(PROJECT).version == done.candidate_version == store.current_version()
    assert store.manifest(done.candidate_version).parent_version == before
    assert ModelStore(model_dir).current_version() == before
    lineage = store.manifest(done.candidate_version).training_config["incremental"]
    assert lineage["parent_lineage"] == "base" and lineage["project"] == PROJECT


def test_quiet_period_triggers_training(setup, demo_dataset) -> None:
    _, _, ledger, make = setup
    trainer = make(auto_train_after=1000, quiet_seconds=0.3)
    trainer.start()
    try:
        ledger.upsert(records(demo_dataset, 5))
        [job] = wait_until(
            lambda: ledger.jobs(project_id=PROJECT),
            timeout_s=10,
            what="a job after the quiet period",
            interval_s=0.05,
        )
        assert job.trigger == "auto"
    finally:
        trainer.stop()


def test_new_choice_extends_the_head_and_keeps_old_weights(setup, demo_dataset) -> None:
    model_dir, models, ledger, make = setup
    old = models.serving(PROJECT).bundle
    ledger.set_label_config(PROJECT, config_xml(extra_defect="corrosion"))

    def add_corrosion(labels):
        return {**labels, "defects": (*labels["defects"], "corrosion")}

    ledger.upsert(records(demo_dataset, 30))
    ledger.upsert(records(demo_dataset, 20, start=30, relabel=add_corrosion))
    trainer = make(tolerance=1.0)  # promote whatever comes out: this test is about the head
    [job] = trainer.request(PROJECT, ["fast"], "label_config_changed")
    trainer.start()
    try:
        done = wait_for_job(ledger, job.id)
    finally:
        trainer.stop()
    assert done.state == "succeeded", done.error
    new = models.serving(PROJECT).bundle
    assert new.label_space.as_dict()["defects"] == ["scratch", "crack", "rust", "dent", "corrosion"]
    assert new.classes[: len(old.classes)] == old.classes
    # The backbone is untouched by a fast update.
    assert torch.equal(new.model.conv1.weight, old.model.conv1.weight)
    assert head_of(new.model).weight.shape[0] == len(old.classes) + 1


def test_cold_start_waits_for_labels_then_trains(tmp_path: Path, demo_dataset) -> None:
    model_dir = tmp_path / "empty"
    model_dir.mkdir()
    ledger = Ledger(model_dir / "ledger.sqlite3")
    ledger.set_label_config(PROJECT, config_xml())
    models = ProjectModels(model_dir)
    fetcher = ImageFetcher(
        FetchSettings(label_studio_url="http://127.0.0.1:1", document_root=demo_dataset.root), None
    )
    trainer = Trainer(
        ledger=ledger,
        models=models,
        fetcher=lambda: fetcher,
        embeddings=EmbeddingCache(tmp_path / "e.sqlite3"),
        settings=TrainerSettings(
            poll_seconds=0.05,
            min_labels_per_control=3,
            cold_start_weights="none",
            cold_start_image_size=32,
        ),
    )
    ledger.upsert(
        records(demo_dataset, 1, relabel=lambda labels: {"components": ("bolt",), "defects": ()})
    )
    [job] = trainer.request(PROJECT, ["fast"], "start_training")
    trainer.start()
    try:
        skipped = wait_for_job(ledger, job.id)
        assert skipped.state == "skipped" and "defects: 0/3" in skipped.error
        assert models.serving(PROJECT) is None  # empty predictions, not random ones
        ledger.upsert(records(demo_dataset, 40, start=1))
        [job] = trainer.request(PROJECT, ["fast"], "start_training")
        done = wait_for_job(ledger, job.id)
    finally:
        trainer.stop()
        fetcher.close()
    assert done.state == "succeeded", done.error
    assert models.serving(PROJECT) is not None
    assert models.serving(PROJECT).bundle.label_space.group_names == ["components", "defects"]


def test_a_failing_job_is_recorded_and_the_model_keeps_serving(setup, demo_dataset) -> None:
    _, models, ledger, make = setup
    before = models.serving(PROJECT).version
    broken = [
        AnnotationRecord(
            PROJECT,
            5000 + i,
            900 + i,
            "/data/local-files/?d=../../etc/passwd",
            {"components": ("bolt",), "defects": ()},
            "2026-11-25T00:00:00Z",
            False,
            False,
            1,
        )
        for i in range(10)
    ]
    ledger.upsert(broken)
    trainer = make()
    [job] = trainer.request(PROJECT, ["fast"], "start_training")
    trainer.start()
    try:
        done = wait_for_job(ledger, job.id)
    finally:
        trainer.stop()
    assert done.state in ("skipped", "failed")
    assert models.serving(PROJECT).version == before


def test_interrupted_jobs_are_failed_and_requeued_on_start(setup) -> None:
    _, _, ledger, make = setup
    job = ledger.create_job(PROJECT, "fast", "auto")
    ledger.update_job(job.id, state="running", started_at=time.time())
    trainer = make()
    trainer.start()
    trainer.stop()
    assert ledger.job(job.id).state == "failed"
    assert "interrupted" in ledger.job(job.id).error
    assert any(j.trigger == "recovery" for j in ledger.jobs(project_id=PROJECT))


def test_a_second_update_reuses_cached_embeddings(setup, demo_dataset, monkeypatch) -> None:
    import labelloop.ml.embeddings as incremental

    _, _, ledger, make = setup
    ledger.upsert(records(demo_dataset, 60))
    embedded: list[int] = []
    real = incremental.extract_features

    def counting(model, batch, **kwargs):
        embedded.append(len(batch))
        return real(model, batch, **kwargs)

    monkeypatch.setattr(incremental, "extract_features", counting)
    trainer = make(tolerance=1.0)
    trainer.start()
    try:
        [job] = trainer.request(PROJECT, ["fast"], "start_training")
        assert wait_for_job(ledger, job.id).state == "succeeded"
        # 60 annotated images and the 60 offline ones they do not relabel: each embedded once.
        assert sum(embedded) == 120
        # A fast update keeps the backbone, so every embedding stays valid: 5 more annotations
        # of images replayed before are found in the cache by their bytes.
        ledger.upsert(records(demo_dataset, 5, start=60))
        [job] = trainer.request(PROJECT, ["fast"], "start_training")
        assert wait_for_job(ledger, job.id).state == "succeeded"
    finally:
        trainer.stop()
    assert sum(embedded) == 120


def test_rollback_is_served_without_a_restart_and_refreshes_the_project(
    setup, demo_dataset
) -> None:
    model_dir, models, ledger, make = setup
    ledger.upsert(records(demo_dataset, 40))
    changes: list[tuple[int, str]] = []
    trainer = make(tolerance=1.0)
    trainer.on_promote = lambda project, version: changes.append((project, version))
    trainer.start()
    try:
        [job] = trainer.request(PROJECT, ["fast"], "start_training")
        first = wait_for_job(ledger, job.id).promoted_version
        ledger.upsert(records(demo_dataset, 10, start=40))
        [job] = trainer.request(PROJECT, ["fast"], "start_training")
        second = wait_for_job(ledger, job.id).promoted_version
        assert first and second and models.serving(PROJECT).version == second
        models.store(PROJECT).set_current(first)  # what `labelloop rollback --project` does
        # Served from the next request on: the pointer is read at every lookup.
        assert models.serving(PROJECT).version == first
        # The trainer notices the change it did not make and refreshes that project.
        wait_until(
            lambda: changes[-1] == (PROJECT, first),
            timeout_s=10,
            what="the rollback to be refreshed",
            interval_s=0.05,
        )
    finally:
        trainer.stop()
    assert changes == [(PROJECT, first), (PROJECT, second), (PROJECT, first)]
    assert ModelStore(model_dir).current_version() not in (first, second)


def test_full_update_fine_tunes_everything_with_replay(setup, demo_dataset, monkeypatch) -> None:
    model_dir, models, ledger, make = setup
    old = models.serving(PROJECT).bundle
    ledger.upsert(records(demo_dataset, 40))
    fit_niceness: list[int] = []
    real_fit = training_core.fit

    decode_sides: list[int | None] = []

    def spy_fit(*args, **kwargs):
        fit_niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        decode_sides.extend(loader.dataset.min_side for loader in args[1:3])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(training_core, "fit", spy_fit)
    trainer = make(tolerance=1.0, full_epochs=2)
    [job] = trainer.request(PROJECT, ["full"], "start_training")
    trainer.start()
    try:
        done = wait_for_job(ledger, job.id, timeout_s=300)
        # The promoted backbone gets a fast update of its own (head on all labels, OOF
        # thresholds), queued by the full update itself.
        follow_up = wait_for_job(ledger, job.id + 1)
    finally:
        trainer.stop()
    assert done.state == "succeeded", done.error
    assert (follow_up.kind, follow_up.trigger) == ("fast", "after_full")
    assert follow_up.state == "succeeded", follow_up.error
    # The offline training data (the demo CSV the fixture model was trained on) is replayed.
    # The offline training split (the demo CSV the fixture model was trained on) is replayed,
    # less the images the 40 annotations relabel; its test split only ever judges the gate.
    offline_train = (pd.read_csv(old.path / "splits.csv")["split"] == "train").sum()
    assert 0 < done.metrics["n_replay"] <= offline_train
    assert done.metrics["n_train"] > done.metrics["n_replay"]
    assert done.metrics["gate"]["sources"]["offline_test"] > 0
    new = load_bundle(models.store(PROJECT).version_dir(done.promoted_version))
    assert not torch.equal(new.model.conv1.weight, old.model.conv1.weight)  # backbone moved
    assert new.manifest.data == old.manifest.data  # replay source carried forward
    assert new.manifest.parent_version == old.version
    served = models.serving(PROJECT).bundle
    assert served.version == follow_up.promoted_version
    assert served.manifest.parent_version == done.promoted_version
    # The fast update kept the fine-tuned backbone and refit only the head.
    assert torch.equal(served.model.conv1.weight, new.model.conv1.weight)
    if sys.platform.startswith("linux"):
        # Fine-tuning ran below request handling's CPU priority (responsiveness on few cores).
        assert fit_niceness == [min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)]
    # Photos are decoded only as finely as the train crops and the eval resize need.
    assert decode_sides == [train_decode_side(old.preprocess), resize_size(old.preprocess)]


def test_a_full_update_runs_as_ddp_over_several_processes(setup, demo_dataset) -> None:
    """Two gloo ranks on CPU, through torchrun's launcher: on a GPU worker the same code runs
    one NCCL rank per GPU."""
    model_dir, models, ledger, make = setup
    ledger.upsert(records(demo_dataset, 40))
    trainer = make(tolerance=1.0, full_epochs=2, full_processes=2)
    [job] = trainer.request(PROJECT, ["full"], "start_training")
    trainer.start()
    try:
        done = wait_for_job(ledger, job.id, timeout_s=400)
    finally:
        trainer.stop()
    assert done.state == "succeeded", done.error
    assert done.metrics["processes"] == 2
    ranks = done.metrics["ranks"]
    assert [(r["rank"], r["world_size"], r["device"]) for r in ranks] == [
        (0, 2, "cpu"),
        (1, 2, "cpu"),
    ]
    # Each rank trained on its half of the images (DistributedSampler pads to equal shares)...
    assert [r["train_samples"] for r in ranks] == [(done.metrics["n_train"] + 1) // 2] * 2
    # ...and DDP's gradient all-reduce kept the two replicas identical, to the last bit.
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"]
    # The published candidate is rank 0's best weights.
    new = load_bundle(models.store(PROJECT).version_dir(done.promoted_version))
    assert state_digest(new.model) == ranks[0]["weights_digest"]
    if sys.platform.startswith("linux"):
        # The ranks inherited the lowered priority of the thread that launched them.
        nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        assert [r["nice"] for r in ranks] == [nice, nice]


def test_processes_for_counts_gpus_only_when_asked_for_zero() -> None:
    assert processes_for(3) == 3
    expected = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert processes_for(0) == max(1, expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_run_at_lower_priority_nices_only_a_fresh_thread() -> None:
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, object] = {}

    def work(x: int, *, y: int) -> int:
        seen["thread"] = threading.current_thread().name
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return x + y

    assert run_at_lower_priority(5, work, 1, y=2) == 3
    assert seen == {"thread": "trainer-fit", "nice": min(19, caller + 5)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller

    def boom() -> None:
        raise FloatingPointError("loss became nan")

    with pytest.raises(FloatingPointError, match="nan"):
        run_at_lower_priority(5, boom)


def test_start_training_queues_fast_then_full(setup) -> None:
    from labelloop.labelstudio.protocol import WebhookEvent
    from labelloop.serve.events import record_event

    _, _, ledger, make = setup
    trainer = make()
    reply = record_event(
        WebhookEvent(action="START_TRAINING", project={"id": PROJECT}), ledger, trainer
    )
    jobs = [ledger.job(i) for i in reply["queued"]]
    assert [j.kind for j in jobs] == ["fast", "full"]
    assert all(j.trigger == "start_training" for j in jobs)


def test_a_rejected_candidate_is_kept_with_its_reason_and_later_pruned(setup) -> None:
    model_dir, models, ledger, make = setup
    trainer = make(keep_rejected=1)
    current = models.serving(PROJECT)
    job = ledger.create_job(PROJECT, "fast", "auto")
    bundle = current.bundle

    def finish(decision: dict):
        return trainer.updater.finish(
            job, bundle, bundle.model, bundle.label_space, list(bundle.thresholds), {}, decision
        )

    no = {"promote": False, "reason": "worse on 40 held-out items", "candidate_f1": 0.4}
    first = finish(no)
    assert first.state == "rejected"
    assert first.progress == "rejected: worse on 40 held-out items"
    assert models.serving(PROJECT) is current  # still serving the same model object
    store = models.store(PROJECT)
    assert store.current_version() is None  # the project is still served the base model
    assert first.candidate_version in store.versions()  # kept for inspection
    recorded = store.manifest(first.candidate_version).metrics["incremental"]
    assert recorded["gate"]["reason"] == "worse on 40 held-out items"
    assert recorded["candidate_f1"] == 0.4
    second = finish(no)
    # keep_rejected=1: the older rejection loses its weights, keeps manifest and metrics.
    pruned = store.manifest(first.candidate_version)
    assert pruned.weights_pruned and not (store.version_dir(pruned.version) / "model.pth").exists()
    assert pruned.metrics["incremental"]["gate"]["promote"] is False
    assert (store.version_dir(second.candidate_version) / "model.pth").is_file()
    with pytest.raises(StoreError, match="pruned"):
        store.set_current(first.candidate_version)
    yes = finish({"promote": True, "reason": "first model of the project"})
    assert yes.state == "succeeded"
    assert models.serving(PROJECT).version == yes.promoted_version == store.current_version()


def test_full_updates_are_queued_without_a_button_as_the_labels_grow(setup, demo_dataset) -> None:
    _, _, ledger, make = setup
    trainer = make(auto_full=True, auto_train_after=10, full_min_new=30, full_growth=0.25)

    def queue_and_finish() -> list[str]:
        trainer.queue_due_jobs()
        queued = ledger.pending_jobs()
        for job in queued:  # as if they ran: what they trained on is the current change count
            ledger.update_job(
                job.id, state="succeeded", trained_seq=ledger.change_seq(PROJECT), progress="done"
            )
        return sorted(j.kind for j in queued)

    ledger.upsert(records(demo_dataset, 40))
    assert queue_and_finish() == ["fast", "full"]  # 40 changes: >= 30 new since none
    ledger.upsert(records(demo_dataset, 10, start=40))
    assert queue_and_finish() == ["fast"]  # 10 more: a fast update only
    ledger.upsert(records(demo_dataset, 20, start=50))
    assert queue_and_finish() == ["fast", "full"]  # 70 = 40 + 30 new, and +75 %
    off = make(auto_full=False, auto_train_after=10)
    ledger.upsert(records(demo_dataset, 40, start=70))
    off.queue_due_jobs()
    assert [j.kind for j in ledger.pending_jobs()] == ["fast"]


def test_projects_take_turns(setup) -> None:
    _, _, ledger, make = setup
    trainer = make()
    busy = [ledger.create_job(PROJECT, kind, "auto") for kind in ("fast", "full")]
    quiet = ledger.create_job(PROJECT + 1, "fast", "auto")
    # Nobody ran yet: the oldest job first.
    assert trainer.next_job().id == busy[0].id
    trainer._last_ran[PROJECT] = time.time()  # what run() records when a job of it starts
    ledger.update_job(busy[0].id, state="succeeded")
    # The busy project's next job waits for the project that has not had a turn.
    assert trainer.next_job().id == quiet.id
    ledger.update_job(quiet.id, state="succeeded")
    assert trainer.next_job().id == busy[1].id


def test_a_second_project_with_another_config_learns_without_touching_the_first(
    setup, demo_dataset
) -> None:
    model_dir, models, ledger, make = setup
    other = PROJECT + 1
    # Other control names, other choices: nothing maps onto the base model's classes.
    ledger.set_label_config(
        other,
        '<View><Image name="image" value="$image"/><Choices name="kind" toName="image" '
        'choice="multiple"><Choice value="metal"/><Choice value="plain"/></Choices></View>',
    )

    def kind(labels):
        return {"kind": ("metal",) if labels["components"] else ("plain",)}

    ledger.upsert(
        [
            AnnotationRecord(**{**r.__dict__, "project_id": other})
            for r in records(demo_dataset, 30, relabel=kind)
        ]
    )
    base_before = models.serving(PROJECT)
    files_before = sorted(p.name for p in (model_dir / "versions").iterdir())
    trainer = make(tolerance=1.0, cold_start_weights="none", cold_start_image_size=32)
    [job] = trainer.request(other, ["fast"], "start_training")
    trainer.start()
    try:
        done = wait_for_job(ledger, job.id)
    finally:
        trainer.stop()
    assert done.state == "succeeded", done.error
    own = models.serving(other)
    assert own.version == done.promoted_version
    assert own.bundle.label_space.as_dict() == {"kind": ["metal", "plain"]}  # a cold start
    lineage = models.store(other).manifest(own.version).training_config["incremental"]
    assert lineage["parent_lineage"] == "cold-start"
    # The first project is still served the same base model object, whose folder is untouched.
    assert models.serving(PROJECT) is base_before
    assert sorted(p.name for p in (model_dir / "versions").iterdir()) == files_before
    assert not models.has_lineage(PROJECT)


def test_a_fast_update_keeps_the_labels_to_recheck_with_its_version(setup, demo_dataset) -> None:
    """The fast update reviews every annotation, held-out tasks included, and its version keeps
    the first flags, most suspect first, for the project's page and /status. (How well the
    flags find wrong labels is measured in bench/label_review.py and tests/e2e/test_e2e_review.py
    with real pretrained features; the tiny test backbone's features cannot tell.)"""
    _, models, ledger, make = setup
    trainer = make(tolerance=1.0)
    flipped = set(range(1, 101, 10))  # task ids 1, 11, ..., 91: `bolt` turned over
    annotations = records(demo_dataset, 100)
    for record in annotations:
        if record.task_id in flipped:
            components = set(record.labels["components"]) ^ {"bolt"}
            record.labels["components"] = tuple(sorted(components))
    ledger.upsert(annotations)
    outcome = trainer.updater.fast(ledger.create_job(PROJECT, "fast", "start_training"))

    review = outcome.metrics["review"]
    assert outcome.metrics["n_train"] < review["n_judged"] == 100
    assert review["n_flagged"] > 0
    assert len(review["flags"]) == min(review["n_flagged"], 50)
    scores = [f["score"] for f in review["flags"]]
    assert scores == sorted(scores, reverse=True)
    annotated = {r.task_id: r.labels for r in annotations}
    for flag in review["flags"]:
        # Each flag names the annotation as it is, and a model that leans the other way.
        assert flag["annotated"] == (flag["label"] in annotated[flag["task_id"]][flag["control"]])
        assert flag["score"] == pytest.approx(
            1 - flag["probability"] if flag["annotated"] else flag["probability"], abs=1e-3
        )
    stored = models.store(PROJECT).manifest(outcome.candidate_version).metrics["incremental"]
    assert stored["review"] == review

    # Too few annotations for five folds: no list, and the reason why.
    ledger.delete([r.annotation_id for r in annotations[8:]], project_id=PROJECT)
    few = trainer.updater.fast(ledger.create_job(PROJECT, "fast", "start_training"))
    assert few.metrics["review"]["flags"] == []
    assert few.metrics["review"]["n_judged"] == 8
    assert "at least 10 labelled images" in few.metrics["review"]["reason"]
