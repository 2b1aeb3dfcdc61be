"""The durable annotation ledger and the background trainer's job store: one SQLite file
(embedded, the default) or one PostgreSQL database (several serving replicas and workers).

Label Studio tells the backend about annotations once, by webhook, with a 1 s timeout and no
retry: what the ledger acknowledges must survive a crash. Every write commits before it returns
(SQLite with synchronous=FULL), so a webhook is answered only once its annotations are durable.

Rules the training set relies on:

* Webhooks can arrive out of order: an annotation older (by Label Studio's ``updated_at``) than
  the stored one does not overwrite it.
* Deletions are tombstones (``deleted_at``), never row removals. Label Studio never reuses an
  annotation id, so a tombstone is final for ``upsert``: a late update of a deleted annotation
  does not bring it back. Only ``reconcile``, a full snapshot from the API, revives one.
* A record without an image keeps the image already known for its annotation.

Why SQLAlchemy Core: one copy of the SQL (``text()`` that both dialects read), of the schema
(``MetaData``, created on start-up) and of the migrations, instead of two stores that drift
apart; its pool reconnects after a database restart. No ORM: the rules above are a few plain
statements on a handful of tables.

Writes are serialized, so each read-then-write (the out-of-order rule in ``_apply``,
``request_job``'s coalescing, claims, counters) is atomic against every other writer, in this
process or another:

* In the process, one write at a time (a lock): threads queue there rather than in SQLite's
  busy handler or on pooled PostgreSQL connections, since the database serializes writes anyway.
* SQLite: a write transaction starts with BEGIN IMMEDIATE, which takes the file's write lock
  before the first read.
* PostgreSQL: a write transaction first takes one transaction-scoped advisory lock
  (``pg_advisory_xact_lock`` on a constant key), which COMMIT, ROLLBACK or a lost connection
  release. Under READ COMMITTED every later statement then sees what the previous holders
  committed. Row locks alone would not do: ``request_job`` checks for a row that does not exist
  yet. SERIALIZABLE would, but with retries on serialization failures; the writes are small (a
  webhook's annotations, a job row), so queueing them behind one lock costs little.

Reads take no lock: SQLite's WAL and PostgreSQL's MVCC give them a consistent view.

A database that cannot be reached (PostgreSQL restarting, a file locked too long) raises
LedgerError, which the HTTP layer answers with 503. Connections are checked before use
(``pool_pre_ping``), so the same Ledger works again once the database is back.

Times: the ledger's own clock (received, deleted, changed, job and lease times) is unix seconds;
Label Studio's ``updated_at`` is kept as the ISO string it sent, plus its unix value for
ordering.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import (
    REAL,
    BigInteger,
    Column,
    Connection,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    RowMapping,
    Table,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.types import TypeEngine

from labelloop.errors import StoreError
from labelloop.labelstudio.annotations import (
    AnnotationRank,
    AnnotationRecord,
    parse_timestamp,
    winning_annotation,
)
from labelloop.loop.jobs import JobState

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

SCHEMA_VERSION = 2
# Stored as plain strings; loop.jobs.JobState says what each means.
JOB_STATES = frozenset(str(state) for state in JobState)
_INTERRUPTED = "interrupted (backend restarted)"
_LEASE_EXPIRED = "worker lost: its lease expired"
# Columns `_project_value` may read: the name goes into SQL, so only these.
_PROJECT_COLUMNS = frozenset({"label_config", "change_seq", "last_change_at"})
# Fields update_job accepts, with the types each may hold besides None. Not worker and
# lease_until: only claims and renewals hand those out, under the single-flight rule.
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
_BUSY_TIMEOUT_S = 5.0
# Every labelloop writer of a PostgreSQL ledger must use the same key; any constant does
# ("labellop" in ASCII, below 2**63 as bigint wants).
_PG_LOCK_KEY = 0x6C6162656C6C6F70
# The execution option that makes a connection's transaction a write (BEGIN IMMEDIATE).
_WRITE_OPTION = "labelloop_ledger_write"

# --------------------------------------------------------------------------- schema

_metadata = MetaData()
# SQLite's declared types stay those schema 1 wrote. On PostgreSQL REAL is 4 bytes, too coarse
# for unix times, and Label Studio's ids and the counters get 8 bytes.
_REAL: TypeEngine[float] = Double[float]().with_variant(REAL(), "sqlite")
_INT = Integer().with_variant(BigInteger(), "postgresql")

_meta = Table(
    "meta",
    _metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text),
)
_projects = Table(
    "projects",
    _metadata,
    Column("project_id", _INT, primary_key=True, autoincrement=False),
    Column("label_config", Text),
    Column("change_seq", _INT, nullable=False, server_default=text("0")),
    Column("last_change_at", _REAL),
)
_annotations = Table(
    "annotations",
    _metadata,
    Column(
        "project_id",
        _INT,
        ForeignKey("projects.project_id"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("annotation_id", _INT, primary_key=True, autoincrement=False),
    Column("task_id", _INT, nullable=False),
    Column("image_ref", Text),
    Column("labels", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("updated_ts", _REAL, nullable=False),
    # 0 or 1, as schema 1 stored them in SQLite: the same SQL reads both databases.
    Column("was_cancelled", Integer, nullable=False),
    Column("ground_truth", Integer, nullable=False),
    Column("completed_by", _INT),
    Column("received_at", _REAL, nullable=False),
    Column("deleted_at", _REAL),
    Index("annotations_by_task", "project_id", "task_id"),
    # ANNOTATIONS_DELETED may come without a usable project: deletes look ids up alone.
    Index("annotations_by_id", "annotation_id"),
)
_jobs = Table(
    "jobs",
    _metadata,
    Column("id", _INT, primary_key=True),
    Column("project_id", _INT, ForeignKey("projects.project_id"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("trigger", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("requested_at", _REAL, nullable=False),
    Column("started_at", _REAL),
    Column("finished_at", _REAL),
    Column("progress", Text),
    Column("metrics", Text),
    Column("error", Text),
    Column("candidate_version", Text),
    Column("promoted_version", Text),
    Column("trained_seq", _INT),
    Column("worker", Text),  # schema 2
    Column("lease_until", _REAL),  # schema 2
    Index("jobs_by_state", "state", "id"),
    # AUTOINCREMENT: a job id is never reused, even after the newest job is gone (PostgreSQL's
    # sequences never reuse one anyway).
    sqlite_autoincrement=True,
)
_version_counters = Table(  # schema 2
    "version_counters",
    _metadata,
    Column("lineage", Text, primary_key=True),
    Column("last", _INT, nullable=False),
)


class LedgerError(StoreError):
    """The ledger cannot be opened or reached, or was written by another schema version."""


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
    # Set by claim_job: who runs the job, and until when it counts as alive (renew_lease).
    worker: str | None = None
    lease_until: float | None = None

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

    def params(self, now: float) -> dict[str, object]:
        # Flags as 0/1: PostgreSQL does not cast a boolean parameter to an integer column.
        return {
            **asdict(self),
            "was_cancelled": int(self.was_cancelled),
            "ground_truth": int(self.ground_truth),
            "now": now,
        }


class AnnotationLedger(Protocol):
    """The durable record of annotations and training jobs: the seam between the loop and its
    database. `Ledger` is the implementation, on SQLite (a file in MODEL_DIR, the embedded
    default) or PostgreSQL (several replicas and workers); another database can take its place
    if it keeps the same promises: a write is durable when the call returns, out-of-order updates
    are ignored, deletions leave tombstones, `request_job` never queues a kind twice for a
    project, `claim_job` never runs two jobs of a project at once and `next_version_number`
    never hands out a number twice, even with several writers."""

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

    def claim_job(self, job_id: int, *, worker: str, lease_s: float) -> Job | None: ...

    def renew_lease(self, job_id: int, *, worker: str, lease_s: float) -> bool: ...

    def expire_leases(self, now: float | None = None) -> list[Job]: ...

    def job(self, job_id: int) -> Job | None: ...

    def jobs(self, *, project_id: int | None = None, limit: int = 20) -> list[Job]: ...

    def pending_jobs(self) -> list[Job]: ...

    def recover_interrupted(self) -> list[Job]: ...

    def next_version_number(self, lineage: str, *, at_least: int = 1) -> int: ...

    def close(self) -> None: ...


class Ledger:
    """The ledger on SQLite (``Ledger(path)``: a file, made with its folder when missing) or on
    PostgreSQL (``Ledger("postgresql://user:password@host:port/database")``; the tables are made
    in the database when missing, the database itself must exist). One object serves every
    thread. ``url`` names the database without its password, for messages and logs; ``path`` is
    the SQLite file, None on PostgreSQL."""

    def __init__(self, location: Path | str) -> None:
        url, self.path = _parse_location(location)
        self.url = url.render_as_string(hide_password=True)
        self._password = url.password
        self._postgres = url.get_backend_name() == "postgresql"
        # Where messages say the ledger is: the file, or the URL.
        self._where = str(self.path) if self.path is not None else self.url
        self._write_lock = threading.Lock()  # see the module doc
        self._engine: Engine | None = None
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._engine = (
                _postgres_engine(url) if self._postgres else _sqlite_engine(url, self._where)
            )
            self._init_schema()
        except LedgerError:
            self.close()
            raise
        except (SQLAlchemyError, OSError) as exc:
            self.close()
            raise LedgerError(self._cannot_open(exc)) from exc
        logger.debug("Annotation ledger: %s", self._where)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self._where!r})"

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, write: bool, snapshot: bool = False) -> Iterator[Connection]:
        """A connection in a transaction, committed (write) or rolled back (read) at the end.

        A write is serialized against every other writer (see the module doc). ``snapshot``: a
        read of several statements sees one state of the database.
        """
        assert self._engine is not None, "the ledger failed to open"
        lock: AbstractContextManager[Any] = self._write_lock if write else nullcontext()
        with lock, self._engine.connect() as conn:
            if not write:
                # Both databases begin a transaction with the first statement (SQLite: a
                # deferred BEGIN, one snapshot until it ends); closing rolls it back.
                if snapshot and self._postgres:
                    conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
                yield conn
                return
            conn.execution_options(**{_WRITE_OPTION: True})  # see _sqlite_engine's "begin"
            with conn.begin():
                if self._postgres:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
                yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction, committed before the caller returns."""
        with self._reachable(), self._transaction(write=True) as conn:
            yield conn

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        with self._reachable(), self._transaction(write=False, snapshot=snapshot) as conn:
            yield conn

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """The database going away becomes LedgerError (503 over HTTP); the pool replaces the
        broken connections by itself once it is back. Any other database error is a bug here
        and stays as it is."""
        try:
            yield
        except (OperationalError, InterfaceError, PoolTimeoutError) as exc:
            raise LedgerError(self._unreachable(exc)) from exc
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            raise LedgerError(self._unreachable(exc)) from exc

    def _reason(self, exc: BaseException) -> str:
        """The driver's own words, on one line: SQLAlchemy's text would add the statement and
        its parameters (annotations); a password never appears."""
        orig = getattr(exc, "orig", None)
        reason = " ".join(str(orig if orig is not None else exc).split()) or type(exc).__name__
        return reason.replace(self._password, "***") if self._password else reason

    def _cannot_open(self, exc: BaseException) -> str:
        if self._postgres:
            return (
                f"cannot open the annotation ledger {self.url}: {self._reason(exc)}; check that "
                "PostgreSQL runs there and accepts connections, that the database exists "
                "(createdb) and that the user may connect to it and create tables"
            )
        assert self.path is not None
        return (
            f"cannot open the annotation ledger {self.path}: {self._reason(exc)}; check that "
            f"{self.path.parent} is writable and that the file is a labelloop ledger "
            "(move a damaged file aside to start an empty one)"
        )

    def _unreachable(self, exc: BaseException) -> str:
        if self._postgres:
            return (
                f"the annotation ledger {self.url} cannot be reached: {self._reason(exc)}; check "
                "that PostgreSQL is running and accepts connections there (the ledger "
                "reconnects by itself once it does)"
            )
        assert self.path is not None
        return (
            f"the annotation ledger {self.path} cannot be used: {self._reason(exc)}; check that "
            f"the disk is not full, that {self.path.parent} is writable and that no other "
            "program keeps the file locked"
        )

    def _init_schema(self) -> None:
        # A write transaction: replicas starting together create the tables once, and
        # migrate once; DDL is transactional in both databases.
        with self._transaction(write=True) as conn:
            _metadata.create_all(conn, tables=[_meta])
            stored = conn.execute(
                text("SELECT value FROM meta WHERE key = 'schema_version'")
            ).scalar()
            if stored is None:
                _metadata.create_all(conn)
                conn.execute(
                    text("INSERT INTO meta (key, value) VALUES ('schema_version', :version)"),
                    {"version": str(SCHEMA_VERSION)},
                )
                return
            version = int(stored) if str(stored).isdigit() else None
            if version is None or not 1 <= version <= SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger {self._where} has schema version {stored}, this labelloop "
                    f"reads versions up to {SCHEMA_VERSION}; use the labelloop that wrote it, "
                    "or start an empty ledger (move the file aside, or use another database)"
                )
            while version < SCHEMA_VERSION:
                _MIGRATIONS[version](conn)
                version += 1
                conn.execute(
                    text("UPDATE meta SET value = :version WHERE key = 'schema_version'"),
                    {"version": str(version)},
                )
                logger.info("Ledger %s migrated to schema version %d", self._where, version)

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
        sql = "UPDATE annotations SET deleted_at = :now WHERE annotation_id = :id"
        sql += " AND deleted_at IS NULL"
        if project_id is not None:
            sql += " AND project_id = :project_id"
        statement = text(sql + " RETURNING project_id")
        with self._write() as conn:
            for annotation_id in ids:
                params = {"now": now, "id": annotation_id, "project_id": project_id}
                for project in conn.execute(statement, params).scalars():
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
            return conn.execute(
                text(f"SELECT {column} FROM projects WHERE project_id = :project_id"),
                {"project_id": project_id},
            ).scalar()

    def change_seq(self, project_id: int) -> int:
        """Grows by one per new, changed or deleted annotation; 0 for an unknown project."""
        return int(self._project_value(project_id, "change_seq") or 0)

    def last_change_at(self, project_id: int) -> float | None:
        """Unix time of the project's latest annotation change; None before the first."""
        return self._project_value(project_id, "last_change_at")

    def projects(self) -> list[int]:
        """Every project with annotations, a label config or jobs, by id."""
        with self._read() as conn:
            return _project_ids(conn)

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
                text(
                    "UPDATE projects SET label_config = :xml WHERE project_id = :project_id"
                    " AND (label_config IS NULL OR label_config <> :xml)"
                ),
                {"xml": xml, "project_id": project_id},
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
        with self._read(snapshot=True) as conn:
            row = (
                conn.execute(
                    text(
                        "SELECT COUNT(*) AS annotations,"
                        " COALESCE(SUM(CASE WHEN deleted_at IS NULL THEN 1 ELSE 0 END), 0)"
                        " AS live,"
                        " COALESCE(SUM(CASE WHEN deleted_at IS NULL AND was_cancelled <> 0"
                        " THEN 1 ELSE 0 END), 0) AS cancelled,"
                        " COALESCE(SUM(CASE WHEN deleted_at IS NOT NULL THEN 1 ELSE 0 END), 0)"
                        " AS deleted,"
                        " COALESCE(SUM(CASE WHEN deleted_at IS NULL AND ground_truth <> 0"
                        f" THEN 1 ELSE 0 END), 0) AS ground_truth FROM annotations {where}"
                    ),
                    params,
                )
                .mappings()
                .one()
            )
            projects = [project_id] if project_id is not None else _project_ids(conn)
            training = sum(len(_training_set(conn, project)) for project in projects)
        return {**{key: int(value) for key, value in row.items()}, "training_tasks": training}

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
        processes on the same database) never queue the same kind twice.
        """
        _check_job_request(kind, trigger)
        with self._write() as conn:
            queued = conn.execute(
                text(
                    "SELECT id FROM jobs WHERE project_id = :project_id AND kind = :kind"
                    " AND state = 'queued' ORDER BY id LIMIT 1"
                ),
                {"project_id": project_id, "kind": str(kind)},
            ).scalar()
            if queued is not None:
                return _job(conn, int(queued))
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
                # The names come from _JOB_FIELDS only (checked above), never from the caller.
                assignments = ", ".join(f"{name} = :{name}" for name in values)
                conn.execute(
                    text(f"UPDATE jobs SET {assignments} WHERE id = :job_id"),
                    {**values, "job_id": job_id},
                )
            return _job(conn, job_id)

    def claim_job(self, job_id: int, *, worker: str, lease_s: float) -> Job | None:
        """Start a queued job on ``worker``: it becomes "running" (started now, progress
        "starting") with a lease of ``lease_s`` seconds, which the worker keeps alive with
        ``renew_lease`` and ``expire_leases`` ends.

        Returns None, and changes nothing, when the job is not queued (any more; or unknown) or
        when another job of its project is running: one job per project at a time, whichever
        worker or process claims it (a job whose lease ran out counts until ``expire_leases``
        ends it).
        """
        name = _check_worker(worker)
        lease = _check_lease(lease_s)
        now = time.time()
        with self._write() as conn:
            row = (
                conn.execute(
                    text(
                        "UPDATE jobs SET state = 'running', started_at = :now, worker = :worker,"
                        " lease_until = :lease_until, progress = 'starting'"
                        " WHERE id = :job_id AND state = 'queued' AND NOT EXISTS ("
                        "SELECT 1 FROM jobs AS other WHERE other.project_id = jobs.project_id"
                        " AND other.state = 'running') RETURNING *"
                    ),
                    {"now": now, "worker": name, "lease_until": now + lease, "job_id": job_id},
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        job = _job_of(row)
        logger.info(
            "Worker %s claimed %s job %d of project %d", name, job.kind, job.id, job.project_id
        )
        return job

    def renew_lease(self, job_id: int, *, worker: str, lease_s: float) -> bool:
        """Extend the lease of a job ``worker`` runs to ``lease_s`` seconds from now. False when
        the job no longer runs under that worker (finished, or its lease expired and the job was
        queued again): the worker should then stop working on it."""
        name = _check_worker(worker)
        lease = _check_lease(lease_s)
        with self._write() as conn:
            renewed = conn.execute(
                text(
                    "UPDATE jobs SET lease_until = :lease_until"
                    " WHERE id = :job_id AND state = 'running' AND worker = :worker"
                ),
                {"lease_until": time.time() + lease, "job_id": job_id, "worker": name},
            ).rowcount
        return renewed == 1

    def expire_leases(self, now: float | None = None) -> list[Job]:
        """Jobs whose worker let its lease run out (before ``now``, the clock by default) died
        with it: each becomes "failed" and is queued again (trigger "recovery"), once, however
        many processes call this. Returns the new jobs."""
        cutoff = time.time() if now is None else float(now)
        with self._write() as conn:
            rows = conn.execute(
                text(
                    "SELECT * FROM jobs WHERE state = 'running' AND lease_until IS NOT NULL"
                    " AND lease_until < :cutoff ORDER BY id"
                ),
                {"cutoff": cutoff},
            ).mappings()
            lost = [_job_of(row) for row in rows.all()]
            requeued = [_requeue(conn, old, _LEASE_EXPIRED) for old in lost]
        for old, new in zip(lost, requeued, strict=True):
            logger.warning(
                "Job %d (%s, project %d): worker %s lost, its lease expired; queued again as %d",
                old.id,
                old.kind,
                old.project_id,
                old.worker,
                new.id,
            )
        return requeued

    def job(self, job_id: int) -> Job | None:
        with self._read() as conn:
            row = (
                conn.execute(text("SELECT * FROM jobs WHERE id = :job_id"), {"job_id": job_id})
                .mappings()
                .first()
            )
        return None if row is None else _job_of(row)

    def jobs(self, *, project_id: int | None = None, limit: int = 20) -> list[Job]:
        """The newest jobs first, of one project or of all."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        where, params = _project_filter(project_id)
        with self._read() as conn:
            rows = conn.execute(
                text(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT :limit"),
                {**params, "limit": limit},
            ).mappings()
            return [_job_of(row) for row in rows.all()]

    def pending_jobs(self) -> list[Job]:
        """Queued jobs, oldest first: the order the trainer runs them."""
        with self._read() as conn:
            rows = conn.execute(text("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id"))
            return [_job_of(row) for row in rows.mappings().all()]

    def recover_interrupted(self) -> list[Job]:
        """At start-up: jobs left "running" died with the process. Each becomes "failed" and is
        queued again (trigger "recovery"); returns the new jobs.

        Only jobs the process ran itself, without a lease: a job a worker claimed is alive as
        long as its lease is (see ``expire_leases``)."""
        with self._write() as conn:
            rows = conn.execute(
                text(
                    "SELECT * FROM jobs WHERE state = 'running' AND lease_until IS NULL ORDER BY id"
                )
            ).mappings()
            interrupted = [_job_of(row) for row in rows.all()]
            recovered = [_requeue(conn, old, _INTERRUPTED) for old in interrupted]
        for old, new in zip(interrupted, recovered, strict=True):
            logger.warning(
                "Job %d (%s, project %d) was interrupted by a restart: queued again as %d",
                old.id,
                old.kind,
                old.project_id,
                new.id,
            )
        return recovered

    # -- model versions -----------------------------------------------------------------------

    def next_version_number(self, lineage: str, *, at_least: int = 1) -> int:
        """The lineage's next model version number: one more than the last one handed out, or
        ``at_least`` if that is higher (versions published before the counter existed). Never
        the same number twice for a lineage, whichever process asks; stored before returning."""
        if not isinstance(lineage, str) or not lineage:
            raise ValueError(f"a version counter needs a non-empty lineage string, got {lineage!r}")
        floor = _require_int(at_least, "at_least")
        with self._write() as conn:
            last = conn.execute(
                text("SELECT last FROM version_counters WHERE lineage = :lineage"),
                {"lineage": lineage},
            ).scalar()
            number = max(floor, 1 if last is None else int(last) + 1)
            sql = (
                "INSERT INTO version_counters (lineage, last) VALUES (:lineage, :number)"
                if last is None
                else "UPDATE version_counters SET last = :number WHERE lineage = :lineage"
            )
            conn.execute(text(sql), {"lineage": lineage, "number": number})
        return number


def _migrate_1_to_2(conn: Connection) -> None:
    """Workers in other processes: jobs record who runs them and until when (leases), and model
    version numbers come from a shared counter."""
    real = _REAL.compile(dialect=conn.dialect)
    conn.execute(text("ALTER TABLE jobs ADD COLUMN worker TEXT"))
    conn.execute(text(f"ALTER TABLE jobs ADD COLUMN lease_until {real}"))
    _metadata.create_all(conn, tables=[_version_counters])


# Schema version -> the step to the next one; opening a ledger runs the steps it lacks.
_MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_1_to_2}


# --------------------------------------------------------------------------- databases


def _parse_location(location: Path | str) -> tuple[URL, Path | None]:
    """The database's URL, and the file when it is SQLite."""
    if isinstance(location, str) and "://" in location:
        try:
            url = make_url(location)
        except (ArgumentError, ValueError):  # ValueError: a port that is not a number
            raise LedgerError(
                f"the ledger location {_redacted(location)} is not a database URL; use a file "
                "path or postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
            ) from None
        backend = url.get_backend_name()
        if backend == "postgresql":
            if url.drivername not in ("postgresql", "postgresql+psycopg"):
                raise LedgerError(
                    f"the ledger {url.render_as_string(hide_password=True)} names the driver "
                    f"{url.get_driver_name()!r}; the ledger talks to PostgreSQL through psycopg 3: "
                    "use postgresql:// or postgresql+psycopg://"
                )
            return url.set(drivername="postgresql+psycopg"), None
        if backend == "sqlite" and url.database and url.database != ":memory:":
            path = Path(url.database)
            return _sqlite_url(path), path
        raise LedgerError(
            f"the ledger location {url.render_as_string(hide_password=True)} is neither a SQLite "
            "file nor a PostgreSQL database; use a file path, sqlite:///PATH or "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    path = Path(location)
    return _sqlite_url(path), path


def _sqlite_url(path: Path) -> URL:
    return URL.create("sqlite+pysqlite", database=str(path))


def _redacted(location: str) -> str:
    """A URL SQLAlchemy cannot parse, with whatever sits where a password would blanked out."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", location)


def _sqlite_engine(url: URL, where: str) -> Engine:
    engine = create_engine(
        url, connect_args={"timeout": _BUSY_TIMEOUT_S, "check_same_thread": False}
    )
    warned: list[bool] = []

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # isolation_level=None: the driver opens no transaction of its own, "begin" below does
        # (SQLAlchemy's pysqlite recipe), so SQLite's own locking applies as written.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal" and not warned:
                # Still correct, only readers (e.g. `labelloop status`) may wait for writers.
                logger.warning(
                    "The ledger %s runs in %s journal mode: WAL is not available", where, mode
                )
                warned.append(True)
            # FULL, not WAL's usual NORMAL: NORMAL can lose the last commits on power loss, and
            # those are annotations Label Studio will not send again.
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front, so a read-then-write is atomic also against
        # another process on the file; a read stays deferred and does not block writers.
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _postgres_engine(url: URL) -> Engine:
    connect_args: dict[str, object] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 10  # a dead host fails a call, it does not hang it
    if "application_name" not in url.query:
        connect_args["application_name"] = "labelloop"
    return create_engine(
        url,
        # Pre-ping: connections the server dropped (a restart) are replaced before a statement
        # fails on them.
        pool_pre_ping=True,
        # Whatever the server's default: after the advisory lock each statement must see what
        # the previous writers committed, which REPEATABLE READ's snapshot (taken when the lock
        # was requested) would not.
        isolation_level="READ COMMITTED",
        connect_args=connect_args,
    )


# --------------------------------------------------------------------------- SQL helpers


def _check_job_request(kind: str, trigger: str) -> None:
    for name, value in (("kind", kind), ("trigger", trigger)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"a job needs a non-empty {name} string, got {value!r}")


def _check_worker(worker: str) -> str:
    if not isinstance(worker, str) or not worker:
        raise ValueError(f"a worker needs a non-empty name string, got {worker!r}")
    return str(worker)


def _check_lease(lease_s: float) -> float:
    if (
        not isinstance(lease_s, int | float)
        or isinstance(lease_s, bool)
        or not math.isfinite(lease_s)
        or lease_s <= 0
    ):
        raise ValueError(f"a lease must last a positive number of seconds, got {lease_s!r}")
    return float(lease_s)


def _insert_job(conn: Connection, project_id: int, kind: str, trigger: str) -> Job:
    _ensure_projects(conn, {project_id})
    job_id = conn.execute(
        text(
            "INSERT INTO jobs (project_id, kind, trigger, state, requested_at)"
            " VALUES (:project_id, :kind, :trigger, 'queued', :now) RETURNING id"
        ),
        {"project_id": project_id, "kind": str(kind), "trigger": trigger, "now": time.time()},
    ).scalar_one()
    return _job(conn, int(job_id))


def _requeue(conn: Connection, old: Job, error: str) -> Job:
    """``old`` died with its process or worker: failed, and the same kind queued again."""
    now = time.time()
    conn.execute(
        text("UPDATE jobs SET state = 'failed', finished_at = :now, error = :error WHERE id = :id"),
        {"now": now, "error": error, "id": old.id},
    )
    job_id = conn.execute(
        text(
            "INSERT INTO jobs (project_id, kind, trigger, state, requested_at)"
            " VALUES (:project_id, :kind, 'recovery', 'queued', :now) RETURNING id"
        ),
        {"project_id": old.project_id, "kind": old.kind, "now": now},
    ).scalar_one()
    return _job(conn, int(job_id))


def _ensure_projects(conn: Connection, project_ids: Iterable[int]) -> None:
    ids = sorted(_require_int(project_id, "project id") for project_id in project_ids)
    if ids:
        conn.execute(
            text("INSERT INTO projects (project_id) VALUES (:project_id) ON CONFLICT DO NOTHING"),
            [{"project_id": project_id} for project_id in ids],
        )


def _project_filter(project_id: int | None) -> tuple[str, dict[str, int]]:
    """A WHERE clause for one project, or none for all."""
    if project_id is None:
        return "", {}
    return "WHERE project_id = :project_id", {"project_id": project_id}


def _project_ids(conn: Connection) -> list[int]:
    rows = conn.execute(text("SELECT project_id FROM projects ORDER BY project_id"))
    return [int(project_id) for project_id in rows.scalars()]


def _count_changes(conn: Connection, changes: Mapping[int, int], now: float) -> None:
    params = [
        {"count": count, "now": now, "project_id": project_id}
        for project_id, count in changes.items()
        if count
    ]
    if params:
        conn.execute(
            text(
                "UPDATE projects SET change_seq = change_seq + :count, last_change_at = :now"
                " WHERE project_id = :project_id"
            ),
            params,
        )


def _apply(conn: Connection, row: _Row, now: float, *, revive_before: float | None) -> str:
    """Store one annotation; returns "added", "updated" or "unchanged".

    ``revive_before``: a tombstone older than this is revived (reconcile); None never revives.
    """
    stored = (
        conn.execute(
            text(
                "SELECT task_id, image_ref, labels, updated_ts, was_cancelled, ground_truth,"
                " deleted_at FROM annotations"
                " WHERE project_id = :project_id AND annotation_id = :annotation_id"
            ),
            {"project_id": row.project_id, "annotation_id": row.annotation_id},
        )
        .mappings()
        .first()
    )
    if stored is None:
        _insert(conn, row, now)
        return "added"
    revived = stored["deleted_at"] is not None
    if revived and (revive_before is None or stored["deleted_at"] >= revive_before):
        return "unchanged"
    if row.updated_ts < stored["updated_ts"]:
        if revived:
            conn.execute(
                text(
                    "UPDATE annotations SET deleted_at = NULL, received_at = :now"
                    " WHERE project_id = :project_id AND annotation_id = :annotation_id"
                ),
                {"now": now, "project_id": row.project_id, "annotation_id": row.annotation_id},
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
        text(
            "UPDATE annotations SET task_id = :task_id, image_ref = :image_ref, labels = :labels,"
            " updated_at = :updated_at, updated_ts = :updated_ts, was_cancelled = :was_cancelled,"
            " ground_truth = :ground_truth, completed_by = :completed_by, received_at = :now,"
            " deleted_at = NULL WHERE project_id = :project_id AND annotation_id = :annotation_id"
        ),
        {**row.params(now), "image_ref": image_ref},
    )
    if revived:
        return "added"
    after = (row.task_id, image_ref, row.labels, row.was_cancelled, row.ground_truth)
    return "updated" if after != before else "unchanged"


def _insert(conn: Connection, row: _Row, now: float) -> None:
    conn.execute(
        text(
            "INSERT INTO annotations (project_id, annotation_id, task_id, image_ref, labels,"
            " updated_at, updated_ts, was_cancelled, ground_truth, completed_by, received_at)"
            " VALUES (:project_id, :annotation_id, :task_id, :image_ref, :labels, :updated_at,"
            " :updated_ts, :was_cancelled, :ground_truth, :completed_by, :now)"
        ),
        row.params(now),
    )


def _tombstone_missing(
    conn: Connection, project_id: int, present: set[int], cutoff: float, now: float
) -> int:
    live = conn.execute(
        text(
            "SELECT annotation_id, received_at FROM annotations"
            " WHERE project_id = :project_id AND deleted_at IS NULL"
        ),
        {"project_id": project_id},
    ).mappings()
    missing = [
        {"now": now, "project_id": project_id, "annotation_id": row["annotation_id"]}
        for row in live.all()
        if row["annotation_id"] not in present and row["received_at"] < cutoff
    ]
    if missing:
        conn.execute(
            text(
                "UPDATE annotations SET deleted_at = :now"
                " WHERE project_id = :project_id AND annotation_id = :annotation_id"
            ),
            missing,
        )
    return len(missing)


def _training_set(conn: Connection, project_id: int) -> list[TrainingExample]:
    rows = conn.execute(
        text(
            "SELECT annotation_id, task_id, image_ref, labels, updated_at, updated_ts,"
            " was_cancelled, ground_truth FROM annotations"
            " WHERE project_id = :project_id AND deleted_at IS NULL ORDER BY task_id"
        ),
        {"project_id": project_id},
    ).mappings()
    by_task: dict[int, list[RowMapping]] = defaultdict(list)
    for row in rows.all():
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
                task_id=int(task_id),
                annotation_id=int(winner["annotation_id"]),
                image_ref=image_ref,
                labels=_labels_of(winner["labels"]),
                updated_at=winner["updated_at"],
                ground_truth=bool(winner["ground_truth"]),
            )
        )
    return examples


def _pick(rows: Sequence[RowMapping]) -> RowMapping | None:
    """The annotation that labels a task (``winning_annotation``: skips never count, a ground
    truth beats any other, then the latest updated_ts, then the higher id)."""
    return winning_annotation(rows, _rank)


def _rank(row: RowMapping) -> AnnotationRank:
    return AnnotationRank(
        was_cancelled=bool(row["was_cancelled"]),
        ground_truth=bool(row["ground_truth"]),
        updated_ts=row["updated_ts"],
        annotation_id=row["annotation_id"],
    )


def _job(conn: Connection, job_id: int) -> Job:
    row = (
        conn.execute(text("SELECT * FROM jobs WHERE id = :job_id"), {"job_id": job_id})
        .mappings()
        .first()
    )
    if row is None:
        raise KeyError(f"no training job {job_id} in the ledger")
    return _job_of(row)


def _job_of(row: RowMapping) -> Job:
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
