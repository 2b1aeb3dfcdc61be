"""Which model serves each project, loaded on first use and kept in a bounded LRU.

Every lookup reads the lineage's `current` pointer (a few microseconds; from an object store
at most every `LABELLOOP_STORE_POLL_SECONDS`), so a rollback or a promotion by another process
(`labelloop rollback`, a worker) takes effect at the next request without a restart. Loaded
models are keyed by (lineage, version): a project without a lineage shares the base model's
entry, and a model evicted while a request still uses it stays alive until that request ends
(LoadedModel is an immutable snapshot).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from labelloop.errors import StoreError
from labelloop.labelstudio.label_config import LabelConfig, LabelConfigError, map_controls
from labelloop.lineages import Lineages
from labelloop.runtime.predictor import LoadedModel
from labelloop.store import ModelBundle, ModelStore, load_bundle

logger = logging.getLogger(__name__)

DEFAULT_MAX_LOADED = 4

_Key = tuple[str, str]  # (lineage root, version)


class ProjectModels:
    """The base model and every project's lineage under one MODEL_DIR."""

    def __init__(
        self,
        model_dir: Path,
        *,
        runtime: str = "auto",
        max_loaded: int = DEFAULT_MAX_LOADED,
        on_load: Callable[[float], None] | None = None,
        lineages: Lineages | None = None,
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self.model_dir = Path(model_dir)
        self.runtime = runtime
        self.max_loaded = max_loaded
        # Folders under MODEL_DIR, or an object store with MODEL_DIR as its cache.
        self.lineages = lineages or Lineages(self.model_dir)
        self.base_store = self.lineages.base()
        self.on_load = on_load
        self._lock = threading.Lock()
        self._loaded: OrderedDict[_Key, LoadedModel] = OrderedDict()
        self._loading: dict[_Key, threading.Lock] = {}
        self._last_good: dict[str, str] = {}  # lineage root -> the last version that loaded
        self._unloadable: set[_Key] = set()  # logged once each, not at every request

    # -- lineages -----------------------------------------------------------------------------

    def store(self, project_id: int) -> ModelStore:
        """The project's own lineage (possibly still empty)."""
        return self.lineages.project(project_id)

    def has_lineage(self, project_id: int) -> bool:
        return self.store(project_id).current_version() is not None

    def projects(self) -> list[int]:
        return self.lineages.projects()

    def versions(self) -> dict[str, str]:
        """'base' and each project id -> its current version; reads pointers, loads nothing."""
        out: dict[str, str] = {}
        base = self.base_store.current_version()
        if base is not None:
            out["base"] = base
        for project_id in self.projects():
            version = self.store(project_id).current_version()
            if version is not None:
                out[str(project_id)] = version
        return out

    # -- serving ------------------------------------------------------------------------------

    def base(self) -> LoadedModel | None:
        return self._current_of(self.base_store)

    def serving(self, project_id: int | None) -> LoadedModel | None:
        """The project's own current version, else the base model (None: neither exists)."""
        if project_id is not None:
            own = self._current_of(self.store(project_id))
            if own is not None:
                return own
        return self.base()

    def parent_for(self, project_id: int, config: LabelConfig) -> LoadedModel | None:
        """What the project's next version is trained from: its own current version, else the
        base model when some choice of `config` is one of its classes, else None (cold start)."""
        own = self._current_of(self.store(project_id))
        if own is not None:
            return own
        base = self.base()
        if base is None:
            return None
        try:
            map_controls(config, base.classes)
        except LabelConfigError:
            logger.info(
                "Project %d shares no class with the base model %s: it starts cold",
                project_id,
                base.version,
            )
            return None
        return base

    def put(self, project_id: int, bundle: ModelBundle) -> LoadedModel:
        """A version just promoted in the project's lineage, loaded now so that its first
        request does not pay for it."""
        root = str(self.store(project_id).root)
        return self._load((root, bundle.version), lambda: bundle)

    def loaded(self) -> list[tuple[str, str]]:
        """(lineage, version) of the models in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)

    # -- the cache ----------------------------------------------------------------------------

    def _current_of(self, store: ModelStore) -> LoadedModel | None:
        version = store.current_version()
        if version is None:
            return None
        root = str(store.root)
        key = (root, version)
        with self._lock:
            model = self._loaded.get(key)
            if model is not None:
                self._loaded.move_to_end(key)
                return model
            fallback = self._last_good.get(root)
            known_bad = key in self._unloadable
        if not known_bad:
            try:
                return self._load(key, lambda: load_bundle(store.version_dir(version)))
            except StoreError as exc:
                with self._lock:
                    self._unloadable.add(key)
                logger.error(
                    "%s/current names %s, which cannot be loaded (%s); serving %s instead",
                    root,
                    version,
                    exc,
                    fallback or "nothing",
                )
        if fallback is None or fallback == version:
            return None
        # The last good model keeps serving, reloaded if it was evicted meanwhile.
        try:
            return self._load((root, fallback), lambda: load_bundle(store.version_dir(fallback)))
        except StoreError:
            return None

    def _load(self, key: _Key, bundle_of: Callable[[], ModelBundle]) -> LoadedModel:
        with self._lock:
            lock = self._loading.setdefault(key, threading.Lock())
        # One load per key at a time: concurrent first requests of a project wait for the
        # same load instead of each building an ONNX session; other projects are not held up.
        with lock:
            with self._lock:
                model = self._loaded.get(key)
            if model is not None:
                return model
            started = time.perf_counter()
            model = LoadedModel.from_bundle(bundle_of(), runtime=self.runtime)
            seconds = time.perf_counter() - started
            logger.info("Loaded %s of %s in %.2f s", key[1], key[0], seconds)
            if self.on_load is not None:
                self.on_load(seconds)
            with self._lock:
                self._loaded[key] = model
                self._loaded.move_to_end(key)
                self._last_good[key[0]] = key[1]
                self._unloadable.discard(key)
                self._loading.pop(key, None)
                while len(self._loaded) > self.max_loaded:
                    (root, version), _ = self._loaded.popitem(last=False)
                    logger.info(
                        "Unloaded %s of %s (at most %d models stay loaded)",
                        version,
                        root,
                        self.max_loaded,
                    )
            return model
