"""The durable annotation ledger and the background trainer's job store, in one SQLite file.

Label Studio tells the backend about annotations once, by webhook, with a 1 s timeout and no
retry: what the ledger acknowledges must survive a crash. Every write commits (synchronous=FULL)
before it returns, so a webhook is answered only once its annotations are on disk.

Rules the training set relies on:

* Webhooks can arrive out of order: an annotation older (by Label Studio's ``updated_at``) than
  the stored one does not overwrite it.
* Deletions are tombstones (``deleted_at``), never row removals. Label Studio never reuses an
  annotation id, so a tombstone is final for ``upsert``: a late update of a deleted annotation
  does not bring it back. Only ``reconcile``, a full snapshot from the API, revives one.
* A record without an image keeps the image already known for its annotation.

Times: the ledger's own clock (received, deleted, changed, job times) is unix seconds; Label
Studio's ``updated_at`` is kept as the ISO string it sent, plus its unix value for ordering.
One connection serves every thread (FastAPI workers and the trainer), behind a lock.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from labelloop.labelstudio.annotations import (
    AnnotationRank,
    AnnotationRecord,
    parse_timestamp,
    winning_annotation,
)
from labelloop.loop.jobs import JobState
from labelloop.store import StoreError

logger = logging.getLogger(__name__)

__all__ = [
    "JOB_STATES",
    "SCHEMA_VERSION",
    "AnnotationLedger",
    "Job",
    "Ledger",
    "LedgerError",
    "ReconcileResult",
    "TrainingExample",
]

SCHEMA_VERSION = 1
# Stored as plain strings; loop.jobs.JobState says what each means.
JOB_STATES = frozenset(str(state) for state in JobState)
_INTERRUPTED = "interrupted (backend restarted)"
# Columns `_project_value` may read: the name goes into SQL, so only these.
_PROJECT_COLUMNS = frozenset({"label_config", "change_seq", "last_change_at"})
# Fields update_job accepts, with the types each may hold besides None.
_JOB_FIELDS: dict[str, tuple[type, ...]] = {
    "state": (str,),
    "started_at": (int, float),
    "finished_at": (int, float),
    "progress": (str,),
    "metrics": (Mapping,),
    "error": (str,),
    "candidate_version": (str,),
    "promoted_version": (str,),
    "trained_seq": (int,),
}

_SCHEMA = (
    """CREATE TABLE projects (
        project_id INTEGER PRIMARY KEY,
        label_config TEXT,
        change_seq INTEGER NOT NULL DEFAULT 0,
        last_change_at REAL
    )""",
    """CREATE TABLE annotations (
        project_id INTEGER NOT NULL REFERENCES projects (project_id),
        annotation_id INTEGER NOT NULL,
        task_id INTEGER NOT NULL,
        image_ref TEXT,
        labels TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        updated_ts REAL NOT NULL,
        was_cancelled INTEGER NOT NULL,
        ground_truth INTEGER NOT NULL,
        completed_by INTEGER,
        received_at REAL NOT NULL,
        deleted_at REAL,
        PRIMARY KEY (project_id, annotation_id)
    )""",
    "CREATE INDEX annotations_by_task ON annotations (project_id, task_id)",
    # ANNOTATIONS_DELETED may come without a usable project: deletes look ids up alone.
    "CREATE INDEX annotations_by_id ON annotations (annotation_id)",
    # AUTOINCREMENT: a job id is never reused, even after the newest job is gone.
    """CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        project_id INTEGER NOT NULL REFERENCES projects (project_id),
        kind TEXT NOT NULL,
        trigger TEXT NOT NULL,
        state TEXT NOT NULL,
        requested_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        progress TEXT,
        metrics TEXT,
        error TEXT,
        candidate_version TEXT,
        promoted_version TEXT,
        trained_seq INTEGER
    )""",
    "CREATE INDEX jobs_by_state ON jobs (state, id)",
)


class LedgerError(StoreError):
    """The ledger file cannot be opened or was written by another schema version."""


@dataclass(frozen=True)
class TrainingExample:
    task_id: int
    annotation_id: int
    image_ref: str
    labels: dict[str, tuple[str, ...]]
    updated_at: str
    ground_truth: bool


@dataclass(frozen=True)
class ReconcileResult:
    added: int  # new, or revived from a tombstone
    updated: int  # labels, flags or image changed
    deleted: int  # live in the ledger, absent from the snapshot


@dataclass(frozen=True)
class Job:
    id: int
    project_id: int
    kind: str
    trigger: str
    state: str
    requested_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    candidate_version: str | None = None
    promoted_version: str | None = None
    trained_seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: metrics were made JSON-safe when stored."""
        return asdict(self)


@dataclass(frozen=True)
class _Row:
    """An AnnotationRecord as stored."""

    project_id: int
    annotation_id: int
    task_id: int
    image_ref: str | None
    labels: str  # canonical JSON: equal labels, equal strings
    updated_at: str
    updated_ts: float
    was_cancelled: bool
    ground_truth: bool
    completed_by: int | None


class AnnotationLedger(Protocol):
    """The durable record of annotations and training jobs: the seam between the loop and its
    database. `Ledger` (SQLite in MODEL_DIR, the embedded default) is the implementation today;
    another database can take its place if it keeps the same promises: a write is durable when
    the call returns, out-of-order updates are ignored, deletions leave tombstones, and
    `request_job` never queues a kind twice for a project, even with several writers."""

    def upsert(self, records: Sequence[AnnotationRecord]) -> int: ...

    def delete(self, annotation_ids: Sequence[int], *, project_id: int | None = None) -> int: ...

    def reconcile(
        self,
        project_id: int,
        records: Sequence[AnnotationRecord],
        *,
        as_of: float | None = None,
    ) -> ReconcileResult: ...

    def training_set(self, project_id: int) -> list[TrainingExample]: ...

    def change_seq(self, project_id: int) -> int: ...

    def last_change_at(self, project_id: int) -> float | None: ...

    def projects(self) -> list[int]: ...

    def set_label_config(self, project_id: int, xml: str) -> bool: ...

    def label_config(self, project_id: int) -> str | None: ...

    def stats(self, project_id: int | None = None) -> dict[str, int]: ...

    def create_job(self, project_id: int, kind: str, trigger: str) -> Job: ...

    def request_job(self, project_id: int, kind: str, trigger: str) -> Job: ...

    def update_job(self, job_id: int, **fields: Any) -> Job: ...

    def job(self, job_id: int) -> Job | None: ...

    def jobs(self, *, project_id: int | None = None, limit: int = 20) -> list[Job]: ...

    def pending_jobs(self) -> list[Job]: ...

    def recover_interrupted(self) -> list[Job]: ...

    def close(self) -> None: ...


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = _connect(self.path)
            self._init_schema()
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(
                f"cannot open the annotation ledger {self.path}: {exc}; check that "
                f"{self.path.parent} is writable and that the file is a labelloop ledger "
                "(move a damaged file aside to start an empty one)"
            ) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed before the caller returns. IMMEDIATE takes the write lock
        up front, so a read-then-write is atomic also against another process on the file."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    def _init_schema(self) -> None:
        with self._write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif row["value"] != str(SCHEMA_VERSION):
                raise LedgerError(
                    f"the ledger {self.path} has schema version {row['value']}, this labelloop "
                    f"reads version {SCHEMA_VERSION}; use the labelloop that wrote it, or move "
                    "the file aside to start an empty ledger"
                )

    # -- annotations --------------------------------------------------------------------------

    def upsert(self, records: Sequence[AnnotationRecord]) -> int:
        """Store annotations; returns how many were new or changed (labels, flags, image).

        A record older than the stored one (by ``updated_at``) is ignored: webhooks can arrive
        out of order. A record of a deleted annotation is ignored too (see the module doc).
        """
        rows = [_row_of(record) for record in records]
        now = time.time()
        changes: Counter[int] = Counter()
        with self._write() as conn:
            _ensure_projects(conn, {row.project_id for row in rows})
            for row in rows:
                if _apply(conn, row, now, revive_before=None) != "unchanged":
                    changes[row.project_id] += 1
            _count_changes(conn, changes, now)
        return sum(changes.values())

    def delete(self, annotation_ids: Sequence[int], *, project_id: int | None = None) -> int:
        """Tombstone annotations (of ``project_id`` only, when given); returns how many were
        live. Unknown and already deleted ids are ignored."""
        ids = [_require_int(value, "annotation id") for value in annotation_ids]
        now = time.time()
        changes: Counter[int] = Counter()
        with self._write() as conn:
            for annotation_id in ids:
                sql = (
                    "UPDATE annotations SET deleted_at = ? "
                    "WHERE annotation_id = ? AND deleted_at IS NULL"
                )
                params: tuple[object, ...] = (now, annotation_id)
                if project_id is not None:
                    sql += " AND project_id = ?"
                    params += (project_id,)
                for (project,) in conn.execute(sql + " RETURNING project_id", params).fetchall():
                    changes[project] += 1
            _count_changes(conn, changes, now)
        return sum(changes.values())

    def reconcile(
        self,
        project_id: int,
        records: Sequence[AnnotationRecord],
        *,
        as_of: float | None = None,
    ) -> ReconcileResult:
        """Make the project match a full snapshot of its annotations from the Label Studio API.

        Upserts every record (reviving deleted ones the snapshot still holds) and tombstones
        every live annotation the snapshot lacks. ``as_of``: unix time the snapshot was started;
        annotations received, or deleted, after it are left as they are, since the snapshot may
        predate them.
        """
        rows = [_row_of(record) for record in records]
        foreign = sorted({row.project_id for row in rows} - {project_id})
        if foreign:
            raise ValueError(
                f"reconcile of project {project_id} got annotations of projects {foreign}; "
                "reconcile each project with its own snapshot"
            )
        cutoff = math.inf if as_of is None else as_of
        now = time.time()
        outcomes: Counter[str] = Counter()
        with self._write() as conn:
            _ensure_projects(conn, {project_id})
            for row in rows:
                outcomes[_apply(conn, row, now, revive_before=cutoff)] += 1
            outcomes["deleted"] = _tombstone_missing(
                conn, project_id, {row.annotation_id for row in rows}, cutoff, now
            )
            changed = outcomes.total() - outcomes["unchanged"]
            _count_changes(conn, Counter({project_id: changed}), now)
        result = ReconcileResult(outcomes["added"], outcomes["updated"], outcomes["deleted"])
        logger.info("Reconciled project %d with %d annotations: %s", project_id, len(rows), result)
        return result

    def training_set(self, project_id: int) -> list[TrainingExample]:
        """One example per task with an image, ordered by task id (see ``_pick``)."""
        with self._read() as conn:
            return _training_set(conn, project_id)

    def _project_value(self, project_id: int, column: str) -> Any:
        """One column of the project's row; None for an unknown project."""
        if column not in _PROJECT_COLUMNS:
            raise ValueError(f"unknown project column {column!r}")
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {column} FROM projects WHERE project_id = ?", (project_id,)
            ).fetchone()
        return None if row is None else row[column]

    def change_seq(self, project_id: int) -> int:
        """Grows by one per new, changed or deleted annotation; 0 for an unknown project."""
        return int(self._project_value(project_id, "change_seq") or 0)

    def last_change_at(self, project_id: int) -> float | None:
        """Unix time of the project's latest annotation change; None before the first."""
        return self._project_value(project_id, "last_change_at")

    def projects(self) -> list[int]:
        """Every project with annotations, a label config or jobs, by id."""
        with self._read() as conn:
            rows = conn.execute("SELECT project_id FROM projects ORDER BY project_id").fetchall()
        return [row["project_id"] for row in rows]

    def set_label_config(self, project_id: int, xml: str) -> bool:
        """Remember the project's label config; True when it differs from the stored one."""
        if not isinstance(xml, str) or not xml.strip():
            raise ValueError(
                f"the label config of project {project_id} is empty; pass the project's "
                "<View>...</View> XML"
            )
        with self._write() as conn:
            _ensure_projects(conn, {project_id})
            changed = conn.execute(
                "UPDATE projects SET label_config = ? "
                "WHERE project_id = ? AND label_config IS NOT ?",
                (xml, project_id, xml),
            ).rowcount
        if changed:
            logger.info("Label config of project %d changed", project_id)
        return bool(changed)

    def label_config(self, project_id: int) -> str | None:
        return self._project_value(project_id, "label_config")

    def stats(self, project_id: int | None = None) -> dict[str, int]:
        """Annotation counts (of one project, or of all): all rows, live, live cancelled,
        deleted, live ground truth, and tasks in the training set."""
        where, params = _project_filter(project_id)
        with self._read() as conn:
            row = conn.execute(
                "SELECT COUNT(*) AS annotations,"
                " COALESCE(SUM(deleted_at IS NULL), 0) AS live,"
                " COALESCE(SUM(deleted_at IS NULL AND was_cancelled), 0) AS cancelled,"
                " COALESCE(SUM(deleted_at IS NOT NULL), 0) AS deleted,"
                " COALESCE(SUM(deleted_at IS NULL AND ground_truth), 0) AS ground_truth"
                f" FROM annotations {where}",
                params,
            ).fetchone()
            projects = [project_id] if project_id is not None else _project_ids(conn)
            training = sum(len(_training_set(conn, project)) for project in projects)
        return {**{key: int(row[key]) for key in row.keys()}, "training_tasks": training}

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(self, project_id: int, kind: str, trigger: str) -> Job:
        """A new job in state "queued", requested now."""
        _check_job_request(kind, trigger)
        with self._write() as conn:
            job = _insert_job(conn, project_id, kind, trigger)
        logger.info("Queued %s job %d for project %d (%s)", kind, job.id, project_id, trigger)
        return job

    def request_job(self, project_id: int, kind: str, trigger: str) -> Job:
        """The project's queued job of this kind, or a new one: requests coalesce.

        Check and insert share one write transaction, so concurrent requests (threads, or
        processes on the same file) never queue the same kind twice.
        """
        _check_job_request(kind, trigger)
        with self._write() as conn:
            row = conn.execute(
                "SELECT id FROM jobs WHERE project_id = ? AND kind = ? AND state = 'queued' "
                "ORDER BY id LIMIT 1",
                (project_id, kind),
            ).fetchone()
            if row is not None:
                return _job(conn, int(row[0]))
            job = _insert_job(conn, project_id, kind, trigger)
        logger.info("Queued %s job %d for project %d (%s)", kind, job.id, project_id, trigger)
        return job

    def update_job(self, job_id: int, **fields: Any) -> Job:
        """Set some of the job's fields (see ``_JOB_FIELDS``); returns the job as stored.

        Raises ValueError for an unknown field, state or value type, KeyError for an unknown job.
        """
        values = {name: _job_value(name, value) for name, value in fields.items()}
        with self._write() as conn:
            if values:
                assignments = ", ".join(f"{name} = ?" for name in values)
                conn.execute(
                    f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id)
                )
            return _job(conn, job_id)

    def job(self, job_id: int) -> Job | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job_of(row)

    def jobs(self, *, project_id: int | None = None, limit: int = 20) -> list[Job]:
        """The newest jobs first, of one project or of all."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        where, params = _project_filter(project_id)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [_job_of(row) for row in rows]

    def pending_jobs(self) -> list[Job]:
        """Queued jobs, oldest first: the order the trainer runs them."""
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id").fetchall()
        return [_job_of(row) for row in rows]

    def recover_interrupted(self) -> list[Job]:
        """At start-up: jobs left "running" died with the process. Each becomes "failed" and is
        queued again (trigger "recovery"); returns the new jobs."""
        now = time.time()
        with self._write() as conn:
            running = conn.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY id")
            recovered = []
            for old in [_job_of(row) for row in running.fetchall()]:
                conn.execute(
                    "UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE id = ?",
                    (now, _INTERRUPTED, old.id),
                )
                cursor = conn.execute(
                    "INSERT INTO jobs (project_id, kind, trigger, state, requested_at) "
                    "VALUES (?, ?, 'recovery', 'queued', ?)",
                    (old.project_id, old.kind, now),
                )
                recovered.append(_job(conn, _require_int(cursor.lastrowid, "job id")))
                logger.warning(
                    "Job %d (%s, project %d) was interrupted by a restart: queued again as %d",
                    old.id,
                    old.kind,
                    old.project_id,
                    recovered[-1].id,
                )
        return recovered


# --------------------------------------------------------------------------- SQL helpers


def _check_job_request(kind: str, trigger: str) -> None:
    for name, value in (("kind", kind), ("trigger", trigger)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"a job needs a non-empty {name} string, got {value!r}")


def _insert_job(conn: sqlite3.Connection, project_id: int, kind: str, trigger: str) -> Job:
    _ensure_projects(conn, {project_id})
    cursor = conn.execute(
        "INSERT INTO jobs (project_id, kind, trigger, state, requested_at) "
        "VALUES (?, ?, ?, 'queued', ?)",
        (project_id, str(kind), trigger, time.time()),
    )
    return _job(conn, _require_int(cursor.lastrowid, "job id"))


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (Ledger._write), never implicit.
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 5000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        # Still correct, only readers (e.g. `labelloop status`) may wait for writers.
        logger.warning("The ledger %s runs in %s journal mode: WAL is not available", path, mode)
    # FULL, not WAL's usual NORMAL: NORMAL can lose the last commits on power loss, and those
    # are annotations Label Studio will not send again.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _ensure_projects(conn: sqlite3.Connection, project_ids: Iterable[int]) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO projects (project_id) VALUES (?)",
        [(_require_int(project_id, "project id"),) for project_id in project_ids],
    )


def _project_filter(project_id: int | None) -> tuple[str, tuple[int, ...]]:
    """A WHERE clause for one project, or none for all."""
    return ("WHERE project_id = ?", (project_id,)) if project_id is not None else ("", ())


def _project_ids(conn: sqlite3.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT project_id FROM projects ORDER BY project_id")]


def _count_changes(conn: sqlite3.Connection, changes: Mapping[int, int], now: float) -> None:
    conn.executemany(
        "UPDATE projects SET change_seq = change_seq + ?, last_change_at = ? WHERE project_id = ?",
        [(count, now, project_id) for project_id, count in changes.items() if count],
    )


def _apply(conn: sqlite3.Connection, row: _Row, now: float, *, revive_before: float | None) -> str:
    """Store one annotation; returns "added", "updated" or "unchanged".

    ``revive_before``: a tombstone older than this is revived (reconcile); None never revives.
    """
    stored = conn.execute(
        "SELECT task_id, image_ref, labels, updated_ts, was_cancelled, ground_truth, deleted_at "
        "FROM annotations WHERE project_id = ? AND annotation_id = ?",
        (row.project_id, row.annotation_id),
    ).fetchone()
    if stored is None:
        _insert(conn, row, now)
        return "added"
    revived = stored["deleted_at"] is not None
    if revived and (revive_before is None or stored["deleted_at"] >= revive_before):
        return "unchanged"
    if row.updated_ts < stored["updated_ts"]:
        if revived:
            conn.execute(
                "UPDATE annotations SET deleted_at = NULL, received_at = ? "
                "WHERE project_id = ? AND annotation_id = ?",
                (now, row.project_id, row.annotation_id),
            )
            return "added"
        logger.debug("Annotation %d: older update ignored", row.annotation_id)
        return "unchanged"
    image_ref = row.image_ref if row.image_ref is not None else stored["image_ref"]
    # What makes a change: a new updated_at or annotator alone does not.
    before = (
        stored["task_id"],
        stored["image_ref"],
        stored["labels"],
        bool(stored["was_cancelled"]),
        bool(stored["ground_truth"]),
    )
    conn.execute(
        "UPDATE annotations SET task_id = ?, image_ref = ?, labels = ?, updated_at = ?,"
        " updated_ts = ?, was_cancelled = ?, ground_truth = ?, completed_by = ?,"
        " received_at = ?, deleted_at = NULL WHERE project_id = ? AND annotation_id = ?",
        (
            row.task_id,
            image_ref,
            row.labels,
            row.updated_at,
            row.updated_ts,
            row.was_cancelled,
            row.ground_truth,
            row.completed_by,
            now,
            row.project_id,
            row.annotation_id,
        ),
    )
    if revived:
        return "added"
    after = (row.task_id, image_ref, row.labels, row.was_cancelled, row.ground_truth)
    return "updated" if after != before else "unchanged"


def _insert(conn: sqlite3.Connection, row: _Row, now: float) -> None:
    conn.execute(
        "INSERT INTO annotations (project_id, annotation_id, task_id, image_ref, labels,"
        " updated_at, updated_ts, was_cancelled, ground_truth, completed_by, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            row.project_id,
            row.annotation_id,
            row.task_id,
            row.image_ref,
            row.labels,
            row.updated_at,
            row.updated_ts,
            row.was_cancelled,
            row.ground_truth,
            row.completed_by,
            now,
        ),
    )


def _tombstone_missing(
    conn: sqlite3.Connection, project_id: int, present: set[int], cutoff: float, now: float
) -> int:
    live = conn.execute(
        "SELECT annotation_id, received_at FROM annotations "
        "WHERE project_id = ? AND deleted_at IS NULL",
        (project_id,),
    ).fetchall()
    missing = [
        (now, project_id, row["annotation_id"])
        for row in live
        if row["annotation_id"] not in present and row["received_at"] < cutoff
    ]
    conn.executemany(
        "UPDATE annotations SET deleted_at = ? WHERE project_id = ? AND annotation_id = ?", missing
    )
    return len(missing)


def _training_set(conn: sqlite3.Connection, project_id: int) -> list[TrainingExample]:
    rows = conn.execute(
        "SELECT annotation_id, task_id, image_ref, labels, updated_at, updated_ts,"
        " was_cancelled, ground_truth FROM annotations"
        " WHERE project_id = ? AND deleted_at IS NULL ORDER BY task_id",
        (project_id,),
    ).fetchall()
    by_task: dict[int, list[sqlite3.Row]] = defaultdict(list)
    for row in rows:
        by_task[row["task_id"]].append(row)
    examples = []
    for task_id, task_rows in by_task.items():
        winner = _pick(task_rows)
        # The image belongs to the task: another annotation of it may be the one that knows it.
        image_ref = winner["image_ref"] if winner else None
        image_ref = image_ref or next((r["image_ref"] for r in task_rows if r["image_ref"]), None)
        if winner is None or image_ref is None:
            continue
        examples.append(
            TrainingExample(
                task_id=task_id,
                annotation_id=winner["annotation_id"],
                image_ref=image_ref,
                labels=_labels_of(winner["labels"]),
                updated_at=winner["updated_at"],
                ground_truth=bool(winner["ground_truth"]),
            )
        )
    return examples


def _pick(rows: Sequence[sqlite3.Row]) -> sqlite3.Row | None:
    """The annotation that labels a task (``winning_annotation``: skips never count, a ground
    truth beats any other, then the latest updated_ts, then the higher id)."""
    return winning_annotation(rows, _rank)


def _rank(row: sqlite3.Row) -> AnnotationRank:
    return AnnotationRank(
        was_cancelled=bool(row["was_cancelled"]),
        ground_truth=bool(row["ground_truth"]),
        updated_ts=row["updated_ts"],
        annotation_id=row["annotation_id"],
    )


def _job(conn: sqlite3.Connection, job_id: int) -> Job:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise KeyError(f"no training job {job_id} in the ledger")
    return _job_of(row)


def _job_of(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["metrics"] = json.loads(values["metrics"]) if values["metrics"] else {}
    return Job(**values)


# --------------------------------------------------------------------------- values


def _row_of(record: AnnotationRecord) -> _Row:
    try:
        updated_ts = parse_timestamp(record.updated_at).timestamp()
    except (TypeError, ValueError):
        raise ValueError(
            f"annotation {record.annotation_id} has updated_at {record.updated_at!r}, expected "
            'an ISO 8601 time such as "2026-11-25T00:48:58.292197Z"'
        ) from None
    return _Row(
        project_id=_require_int(record.project_id, "project id"),
        annotation_id=_require_int(record.annotation_id, "annotation id"),
        task_id=_require_int(record.task_id, "task id"),
        image_ref=record.image_ref or None,
        labels=_labels_json(record.labels, record.annotation_id),
        updated_at=record.updated_at,
        updated_ts=updated_ts,
        was_cancelled=bool(record.was_cancelled),
        ground_truth=bool(record.ground_truth),
        completed_by=record.completed_by,
    )


def _labels_json(labels: Mapping[str, Sequence[str]], annotation_id: int) -> str:
    for name, values in labels.items():
        if isinstance(values, str) or not all(isinstance(v, str) for v in values):
            raise ValueError(
                f"annotation {annotation_id}: labels of control {name!r} must be a tuple of "
                f"strings, got {values!r}"
            )
    # Sorted keys: the same labels always give the same string, so comparing strings finds
    # real changes.
    return json.dumps({name: list(values) for name, values in labels.items()}, sort_keys=True)


def _labels_of(text: str) -> dict[str, tuple[str, ...]]:
    return {name: tuple(values) for name, values in json.loads(text).items()}


def _require_int(value: object, what: str) -> int:
    # bool is an int subclass: True is a bug upstream, not id 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value


def _job_value(name: str, value: object) -> object:
    """A job field's value as stored; ValueError when the field or value is not allowed."""
    if name not in _JOB_FIELDS:
        raise ValueError(f"jobs have no field {name!r}; allowed: {sorted(_JOB_FIELDS)}")
    if name == "state" and value not in JOB_STATES:
        raise ValueError(f"job state must be one of {sorted(JOB_STATES)}, got {value!r}")
    if value is None:
        return None
    types = _JOB_FIELDS[name]
    if not isinstance(value, types) or isinstance(value, bool):
        expected = " or ".join(t.__name__ for t in types)
        raise ValueError(f"job field {name} must be {expected} or None, got {value!r}")
    if name == "metrics":
        return json.dumps(_json_safe(value, "metrics"))
    if isinstance(value, str):
        return str(value)  # an enum member (JobState) is stored as its plain value
    return value


def _json_safe(value: object, where: str) -> object:
    """Metrics as plain JSON: /metrics and `labelloop status` serve them as they are."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        # JSON has no NaN or infinity: an undefined score (F1 of an absent class) becomes null.
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    to_list = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(to_list):
        return _json_safe(to_list(), where)
    raise ValueError(
        f"{where} is a {type(value).__name__}, which JSON cannot hold; store numbers, strings, "
        "lists or dicts"
    )
