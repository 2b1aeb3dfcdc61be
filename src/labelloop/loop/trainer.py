"""The background trainer's scheduling: which job runs next, and when.

It turns ledger changes into jobs (after `auto_train_after` changes or `quiet_seconds` of quiet,
or at once on *Start Training*), coalesces requests into one follow-up per project and kind,
serves projects in turn (one job at a time, the project that waited longest first, so a busy
project cannot starve the others), reconciles the ledger with Label Studio, and records each
job's outcome. What a job
does is loop.updates; where it runs is the JobRunner (loop.jobs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from labelloop.labelstudio.annotations import record_from_task_annotation
from labelloop.labelstudio.client import LabelStudioAPIError, LabelStudioClient
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.loop.jobs import JobKind, JobRunner, JobState, ThreadRunner
from labelloop.loop.ledger import AnnotationLedger, Job, ReconcileResult
from labelloop.loop.updates import NothingToTrain, TrainerSettings, Updater, split_of
from labelloop.ml.embeddings import EmbeddingCache
from labelloop.runtime.projects import ProjectModels

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainerSettings", "split_of"]


class Trainer:
    def __init__(
        self,
        *,
        models: ProjectModels,
        ledger: AnnotationLedger,
        fetcher: Callable[[], ImageFetcher],
        embeddings: EmbeddingCache,
        settings: TrainerSettings,
        label_studio: Callable[[], LabelStudioClient | None] | None = None,
        on_promote: Callable[[int, str], None] | None = None,
        runner: JobRunner | None = None,
    ) -> None:
        self.models = models
        self.ledger = ledger
        self.settings = settings
        self.label_studio = label_studio
        self.on_promote = on_promote
        self.on_job_done: Callable[[Job], None] | None = None  # e.g. metrics
        self.updater = Updater(
            models=models,
            ledger=ledger,
            fetcher=fetcher,
            embeddings=embeddings,
            settings=settings,
            on_promote=self._promoted,
        )
        self.runner = runner or ThreadRunner(settings.poll_seconds)
        self.current_job: Job | None = None
        self._reconciled_at: float | None = None  # when every project was last reconciled
        self._maintaining = threading.Lock()
        self._last_ran: dict[int, float] = {}  # project -> when its last job started
        self._served: dict[int, str | None] = {}  # project -> its lineage's current, last seen

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        recovered = self.ledger.recover_interrupted()
        for job in recovered:
            logger.warning("Re-queued job %d of project %d after a restart", job.id, job.project_id)
        self.runner.start(self.tick)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.runner.stop(timeout_s)

    # -- requests ----------------------------------------------------------------------------

    def request(self, project_id: int, kinds: Sequence[JobKind], trigger: str) -> list[Job]:
        """Queue jobs; a kind already queued for the project is not queued twice.

        `request_job` checks and inserts in one write transaction, so two requests at once
        (or two processes sharing the ledger) cannot queue the same kind twice.
        """
        jobs = [self.ledger.request_job(project_id, str(kind), trigger) for kind in kinds]
        for job in jobs:
            self.runner.submit(job)
        return jobs

    def notify_change(self) -> None:
        self.runner.wake()

    # -- one tick of the runner -----------------------------------------------------------------

    def tick(self) -> None:
        """Queue automatic training, and run the next queued job (`next_job`)."""
        self.maintain()
        job = self.next_job()
        if job is not None:
            self.run(job)

    def maintain(self) -> None:
        """Everything a tick does besides running a job: Label Studio reconciled (at start,
        then every `reconcile_seconds`), lineages watched, automatic training queued. A worker
        of the distributed mode calls it beside the jobs it runs; one pass at a time."""
        if not self._maintaining.acquire(blocking=False):
            return
        try:
            now = time.time()
            if self._reconciled_at is None or now - self._reconciled_at >= (
                self.settings.reconcile_seconds
            ):
                self._reconciled_at = now
                self._reconcile_all()
            self._watch_lineages()
            self.queue_due_jobs()
        finally:
            self._maintaining.release()

    def _promoted(self, project_id: int, version: str) -> None:
        self._served[project_id] = version
        if self.on_promote is not None:
            self.on_promote(project_id, version)

    def _watch_lineages(self) -> None:
        """A lineage whose `current` changed outside this trainer (`labelloop rollback`, another
        process) gets the same follow-up as a promotion: its predictions and entry refreshed.
        Serving itself needs nothing: ProjectModels reads `current` at every request."""
        for project_id in self.models.projects():
            version = self.models.store(project_id).current_version()
            if project_id not in self._served:
                self._served[project_id] = version
                continue
            seen = self._served[project_id]
            self._served[project_id] = version
            if version is not None and version != seen:
                logger.info("Project %d now serves %s (was %s)", project_id, version, seen)
                if self.on_promote is not None:
                    self.on_promote(project_id, version)

    def next_job(self) -> Job | None:
        """The oldest queued job of the project whose last job started longest ago: projects
        take turns, and within one project jobs run in the order they were queued."""
        pending = self.ledger.pending_jobs()
        if not pending:
            return None
        oldest: dict[int, Job] = {}
        for job in pending:
            oldest.setdefault(job.project_id, job)
        return min(oldest.values(), key=lambda j: (self._last_ran.get(j.project_id, 0.0), j.id))

    def reconcile(self, project_id: int) -> ReconcileResult | None:
        """Bring the ledger in line with Label Studio: recovers webhooks that never arrived
        (backend down, 1 s timeout) and deletions made while we were not listening."""
        client = self.label_studio() if self.label_studio is not None else None
        if client is None:
            logger.info(
                "Cannot reconcile project %d: no Label Studio URL and token yet", project_id
            )
            return None
        as_of = time.time()
        try:
            with client:
                tasks = client.export_annotated(project_id)
                config = self.ledger.label_config(project_id)
                if config is None:
                    config = client.get_project(project_id).get("label_config")
                    if config:
                        self.ledger.set_label_config(project_id, config)
        except LabelStudioAPIError as exc:
            if exc.status == 404:
                logger.warning(
                    "Project %d is not in Label Studio (deleted?): nothing to reconcile; its "
                    "annotations and model lineage stay where they are",
                    project_id,
                )
            else:
                logger.warning(
                    "Reconciling project %d with Label Studio failed: %s", project_id, exc
                )
            return None
        records = [
            record_from_task_annotation(project_id, task, annotation, config)
            for task in tasks
            for annotation in task.get("annotations") or []
        ]
        result = self.ledger.reconcile(project_id, records, as_of=as_of)
        logger.info(
            "Reconciled project %d with Label Studio: %d added, %d updated, %d deleted",
            project_id,
            result.added,
            result.updated,
            result.deleted,
        )
        return result

    def _reconcile_all(self) -> None:
        for project_id in self.ledger.projects():
            try:
                self.reconcile(project_id)
            except Exception:  # noqa: BLE001 - start-up must not fail because Label Studio is down
                logger.exception("Reconciling project %d at start-up failed", project_id)

    @staticmethod
    def _last_trained_seq(jobs: Sequence[Job]) -> int:
        """The change count the newest finished-training job (of `jobs`, newest first) saw."""
        for job in jobs:
            if job.state in _TRAINED_STATES and job.trained_seq is not None:
                return int(job.trained_seq)
        return 0

    def queue_due_jobs(self) -> None:
        """Queue a fast update for each project with enough changes (or a quiet period since
        its last change), and a full one with it when `_full_due` says so."""
        now = time.time()
        for project_id in self.ledger.projects():
            jobs = self.ledger.jobs(project_id=project_id, limit=50)
            if any(j.state == JobState.RUNNING for j in jobs):
                # Its outcome settles what it trained on (trained_seq); a worker's maintenance
                # runs beside its jobs and must not queue the same changes again meanwhile.
                continue
            seq = self.ledger.change_seq(project_id)
            pending = seq - self._last_trained_seq(jobs)
            if pending <= 0:
                continue
            last_change = self.ledger.last_change_at(project_id) or now
            if (
                pending >= self.settings.auto_train_after
                or now - last_change >= self.settings.quiet_seconds
            ):
                if not any(j.project_id == project_id for j in self.ledger.pending_jobs()):
                    kinds = [JobKind.FAST]
                    if self._full_due(project_id, seq):
                        kinds.append(JobKind.FULL)
                    logger.info(
                        "Auto-training project %d after %d change(s): %s",
                        project_id,
                        pending,
                        " + ".join(kinds),
                    )
                    self.request(project_id, kinds, "auto")

    def _full_due(self, project_id: int, seq: int) -> bool:
        """A full fine-tune is due when the project's changes grew by `full_min_new` and by
        `full_growth` since the last full update (whatever its outcome, so a failing one is
        not retried at every tick)."""
        s = self.settings
        if not s.auto_full or self.models.serving(project_id) is None:
            return False
        last = 0
        for job in self.ledger.jobs(project_id=project_id, limit=50):
            if job.kind == JobKind.FULL and job.trained_seq is not None:
                last = int(job.trained_seq)
                break
        return seq - last >= s.full_min_new and seq >= last * (1 + s.full_growth)

    def run(self, job: Job) -> Job:
        """Run one queued job to its end and record the outcome; returns the job as stored."""
        finished = self._run(job)
        self._job_done(finished)
        return finished

    def _job_done(self, finished: Job) -> None:
        if self.on_job_done is not None:
            try:
                self.on_job_done(finished)
            except Exception:  # noqa: BLE001 - bookkeeping must not fail the trainer
                logger.exception("Recording the end of job %d failed", finished.id)

    def run_claimed(self, job_id: int, *, worker: str, lease_s: float) -> Job | None:
        """A worker's run of one queued job: claimed in the ledger first (None when it is no
        longer queued, or another job of its project is running: one job per project at a
        time across workers), its lease renewed while it runs, its outcome recorded."""
        job = self.ledger.claim_job(job_id, worker=worker, lease_s=lease_s)
        if job is None:
            return None
        with _Lease(self.ledger, job.id, worker=worker, lease_s=lease_s):
            finished = self._execute(job, self.ledger.change_seq(job.project_id))
        self._job_done(finished)
        return finished

    def _run(self, job: Job) -> Job:
        started = time.time()
        seq = self.ledger.change_seq(job.project_id)
        job = self.ledger.update_job(
            job.id, state=JobState.RUNNING, started_at=started, progress="starting"
        )
        return self._execute(job, seq)

    def _execute(self, job: Job, seq: int) -> Job:
        """Run a job already marked running; `seq`: the project's change count before it."""
        self._last_ran[job.project_id] = job.started_at or time.time()
        self.current_job = job
        try:
            if job.trigger == "start_training" and job.kind == JobKind.FAST:
                self.ledger.update_job(job.id, progress="reconciling with Label Studio")
                self.reconcile(job.project_id)
                seq = self.ledger.change_seq(job.project_id)
            outcome = self.updater.run(job)
        except NothingToTrain as reason:
            logger.info(
                "Job %d (%s, project %d) skipped: %s", job.id, job.kind, job.project_id, reason
            )
            return self.ledger.update_job(
                job.id,
                state=JobState.SKIPPED,
                finished_at=time.time(),
                error=str(reason),
                trained_seq=seq,
            )
        except Exception as exc:  # noqa: BLE001 - a failed job is recorded, the last model serves on
            logger.exception("Job %d (%s, project %d) failed", job.id, job.kind, job.project_id)
            return self.ledger.update_job(
                job.id,
                state=JobState.FAILED,
                finished_at=time.time(),
                error=f"{type(exc).__name__}: {exc}",
                trained_seq=seq,
            )
        finally:
            self.current_job = None
        finished = self.ledger.update_job(
            job.id, finished_at=time.time(), trained_seq=seq, **outcome.job_fields()
        )
        if job.kind == JobKind.FULL and outcome.state == JobState.SUCCEEDED:
            # A new backbone's features deserve a head fitted on all labels with out-of-fold
            # thresholds; the fine-tune's own head saw only its train split. In the loop
            # benchmark every large gain came from the fast update after a full one.
            self.request(job.project_id, [JobKind.FAST], "after_full")
        logger.info(
            "Job %d (%s, project %d) %s%s",
            job.id,
            job.kind,
            job.project_id,
            finished.state,
            f": {finished.promoted_version}" if finished.promoted_version else "",
        )
        return finished


class _Lease:
    """Renews a claimed job's lease every third of its length while the job runs, so that a
    worker killed mid-job is noticed (`AnnotationLedger.expire_leases`) within one lease."""

    def __init__(self, ledger: AnnotationLedger, job_id: int, *, worker: str, lease_s: float):
        self._ledger, self._job_id, self._worker, self._lease_s = ledger, job_id, worker, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _renew(self) -> None:
        while not self._stop.wait(self._lease_s / 3):
            try:
                if not self._ledger.renew_lease(
                    self._job_id, worker=self._worker, lease_s=self._lease_s
                ):
                    logger.warning("Job %d: lease lost (expired and re-queued?)", self._job_id)
                    return
            except Exception:  # noqa: BLE001 - a ledger outage: retried at the next renewal
                logger.warning("Job %d: renewing its lease failed", self._job_id, exc_info=True)


# A job in one of these states consumed the changes up to its trained_seq.
_TRAINED_STATES = frozenset({JobState.SUCCEEDED, JobState.REJECTED, JobState.SKIPPED})
