"""Labelled images in: metadata CSV or Label Studio export -> cleaned samples, splits, Dataset."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from labelloop.config import DataConfig
from labelloop.errors import DataError
from labelloop.labels import LabelSpace

logger = logging.getLogger(__name__)

PLACEHOLDERS = frozenset({"", "nan", "none", "null", "[]", "-", "n/a"})
_SEPARATORS = re.compile(r"[;,|]")


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
class RawImage:
    image_id: str
    path: Path
    labels: dict[str, list[str]]
    sources: list[int]


def finalise(
    raw_images: Mapping[str, RawImage],
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
    raw: dict[str, RawImage] = {}
    for offset, row in enumerate(frame[needed].itertuples(index=False, name=None)):
        line = offset + 2
        image_id = str(row[0]).strip()
        if image_id.lower() in PLACEHOLDERS:
            report.skipped_rows.append({"row": line, "reason": "empty image id"})
            continue
        entry = raw.get(image_id)
        if entry is None:
            entry = raw[image_id] = RawImage(
                image_id, images_dir / image_id, {g: [] for g in config.label_columns}, []
            )
        else:
            report.merged_rows += 1
        entry.sources.append(line)
        for group, cell in zip(config.label_columns, row[1:], strict=True):
            for name in parse_label_cell(cell):
                if name not in entry.labels[group]:
                    entry.labels[group].append(name)
    return finalise(raw, config, report, config.label_columns)


# --- Label Studio export --------------------------------------------------------------------


# --- splits -----------------------------------------------------------------------------------


# --- class weights ----------------------------------------------------------------------------


# --- torch Dataset ------------------------------------------------------------------------------
