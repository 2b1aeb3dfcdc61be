"""Versioned model artifacts: atomic publish, a `current` pointer, rollback, and loading.

Layout::

    MODEL_DIR/
      current                  # one line: the version in use; replaced atomically
      versions/<version>/      # model.pth, classes.json, thresholds.json, manifest.json, ...

A version directory is assembled under a temporary name and renamed into place, and `current`
is written to a temporary file and renamed over the old one, so a crash at any point leaves
either the old or the new state, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from labelloop.config import PreprocessConfig
from labelloop.errors import StoreError
from labelloop.labels import LabelSpace
from labelloop.ml.checkpoints import load_into, read_checkpoint
from labelloop.ml.model import build_model, head_out_features, infer_backbone

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale staging is then removed by age only
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pth"
CLASSES_FILE = "classes.json"
THRESHOLDS_FILE = "thresholds.json"
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"  # the ONNX export, checked against PyTorch when it was stored
SPLITS_FILE = "splits.csv"  # image_id -> train/val/test of the offline run a lineage came from
CURRENT_FILE = "current"
HISTORY_FILE = "history.jsonl"  # one line per change of `current`
VERSIONS_DIR = "versions"
_VERSION_RE = re.compile(r"^v(\d+)-(\d{8}T\d{6})$")
DEFAULT_THRESHOLD = 0.5


class Manifest(BaseModel):
    """What a version is and how it was made: everything serving needs besides the weights."""

    model_config = ConfigDict(extra="allow")

    format_version: int = 1
    version: str
    created_at: str
    parent_version: str | None = None
    backbone: str
    dropout: float = 0.0
    num_classes: int
    label_groups: dict[str, list[str]]
    preprocess: PreprocessConfig
    training_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)  # name -> sha256
    # A rejected candidate's weights are deleted once newer rejections pile up; its manifest
    # and metrics stay, so `labelloop versions` and the gate history still show it.
    weights_pruned: bool = False


@dataclass
class ModelBundle:
    """A loaded model with everything needed to turn its outputs into labels."""

    model: nn.Module
    label_space: LabelSpace
    thresholds: list[float]
    preprocess: PreprocessConfig
    manifest: Manifest
    path: Path

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def classes(self) -> list[str]:
        return self.label_space.classes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_STAGING_PREFIX = ".staging-"
_LOCK_SUFFIX = ".lock"
_UNLOCKED_STAGING_MAX_AGE_S = 24 * 3600.0


def _hold_lock(path: Path) -> int | None:
    """An exclusive lock on `path` (created), held until `_release_lock`; None without fcntl."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        os.close(fd)
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _try_lock(path: Path) -> int | None:
    """The lock on `path` if nobody holds it, else None."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _release_lock(fd: int | None, path: Path) -> None:
    # Unlinked before unlocking: a cleaner that then takes the lock sees no file to act on.
    with contextlib.suppress(OSError):
        path.unlink()
    if fd is not None:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")


class ArtifactStore(Protocol):
    """Where model versions live: the seam between the loop and its storage.

    `ModelStore` (a local folder, the embedded default) is the implementation today; an object
    store can take its place as long as it keeps these promises: a version appears whole or not
    at all (`publish` after `staging`), `current` changes only by `publish`/`set_current`, and
    version names grow monotonically.
    """

    def current_version(self) -> str | None: ...

    def versions(self) -> list[str]: ...

    def version_dir(self, version: str) -> Path:
        """A local folder holding the version (a remote store downloads it first)."""
        ...

    def manifest(self, version: str) -> Manifest: ...

    def next_version_name(self, now: datetime | None = None) -> str: ...

    def staging(self) -> AbstractContextManager[Path]: ...

    def publish(self, staged: Path, manifest: Manifest, *, make_current: bool = True) -> Path: ...

    def set_current(self, version: str, *, reason: str = "promotion") -> None: ...

    def prune_rejected(self, *, keep: int) -> list[str]: ...

    def scratch_dir(self, name: str) -> Path:
        """Local scratch space for one training run (checkpoints to resume from)."""
        ...


class ModelStore:
    """The versions under one MODEL_DIR and the pointer to the one in use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS_DIR

    # -- reading --------------------------------------------------------------------------

    def current_version(self) -> str | None:
        pointer = self.root / CURRENT_FILE
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        return name or None

    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        names = [
            p.name for p in self.versions_dir.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)
        ]
        return sorted(names, key=lambda n: int(_VERSION_RE.match(n).group(1)))  # type: ignore[union-attr]

    def version_dir(self, version: str) -> Path:
        path = self.versions_dir / version
        if not _VERSION_RE.match(version) or not path.is_dir():
            known = ", ".join(self.versions()) or "none"
            raise StoreError(f"no version {version!r} in {self.root} (known: {known})")
        return path

    def manifest(self, version: str) -> Manifest:
        return read_manifest(self.version_dir(version))

    def scratch_dir(self, name: str) -> Path:
        return self.root / "work" / name

    def next_version_name(self, now: datetime | None = None) -> str:
        numbers = [int(_VERSION_RE.match(v).group(1)) for v in self.versions()]  # type: ignore[union-attr]
        return f"v{max(numbers, default=0) + 1}-{utc_stamp(now)}"

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch directory on the same file system, removed unless published.

        While it exists, an exclusive lock on ``<dir>.lock`` beside it says a live process
        owns it; the kernel drops the lock when the process dies, even by SIGKILL, which is how
        `remove_stale_staging` tells a crashed writer's leftovers from work in progress.
        """
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staged = self.versions_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        lock = _hold_lock(staged.with_name(staged.name + _LOCK_SUFFIX))
        try:
            staged.mkdir()
            yield staged
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
            _release_lock(lock, staged.with_name(staged.name + _LOCK_SUFFIX))

    def remove_stale_staging(self) -> list[str]:
        """Delete staging directories whose writer died (a crash mid-publish); returns their
        names. Ones a live process still holds are left alone, so this is safe to run while
        another process trains into the same MODEL_DIR."""
        if not self.versions_dir.is_dir():
            return []
        removed = []
        for path in sorted(self.versions_dir.iterdir()):
            if not path.name.startswith(_STAGING_PREFIX):
                continue
            if path.name.endswith(_LOCK_SUFFIX):
                # A lock whose folder was published (renamed away) before the writer died.
                # If a writer created it a moment ago and has not locked it yet, unlinking it
                # only makes its folder fall under the age rule below: harmless.
                orphan = not path.with_name(path.name.removesuffix(_LOCK_SUFFIX)).exists()
                if orphan and fcntl is not None and (lock := _try_lock(path)) is not None:
                    _release_lock(lock, path)
                continue
            lock_path = path.with_name(path.name + _LOCK_SUFFIX)
            if lock_path.exists() and fcntl is not None:
                lock = _try_lock(lock_path)
                if lock is None:
                    continue  # a live writer
            elif time.time() - path.stat().st_mtime < _UNLOCKED_STAGING_MAX_AGE_S:
                continue  # written by a version without locks, maybe still working
            else:
                lock = None
            shutil.rmtree(path, ignore_errors=True)
            _release_lock(lock, lock_path)
            removed.append(path.name)
            logger.warning("Removed %s, left by a publish that never finished", path)
        return removed

    def publish(self, staged: Path, manifest: Manifest, *, make_current: bool = True) -> Path:
        """Checksum, write the manifest, rename the staged directory into place, switch current."""
        for name in (MODEL_FILE, CLASSES_FILE, THRESHOLDS_FILE):
            if not (staged / name).is_file():
                raise StoreError(f"cannot publish {manifest.version}: {name} was not written")
        manifest.files = {
            p.name: sha256_file(p)
            for p in sorted(staged.iterdir())
            if p.is_file() and p.name != MANIFEST_FILE
        }
        write_json_atomic(staged / MANIFEST_FILE, manifest.model_dump(mode="json"))
        _fsync_dir(staged)
        final = self.versions_dir / manifest.version
        if final.exists():
            raise StoreError(f"version {manifest.version} already exists in {self.root}")
        staged.rename(final)
        _fsync_dir(self.versions_dir)
        logger.info("Published %s", final)
        if make_current:
            self.set_current(manifest.version)
        return final

    def prune_rejected(self, *, keep: int) -> list[str]:
        """Delete the weights of rejected candidates (never current, gate said no) except the
        newest `keep`; their manifests and metrics stay. Returns the pruned versions."""
        current = self.current_version()
        rejected = []
        for version in self.versions():
            if version == current:
                continue
            try:
                manifest = self.manifest(version)
            except StoreError:
                continue
            gate = (manifest.metrics.get("incremental") or {}).get("gate") or {}
            if gate.get("promote") is False and not manifest.weights_pruned:
                rejected.append((version, manifest))
        pruned = []
        for version, manifest in rejected[: max(0, len(rejected) - keep)]:
            folder = self.versions_dir / version
            files = dict(manifest.files)
            for name in (MODEL_FILE, ONNX_FILE):
                files.pop(name, None)
                (folder / name).unlink(missing_ok=True)
            updated = manifest.model_copy(update={"files": files, "weights_pruned": True})
            write_json_atomic(folder / MANIFEST_FILE, updated.model_dump(mode="json"))
            pruned.append(version)
        return pruned

    def history(self) -> list[dict[str, Any]]:
        """Every change of `current`, oldest first: {at, version, reason} (promotion, rollback)."""
        path = self.root / HISTORY_FILE
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    def set_current(self, version: str, *, reason: str = "promotion") -> None:
        """Point `current` at a version that exists and whose files check out."""
        manifest = verify_version_dir(self.version_dir(version))
        if manifest.weights_pruned:
            raise StoreError(
                f"{version} was a rejected candidate whose weights were pruned; only its "
                "manifest and metrics remain. Pick another version (`labelloop versions`)."
            )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{CURRENT_FILE}.{uuid.uuid4().hex}.tmp"
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(version + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.root / CURRENT_FILE)
        _fsync_dir(self.root)
        # Appended after the switch: a line says what happened, never what was only intended.
        with (self.root / HISTORY_FILE).open("a", encoding="utf-8") as log:
            log.write(json.dumps({"at": time.time(), "version": version, "reason": reason}) + "\n")
        logger.info("current -> %s", version)

    def load_current(self) -> ModelBundle:
        version = self.current_version()
        if version is None:
            raise StoreError(
                f"{self.root} has no current model; train one with `labelloop train "
                f"--model-dir {self.root}` or choose a version with `labelloop rollback`"
            )
        return load_bundle(self.version_dir(version))


# -- manifest, legacy files, verification -----------------------------------------------------


def read_manifest(version_dir: Path) -> Manifest:
    path = version_dir / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{version_dir} has no {MANIFEST_FILE}") from None
    except ValidationError as exc:
        raise StoreError(f"{path} is not a valid manifest: {exc.errors()[0]['msg']}") from None


def verify_version_dir(version_dir: Path) -> Manifest:
    """The manifest parses and every file it lists has the recorded checksum."""
    manifest = read_manifest(version_dir)
    for name, expected in manifest.files.items():
        path = version_dir / name
        if not path.is_file():
            raise StoreError(f"{version_dir.name}: {name} is missing")
        if sha256_file(path) != expected:
            raise StoreError(f"{version_dir.name}: {name} does not match its checksum (corrupt)")
    return manifest


def stored_onnx(bundle: ModelBundle) -> bytes | None:
    """The version's ONNX graph, when one was stored (its checksum was verified at load)."""
    if bundle.manifest.files.get(ONNX_FILE) is None:
        return None
    try:
        return (bundle.path / ONNX_FILE).read_bytes()
    except OSError:
        return None


def store_onnx(bundle: ModelBundle, graph: bytes) -> None:
    """Keep a version's checked ONNX export beside its weights, with its checksum in the
    manifest, so every later load (a restart, another replica, `labelloop preannotate`) skips
    the export. Versions without a manifest (the old loose layout) are left as they are."""
    folder = bundle.path
    if not (folder / MANIFEST_FILE).is_file() or ONNX_FILE in bundle.manifest.files:
        return
    write_bytes_atomic(folder / ONNX_FILE, graph)
    manifest = read_manifest(folder)
    files = {**manifest.files, ONNX_FILE: sha256_file(folder / ONNX_FILE)}
    write_json_atomic(
        folder / MANIFEST_FILE, manifest.model_copy(update={"files": files}).model_dump(mode="json")
    )
    bundle.manifest.files[ONNX_FILE] = files[ONNX_FILE]


def read_name_list(path: Path) -> list[str]:
    """A JSON list, or whitespace/newline separated names (the old text format)."""
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path} is not valid JSON: {exc}") from None
        return [str(v) for v in values]
    return text.split()


def read_thresholds(path: Path, n_classes: int) -> list[float]:
    """Thresholds aligned with the classes; padded with 0.5 or truncated, with a warning."""
    if not path.is_file():
        logger.warning("%s not found; using %.2f for every class", path, DEFAULT_THRESHOLD)
        return [DEFAULT_THRESHOLD] * n_classes
    try:
        values = [float(v) for v in read_name_list(path)]
    except ValueError as exc:
        raise StoreError(f"{path} must hold numbers: {exc}") from None
    if len(values) < n_classes:
        logger.warning(
            "%s has %d thresholds for %d classes; padding with %.2f",
            path,
            len(values),
            n_classes,
            DEFAULT_THRESHOLD,
        )
        values += [DEFAULT_THRESHOLD] * (n_classes - len(values))
    elif len(values) > n_classes:
        logger.warning(
            "%s has %d thresholds for %d classes; ignoring the extra ones",
            path,
            len(values),
            n_classes,
        )
        values = values[:n_classes]
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise StoreError(f"{path}: thresholds must lie in [0, 1], got {bad[:5]}")
    return values


def write_model_files(
    directory: Path,
    model: nn.Module,
    label_space: LabelSpace,
    thresholds: Sequence[float],
) -> None:
    """The three files older tools read: weights as a plain state dict, classes, thresholds."""
    if len(thresholds) != len(label_space):
        raise StoreError(f"{len(thresholds)} thresholds for {len(label_space)} classes")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # Serialised in memory, then written: torch.save to a path holds the GIL for the whole
    # write, stalling a server's request threads while the trainer publishes.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (directory / MODEL_FILE).write_bytes(buffer.getvalue())
    write_json_atomic(directory / CLASSES_FILE, label_space.classes)
    write_json_atomic(directory / THRESHOLDS_FILE, [round(float(t), 6) for t in thresholds])


def load_bundle(path: Path, *, default_preprocess: PreprocessConfig | None = None) -> ModelBundle:
    """Load MODEL_DIR (its current version), a version directory, or old loose files."""
    path = Path(path)
    if (path / CURRENT_FILE).is_file() or (path / VERSIONS_DIR).is_dir():
        return ModelStore(path).load_current()
    if (path / MANIFEST_FILE).is_file():
        return _load_versioned(path)
    if (path / MODEL_FILE).is_file():
        return _load_legacy(path, default_preprocess or PreprocessConfig())
    raise StoreError(
        f"{path} holds no model: expected a MODEL_DIR with `current`, a version directory "
        f"with {MANIFEST_FILE}, or {MODEL_FILE} + {CLASSES_FILE} + {THRESHOLDS_FILE}"
    )


def _load_versioned(version_dir: Path) -> ModelBundle:
    manifest = verify_version_dir(version_dir)
    if manifest.weights_pruned:
        raise StoreError(
            f"{version_dir.name} was a rejected candidate whose weights were pruned; only its "
            "manifest and metrics remain"
        )
    classes = read_name_list(version_dir / CLASSES_FILE)
    label_space = LabelSpace.from_mapping(manifest.label_groups)
    if classes != label_space.classes:
        raise StoreError(
            f"{version_dir}: {CLASSES_FILE} and the manifest's label groups disagree on the "
            "classes or their order"
        )
    model = _model_for(version_dir / MODEL_FILE, manifest.backbone, len(classes), manifest.dropout)
    thresholds = read_thresholds(version_dir / THRESHOLDS_FILE, len(classes))
    return ModelBundle(model, label_space, thresholds, manifest.preprocess, manifest, version_dir)


def _model_for(weights: Path, backbone: str, n_classes: int, dropout: float) -> nn.Module:
    state = read_checkpoint(weights)
    head = head_out_features(state)
    if head != n_classes:
        raise StoreError(
            f"{weights} has a head of {head} outputs but there are {n_classes} classes; "
            f"the weights and {CLASSES_FILE} belong to different models"
        )
    model = build_model(backbone, n_classes, dropout=dropout)
    load_into(model, state, "strict")
    model.eval()
    return model


def _load_legacy(folder: Path, preprocess: PreprocessConfig) -> ModelBundle:
    """model.pth + classes.json + thresholds.json in one folder, as older scripts wrote them."""
    classes_path = folder / CLASSES_FILE
    if not classes_path.is_file():
        classes_path = folder / "classes.txt"
    if not classes_path.is_file():
        raise StoreError(f"{folder} has {MODEL_FILE} but no {CLASSES_FILE} naming its classes")
    classes = read_name_list(classes_path)
    state = read_checkpoint(folder / MODEL_FILE)
    head = head_out_features(state)
    if head != len(classes):
        raise StoreError(
            f"{folder / MODEL_FILE} has a head of {head} outputs but {classes_path.name} lists "
            f"{len(classes)} classes; they belong to different models"
        )
    backbone, dropout = infer_backbone(state)
    model = build_model(backbone, len(classes), dropout=dropout)
    load_into(model, state, "strict")
    model.eval()
    thresholds_path = folder / THRESHOLDS_FILE
    if not thresholds_path.is_file() and (folder / "thresholds.txt").is_file():
        thresholds_path = folder / "thresholds.txt"
    thresholds = read_thresholds(thresholds_path, len(classes))
    label_space = LabelSpace.from_mapping({"labels": classes})
    manifest = Manifest(
        version=f"legacy-{sha256_file(folder / MODEL_FILE)[:8]}",
        created_at=datetime.fromtimestamp((folder / MODEL_FILE).stat().st_mtime, UTC).isoformat(),
        backbone=backbone,
        dropout=dropout,
        num_classes=len(classes),
        label_groups=label_space.as_dict(),
        preprocess=preprocess,
    )
    logger.info("Loaded old-layout model from %s (%s, %d classes)", folder, backbone, len(classes))
    return ModelBundle(model, label_space, thresholds, preprocess, manifest, folder)


def manifest_for(
    *,
    version: str,
    backbone: str,
    dropout: float,
    label_space: LabelSpace,
    preprocess: PreprocessConfig,
    parent_version: str | None = None,
    training_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> Manifest:
    return Manifest(
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        parent_version=parent_version,
        backbone=backbone,
        dropout=dropout,
        num_classes=len(label_space),
        label_groups=label_space.as_dict(),
        preprocess=preprocess,
        training_config=dict(training_config or {}),
        metrics=dict(metrics or {}),
        data=dict(data or {}),
    )
