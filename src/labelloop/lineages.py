"""One model lineage per Label Studio project, beside the base model, in one MODEL_DIR.

Layout::

    MODEL_DIR/
      current, versions/                 # the base model: what `labelloop train` publishes
      projects/<project id>/
        current, versions/               # the project's own lineage (a ModelStore each)

A project without a lineage is served the base model (when its label config maps onto the
base's classes); its first promoted version starts its lineage, and from then on nothing another
project does, nor a new base model, changes what it is served.

Folders written before projects had lineages kept the versions the loop trained in
`MODEL_DIR/versions/` beside the offline ones; `migrate_layout` moves each of those into the
lineage of the project that trained it (its manifest says which) and points the base back at
the newest offline version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from labelloop.errors import StoreError
from labelloop.store import CURRENT_FILE, ModelStore

logger = logging.getLogger(__name__)

PROJECTS_DIR = "projects"


def project_root(model_dir: Path, project_id: int) -> Path:
    if isinstance(project_id, bool) or not isinstance(project_id, int) or project_id < 1:
        raise ValueError(f"a Label Studio project id is a positive integer, got {project_id!r}")
    return Path(model_dir) / PROJECTS_DIR / str(project_id)


def project_store(model_dir: Path, project_id: int) -> ModelStore:
    return ModelStore(project_root(model_dir, project_id))


def projects_with_lineage(model_dir: Path) -> list[int]:
    """Projects that have published at least one version, by id."""
    folder = Path(model_dir) / PROJECTS_DIR
    if not folder.is_dir():
        return []
    ids = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(i for i in ids if project_store(model_dir, i).versions())


class Lineages:
    """Where the base model and each project's lineage live.

    Embedded: folders under MODEL_DIR (the layout above). Distributed (`store_url`, e.g.
    ``s3://bucket/prefix``): the same layout under the object-store prefix, each lineage a
    `MirroredStore` whose truth is remote and whose MODEL_DIR folder is only a cache; version
    numbers come from `allocate(lineage)` (the ledger's counter) so several workers publishing
    into one lineage never pick the same number.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        store_url: str | None = None,
        poll_seconds: float = 2.0,
        allocate: Callable[[str, int], int] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.store_url = store_url.rstrip("/") if store_url else None
        self.poll_seconds = poll_seconds
        self._allocate = allocate
        self._lock = threading.Lock()
        self._stores: dict[int | None, ModelStore] = {}

    @property
    def remote(self) -> bool:
        return self.store_url is not None

    def base(self) -> ModelStore:
        return self._store(None)

    def project(self, project_id: int) -> ModelStore:
        project_root(self.model_dir, project_id)  # validates the id
        return self._store(project_id)

    def projects(self) -> list[int]:
        """Projects that have published at least one version, by id."""
        if self.store_url is None:
            return projects_with_lineage(self.model_dir)
        from labelloop.objectstore import remote_projects

        return remote_projects(self.store_url)

    def _store(self, project_id: int | None) -> ModelStore:
        with self._lock:
            store = self._stores.get(project_id)
            if store is None:
                store = self._make(project_id)
                self._stores[project_id] = store
            return store

    def _make(self, project_id: int | None) -> ModelStore:
        local = self.model_dir if project_id is None else project_root(self.model_dir, project_id)
        if self.store_url is None:
            return ModelStore(local)
        from labelloop.objectstore import MirroredStore

        remote = self.store_url
        if project_id is not None:
            remote = f"{remote}/{PROJECTS_DIR}/{project_id}"
        lineage = "base" if project_id is None else f"{PROJECTS_DIR}/{project_id}"
        allocate = self._allocate
        return MirroredStore(
            local,
            remote,
            poll_seconds=self.poll_seconds,
            allocate=(lambda at_least: allocate(lineage, at_least)) if allocate else None,
        )


@dataclass
class Migration:
    """What `migrate_layout` did, for its log line and the tests."""

    moved: dict[int, list[str]] = field(default_factory=dict)  # project -> versions
    base_current: str | None = None  # the base's current after the move
    unassigned: list[str] = field(default_factory=list)  # loop versions naming no project

    @property
    def changed(self) -> bool:
        return bool(self.moved)


def _trained_by(store: ModelStore, version: str) -> tuple[bool, int | None]:
    """Whether the loop trained `version`, and the project its manifest names (if any)."""
    try:
        training = store.manifest(version).training_config
    except StoreError:
        return False, None
    incremental = training.get("incremental")
    if not isinstance(incremental, dict):
        return False, None
    project = incremental.get("project")
    if isinstance(project, int) and not isinstance(project, bool) and project > 0:
        return True, project
    return True, None


def migrate_layout(model_dir: Path, *, sole_project: int | None = None) -> Migration:
    """Move the loop's versions out of the base into their projects' lineages (idempotent).

    `sole_project`: the one project the ledger knows, which takes loop versions whose manifest
    names no project (none are left behind when there is exactly one candidate). A version
    folder is renamed, never copied, so this is quick and a crash leaves each version in one
    place or the other; `current` of a lineage is written after its versions are in it.
    """
    base = ModelStore(model_dir)
    migration = Migration()
    by_project: dict[int, list[str]] = {}
    for version in base.versions():
        by_loop, owner = _trained_by(base, version)
        if not by_loop:
            continue
        owner = owner or sole_project
        if owner is None:
            migration.unassigned.append(version)
            continue
        by_project.setdefault(owner, []).append(version)
    if not by_project:
        return migration
    was_current = base.current_version()
    for project_id, names in by_project.items():
        target = project_store(model_dir, project_id)
        target.versions_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            destination = target.versions_dir / name
            if destination.exists():
                raise StoreError(
                    f"cannot migrate {name} to project {project_id}: {destination} exists "
                    "already; move one of them aside"
                )
            (base.versions_dir / name).rename(destination)
        migration.moved[project_id] = names
        # The lineage serves what was served, if it trained it, else its newest usable version.
        wanted = was_current if was_current in names else None
        for candidate in [wanted, *reversed(names)]:
            if candidate is None:
                continue
            try:
                target.set_current(candidate, reason="migration")
                break
            except StoreError:
                continue
    if was_current is not None and any(was_current in n for n in by_project.values()):
        migration.base_current = _repoint_base(base)
    else:
        migration.base_current = was_current
    logger.warning(
        "Moved the versions the loop trained into per-project lineages: %s; the base model is "
        "now %s",
        "; ".join(f"project {p}: {', '.join(v)}" for p, v in migration.moved.items()),
        migration.base_current or "none (projects without a lineage start cold)",
    )
    if migration.unassigned:
        logger.warning(
            "Left %s in the base: trained by the loop for a project their manifests do not name",
            ", ".join(migration.unassigned),
        )
    return migration


def _repoint_base(base: ModelStore) -> str | None:
    """Point the base at its newest loadable offline version, or at nothing."""
    for version in reversed(base.versions()):
        try:
            base.set_current(version, reason="migration")
            return version
        except StoreError:
            continue
    (base.root / CURRENT_FILE).unlink(missing_ok=True)
    return None
