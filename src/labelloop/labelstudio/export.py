"""Label Studio JSON exports -> labelled samples for offline training."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from labelloop.config import DataConfig
from labelloop.labelstudio.annotations import (
    annotation_rank,
    labels_from_result,
    winning_annotation,
)
from labelloop.ml.data import DataError, DataReport, LabelledData, RawImage, finalise


def _choose_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The annotation that labels the task, by the rule the ledger uses too."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    return winning_annotation(annotations, annotation_rank)


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
    raw: dict[str, RawImage] = {}
    groups: list[str] = []
    for position, task in enumerate(tasks):
        task_id = task.get("id", position) if isinstance(task, dict) else position
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict):
            report.skipped_rows.append({"row": task_id, "reason": "task has no data object"})
            continue
        reference = image_reference(data, image_key)
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
            raw[image_id] = RawImage(image_id, path, labels, [int(task_id)])
    if not raw:
        raise DataError(f"{export_path} has no annotated image tasks to train on")
    groups.extend(g for g in config.classes if g not in groups)
    return finalise(raw, config, report, groups)


def image_reference(data: Mapping[str, Any], image_key: str | None) -> str | None:
    if image_key is not None:
        value = data.get(image_key)
        return value if isinstance(value, str) and value else None
    for key in ("image", "img", "image_url", "url"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return next((v for v in data.values() if isinstance(v, str) and "/" in v), None)
