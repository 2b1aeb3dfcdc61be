"""Labelled images in: metadata CSV or Label Studio export -> cleaned samples, splits, Dataset."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from .config import DataConfig, SplitConfig
from .labels import LabelSpace

logger = logging.getLogger(__name__)

PLACEHOLDERS = frozenset({"", "nan", "none", "null", "[]", "-", "n/a"})
_SEPARATORS = re.compile(r"[;,|]")
SPLIT_NAMES = ("train", "val", "test")


class DataError(ValueError):
    """The input data cannot be used as given; the message says what is wrong and how to fix it."""


class UnknownLabelsError(DataError):
    pass


@dataclass(frozen=True)
class Sample:
    image_id: str
    path: Path
    labels: Mapping[str, tuple[str, ...]]
    # 1-based line numbers in the CSV (header is line 1), or task ids for a Label Studio export.
    sources: tuple[int, ...]

    def all_labels(self) -> list[str]:
        return [name for names in self.labels.values() for name in names]


@dataclass
class DataReport:
    source: str
    n_rows: int = 0
    n_images: int = 0
    n_usable: int = 0
    merged_rows: int = 0
    missing_images: list[dict[str, str]] = field(default_factory=list)
    unreadable_images: list[dict[str, str]] = field(default_factory=list)
    skipped_rows: list[dict[str, Any]] = field(default_factory=list)
    new_classes: dict[str, list[str]] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LabelledData:
    samples: list[Sample]
    label_space: LabelSpace
    report: DataReport

    def targets(self) -> np.ndarray:
        return self.label_space.binarize(s.all_labels() for s in self.samples)


# --- cells and cleaning ---------------------------------------------------------------------


def parse_label_cell(value: object) -> list[str]:
    """One CSV cell -> label names: a JSON list, a Python-literal list, or a `;`/`,`/`|` string.

    Placeholders ("", nan, none, null, [], -, n/a in any case) and duplicates are dropped;
    whitespace is stripped; order of first appearance is kept.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    items: Iterable[object]
    if isinstance(value, list | tuple):
        items = value
    else:
        text = str(value).strip()
        is_literal = text.startswith("[") or (text.startswith("(") and text.endswith(")"))
        items = _parse_list_literal(text) if is_literal else _SEPARATORS.split(text)
    labels: list[str] = []
    for item in items:
        if item is None:
            continue
        name = str(item).strip().strip("'\"").strip()
        if name.lower() in PLACEHOLDERS or name in labels:
            continue
        labels.append(name)
    return labels


def _parse_list_literal(text: str) -> list[object]:
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(parsed, list | tuple):
            return list(parsed)
        return [parsed]
    # A bracketed string that is not a list literal (e.g. "[bolt; nut]"): split it by hand.
    return _SEPARATORS.split(text.strip("[]()"))


def _canonical_names(
    raw_counts: Counter[str], declared: Sequence[str] | None
) -> tuple[dict[str, str], list[str]]:
    """Map each raw spelling to its canonical class name, case-insensitively.

    Declared names win; otherwise the most frequent spelling (then the first alphabetically).
    Returns the mapping and the canonical names that are not declared.
    """
    by_fold: dict[str, Counter[str]] = defaultdict(Counter)
    for name, count in raw_counts.items():
        by_fold[name.casefold()][name] += count
    declared_by_fold = {name.casefold(): name for name in declared or ()}
    mapping: dict[str, str] = {}
    new: list[str] = []
    for fold, spellings in by_fold.items():
        if fold in declared_by_fold:
            canonical = declared_by_fold[fold]
        else:
            canonical = min(spellings, key=lambda s: (-spellings[s], s))
            new.append(canonical)
        for spelling in spellings:
            mapping[spelling] = canonical
    return mapping, sorted(new)


# --- building samples -----------------------------------------------------------------------


@dataclass
class _RawImage:
    image_id: str
    path: Path
    labels: dict[str, list[str]]
    sources: list[int]


def _finalise(
    raw_images: Mapping[str, _RawImage],
    config: DataConfig,
    report: DataReport,
    groups: Sequence[str],
) -> LabelledData:
    """Canonicalise names, enforce declared classes, check images, build the label space."""
    label_groups: dict[str, list[str]] = {}
    unknown: dict[str, dict[str, list[int]]] = {}
    for group in groups:
        raw_counts: Counter[str] = Counter(
            name for img in raw_images.values() for name in img.labels.get(group, [])
        )
        declared = config.classes.get(group)
        mapping, new = _canonical_names(raw_counts, declared)
        for img in raw_images.values():
            canon: list[str] = []
            for name in img.labels.get(group, []):
                c = mapping[name]
                if c not in canon:
                    canon.append(c)
            img.labels[group] = canon
        if declared is None:
            label_groups[group] = sorted({mapping[n] for n in raw_counts})
            continue
        if new:
            unknown[group] = {name: [] for name in new}
            for img in raw_images.values():
                for name in img.labels[group]:
                    if name in unknown[group]:
                        unknown[group][name].extend(img.sources)
            report.new_classes[group] = new
        label_groups[group] = list(declared) + new

    if unknown and not config.allow_new_classes:
        raise UnknownLabelsError(_unknown_labels_message(unknown, report.source))
    for group, names in report.new_classes.items():
        logger.warning("Adding %d new class(es) to %r: %s", len(names), group, ", ".join(names))

    label_space = LabelSpace.from_mapping(label_groups)
    samples: list[Sample] = []
    for img in raw_images.values():
        problem = check_image(img.path)
        if problem is not None:
            kind = "missing_images" if problem == "file not found" else "unreadable_images"
            getattr(report, kind).append(
                {"image_id": img.image_id, "path": str(img.path), "reason": problem}
            )
            continue
        samples.append(
            Sample(
                image_id=img.image_id,
                path=img.path,
                labels={g: tuple(img.labels.get(g, ())) for g in groups},
                sources=tuple(img.sources),
            )
        )
    for kind in ("missing_images", "unreadable_images"):
        problems = getattr(report, kind)
        if problems:
            logger.warning(
                "%d image(s) %s and excluded (first: %s: %s); see the data report",
                len(problems),
                "not found" if kind == "missing_images" else "could not be read",
                problems[0]["image_id"],
                problems[0]["reason"],
            )
    report.n_images = len(raw_images)
    report.n_usable = len(samples)
    counts = Counter(name for s in samples for name in s.all_labels())
    report.class_counts = {name: counts.get(name, 0) for name in label_space.classes}
    report.fingerprint = data_fingerprint(samples)
    if not samples:
        raise DataError(
            f"no usable images in {report.source}: {len(report.missing_images)} missing, "
            f"{len(report.unreadable_images)} unreadable. Check --images points at the folder "
            "the image column is relative to."
        )
    return LabelledData(samples, label_space, report)


def _unknown_labels_message(unknown: Mapping[str, Mapping[str, list[int]]], source: str) -> str:
    lines = [f"{source} has labels that are not among the declared classes:"]
    for group, names in unknown.items():
        for name, rows in names.items():
            shown = ", ".join(str(r) for r in rows[:10]) + (" ..." if len(rows) > 10 else "")
            lines.append(f"  {group}: {name!r} x{len(rows)} (rows {shown})")
    lines.append(
        "Fix the labels, add them to data.classes in the config file, or pass "
        "--allow-new-classes to train on them as new classes."
    )
    return "\n".join(lines)


def check_image(path: Path) -> str | None:
    """None if the image can be decoded, else a short reason."""
    if not path.is_file():
        return "file not found"
    try:
        with Image.open(path) as img:
            img.verify()
        # verify() does not decode pixel data; a truncated file only fails on load.
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    except Image.DecompressionBombError as exc:
        return f"too large: {exc}"
    return None


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """A short hash of ids, labels and file sizes: it changes when the training data does."""
    digest = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.image_id):
        size = s.path.stat().st_size if s.path.exists() else -1
        record = [s.image_id, {g: list(v) for g, v in s.labels.items()}, size]
        digest.update(json.dumps(record, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def load_metadata(csv_path: Path, images_dir: Path, config: DataConfig) -> LabelledData:
    """Read a metadata CSV: one image column, one column per label group; rows merged by image."""
    if not csv_path.is_file():
        raise DataError(f"metadata file {csv_path} does not exist")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {csv_path} as CSV: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    needed = [config.image_column, *config.label_columns]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(
            f"{csv_path} lacks column(s) {missing}; it has {list(frame.columns)}. "
            "Use --image-column / --label-columns to name the right ones."
        )
    report = DataReport(source=str(csv_path), n_rows=len(frame))
    raw: dict[str, _RawImage] = {}
    for offset, row in enumerate(frame[needed].itertuples(index=False, name=None)):
        line = offset + 2
        image_id = str(row[0]).strip()
        if image_id.lower() in PLACEHOLDERS:
            report.skipped_rows.append({"row": line, "reason": "empty image id"})
            continue
        entry = raw.get(image_id)
        if entry is None:
            entry = raw[image_id] = _RawImage(
                image_id, images_dir / image_id, {g: [] for g in config.label_columns}, []
            )
        else:
            report.merged_rows += 1
        entry.sources.append(line)
        for group, cell in zip(config.label_columns, row[1:], strict=True):
            for name in parse_label_cell(cell):
                if name not in entry.labels[group]:
                    entry.labels[group].append(name)
    return _finalise(raw, config, report, config.label_columns)


# --- Label Studio export --------------------------------------------------------------------


def _choose_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Ground truth wins; otherwise the most recently updated annotation that was not skipped."""
    annotations = [
        a
        for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    if not annotations:
        return None
    return max(
        annotations,
        key=lambda a: (
            bool(a.get("ground_truth")),
            str(a.get("updated_at") or ""),
            a.get("id") or 0,
        ),
    )


def labels_from_result(result: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Label Studio `result` items -> {Choices control name: labels}."""
    labels: dict[str, list[str]] = {}
    for item in result:
        if not isinstance(item, dict) or item.get("type") != "choices":
            continue
        choices = (item.get("value") or {}).get("choices") or []
        group = labels.setdefault(str(item.get("from_name")), [])
        group.extend(str(c) for c in choices if str(c) not in group)
    return labels


def resolve_export_image(reference: str, images_dir: Path) -> Path:
    """Find the local file for a Label Studio image reference (upload, local-files or URL)."""
    parsed = urlparse(reference)
    if "local-files" in parsed.path and "d" in parse_qs(parsed.query):
        relative = unquote(parse_qs(parsed.query)["d"][0])
    else:
        relative = unquote(parsed.path).lstrip("/")
        if relative.startswith("data/upload/"):
            relative = relative.split("/", 3)[-1]
    candidates = [images_dir / relative, images_dir / Path(relative).name]
    # Uploads are renamed to "<8 hex>-<original name>" by Label Studio.
    match = re.match(r"^[0-9a-f]{8}-(.+)$", Path(relative).name)
    if match:
        candidates.append(images_dir / match.group(1))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def load_labelstudio_export(
    export_path: Path, images_dir: Path, config: DataConfig, *, image_key: str | None = None
) -> LabelledData:
    """Read a Label Studio JSON export: each `Choices` control becomes a label group."""
    try:
        tasks = json.loads(export_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"Label Studio export {export_path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{export_path} is not valid JSON: {exc}") from None
    if not isinstance(tasks, list):
        raise DataError(
            f"{export_path} must hold a JSON list of tasks (Label Studio 'JSON' export)"
        )
    report = DataReport(source=str(export_path), n_rows=len(tasks))
    raw: dict[str, _RawImage] = {}
    groups: list[str] = []
    for position, task in enumerate(tasks):
        task_id = task.get("id", position) if isinstance(task, dict) else position
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict):
            report.skipped_rows.append({"row": task_id, "reason": "task has no data object"})
            continue
        reference = _image_reference(data, image_key)
        if reference is None:
            report.skipped_rows.append({"row": task_id, "reason": "task data has no image"})
            continue
        annotation = _choose_annotation(task)
        if annotation is None:
            report.skipped_rows.append({"row": task_id, "reason": "no usable annotation"})
            continue
        labels = labels_from_result(annotation.get("result") or [])
        for group in labels:
            if group not in groups:
                groups.append(group)
        path = resolve_export_image(reference, images_dir)
        image_id = (
            str(path.relative_to(images_dir)) if path.is_relative_to(images_dir) else reference
        )
        if image_id in raw:
            report.merged_rows += 1
            entry = raw[image_id]
            for group, names in labels.items():
                bucket = entry.labels.setdefault(group, [])
                bucket.extend(n for n in names if n not in bucket)
            entry.sources.append(int(task_id))
        else:
            raw[image_id] = _RawImage(image_id, path, labels, [int(task_id)])
    if not raw:
        raise DataError(f"{export_path} has no annotated image tasks to train on")
    groups.extend(g for g in config.classes if g not in groups)
    return _finalise(raw, config, report, groups)


def _image_reference(data: Mapping[str, Any], image_key: str | None) -> str | None:
    if image_key is not None:
        value = data.get(image_key)
        return value if isinstance(value, str) and value else None
    for key in ("image", "img", "image_url", "url"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return next((v for v in data.values() if isinstance(v, str) and "/" in v), None)


# --- splits -----------------------------------------------------------------------------------


def stratified_split(targets: np.ndarray, config: SplitConfig) -> dict[str, np.ndarray]:
    """Deterministic multi-label stratified train/val/test indices (iterative stratification).

    One row per image, so the split is grouped by image. An extra "no labels" column keeps
    clean images spread across the splits too.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    n = len(targets)
    n_test = int(round(n * config.test_fraction))
    n_val = int(round(n * config.val_fraction))
    if n - n_test - n_val < 1 or n_val < 1:
        raise DataError(
            f"{n} usable images are too few for val {config.val_fraction:.0%} and test "
            f"{config.test_fraction:.0%}; label more images or lower the fractions"
        )
    strat = np.concatenate([targets, (targets.sum(axis=1) == 0)[:, None]], axis=1).astype(int)
    indices = np.arange(n)

    def carve(pool: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if size == 0:
            return pool, pool[:0]
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=size, random_state=seed)
        keep, take = next(splitter.split(pool[:, None], strat[pool]))
        return np.sort(pool[keep]), np.sort(pool[take])

    rest, test = carve(indices, n_test, config.seed)
    train, val = carve(rest, n_val, config.seed + 1)
    return {"train": train, "val": val, "test": test}


def write_split_manifest(
    path: Path, samples: Sequence[Sample], splits: Mapping[str, np.ndarray]
) -> None:
    rows = [
        {"image_id": samples[i].image_id, "split": name}
        for name in SPLIT_NAMES
        for i in splits.get(name, [])
    ]
    pd.DataFrame(rows, columns=["image_id", "split"]).to_csv(path, index=False)


def materialize_splits(
    samples: Sequence[Sample], splits: Mapping[str, np.ndarray], out_dir: Path
) -> Path:
    """Hard-link (or copy, across file systems) images into out_dir/{train,val,test}/."""
    for name, indices in splits.items():
        folder = out_dir / name
        for i in indices:
            sample = samples[i]
            target = folder / sample.image_id
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.unlink()
            try:
                os.link(sample.path, target)
            except OSError:
                shutil.copy2(sample.path, target)
    return out_dir


# --- class weights ----------------------------------------------------------------------------


def compute_pos_weight(
    targets: np.ndarray, *, min_weight: float, max_weight: float
) -> tuple[torch.Tensor, list[int]]:
    """sqrt(negatives / positives) per class, clipped; returns the weights and empty classes.

    A class with no positives gets weight 1: the loss then only teaches it to stay off, which is
    all the data can say, and nothing is divided by zero.
    """
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    empty = [int(i) for i in np.flatnonzero(positives == 0)]
    ratio = np.divide(
        negatives, positives, out=np.ones_like(positives, dtype=np.float64), where=positives > 0
    )
    weights = np.clip(np.sqrt(ratio), min_weight, max_weight)
    weights[empty] = 1.0
    return torch.tensor(weights, dtype=torch.float32), empty


# --- torch Dataset ------------------------------------------------------------------------------


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb(image: Image.Image) -> Image.Image:
    """The one colour conversion for training and serving alike."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert() would clip 16-bit values at 255, turning most of the image white.
        eight_bit = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        image = Image.fromarray(eight_bit)
    # Alpha is dropped, not composited: the model sees the same pixels in training and serving.
    return image.convert("RGB")


def load_rgb(source: Path | bytes, *, min_side: int | None = None) -> Image.Image:
    """Decode an image file (or its downloaded bytes) as RGB, honouring EXIF orientation.

    With `min_side`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, several times
    faster on photos) as long as both sides stay at least `min_side`, as serving decodes them.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        if min_side is not None and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        return to_rgb(ImageOps.exif_transpose(img))


class ImageDataset(Dataset):
    """Images (files, or downloaded bytes) with multi-hot targets. Unreadable items yield None
    and are dropped by the collate."""

    def __init__(
        self,
        paths: Sequence[Path | bytes],
        targets: np.ndarray | None,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        min_side: int | None = None,
    ) -> None:
        if targets is not None and len(targets) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(targets)} target rows")
        self.min_side = min_side  # see load_rgb
        self.paths = list(paths)
        self.targets = None if targets is None else torch.as_tensor(targets, dtype=torch.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        try:
            image = self.transform(load_rgb(self.paths[index], min_side=self.min_side))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            item = self.paths[index]
            logger.warning(
                "Skipping unreadable image %s: %s",
                item if isinstance(item, Path) else f"#{index}",
                exc,
            )
            return None
        target = self.targets[index] if self.targets is not None else torch.empty(0)
        return image, target, index


def collate_skip_none(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    items = [b for b in batch if b is not None]
    if not items:
        return None
    images, targets, indices = zip(*items, strict=True)
    return torch.stack(images), torch.stack(targets), torch.tensor(indices)
