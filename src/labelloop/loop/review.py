"""Label review: the annotations the model disagrees with, most confident disagreement first.

Every labelled image is predicted by a logistic head fitted on cached backbone features *without
that image* (out-of-fold, the fast update's `out_of_fold`), so a wrong label cannot vouch for
itself. Each (image, class) entry is then judged as in confident learning (Northcutt et al.,
2021), one class at a time, with per-class self-confidence thresholds:

* t_present(c): the mean out-of-fold probability of c over the images labelled with c;
* t_absent(c): the mean of 1 - p over the images labelled without c.

An entry labelled present is suspect when the model's 1 - p reaches t_absent(c) (and beats p
when p also reaches t_present(c)); an entry labelled absent, when p reaches t_present(c) (and
beats 1 - p when 1 - p also reaches t_absent(c)). Per-class thresholds are what makes one rule
fit a rare class whose probabilities never get near 1 and a common one that is always sure.
Suspects are ranked by their score (`Scoring`); docs/review.md has the method, its limits and
the measurement that chose the default.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from labelloop.labels import LabelSpace
from labelloop.labelstudio.client import LabelStudioClient
from labelloop.labelstudio.label_config import (
    ChoicesControl,
    LabelConfig,
    LabelConfigError,
    parse_label_config,
)
from labelloop.labelstudio.protocol import ChoicesValue, ResultItem, TaskPrediction
from labelloop.labelstudio.results import validate_prediction
from labelloop.loop.examples import label_space_for, targets_of
from labelloop.loop.ledger import AnnotationLedger, TrainingExample
from labelloop.ml.embeddings import EmbeddingCache, embed_images
from labelloop.ml.head import Head, out_of_fold
from labelloop.store import ModelBundle

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FOLDS",
    "DEFAULT_SCORING",
    "FORMATS",
    "MIN_PER_CLASS",
    "SCORINGS",
    "Flag",
    "Format",
    "NothingToReview",
    "REVIEW_PREFIX",
    "Scoring",
    "class_thresholds",
    "flag_record",
    "format_flags",
    "oof_probabilities",
    "push_review",
    "review",
    "review_predictions",
    "review_examples",
    "review_project",
    "review_version",
    "suspects",
]

# As the fast update (TrainerSettings.folds). Ten folds, each head fitted on 90 % instead of
# 80 %, ranked no better on the benchmark's data (bench/label_review.py --folds 10) and cost
# twice the fits.
DEFAULT_FOLDS = 5
# A class is reviewed only with this many images labelled with it and as many without: each
# held-out image of it is then predicted from at least 4 others of its kind, and with 5 folds
# all of them landing in one fold (a class the fold's head never saw) is all but impossible.
# With fewer, "the model is sure it is absent" says only that the class is not learnt yet.
MIN_PER_CLASS = 5

Scoring = Literal["probability", "margin", "scaled_margin"]
# How sure the model is of the opposite of the annotation, p_opp, against that class's
# threshold t_opp: "probability" is p_opp itself (|p - y|), "margin" is p_opp - t_opp,
# "scaled_margin" is how much of the way from the threshold to certainty p_opp has gone,
# (p_opp - t_opp) / (1 - t_opp). bench/label_review.py compares them: "probability" ranks
# flipped labels best with both backbones and both readings of "10 % flipped". The margins
# favour classes with low thresholds, which are the classes the model knows least, where a
# disagreement is more often the model's own mistake (docs/review.md).
SCORINGS: tuple[Scoring, ...] = ("probability", "margin", "scaled_margin")
DEFAULT_SCORING: Scoring = "probability"

# The model version of review predictions in Label Studio: "review-<the served version>", so
# that reviewers can filter the Data Manager for them and they never mix with pre-annotations.
REVIEW_PREFIX = "review-"

Format = Literal["table", "json", "csv"]
FORMATS: tuple[Format, ...] = ("table", "json", "csv")
_FIELDS = ("task_id", "control", "label", "annotated", "probability", "score")
# Table columns of free text are cut to this width, so a row fits in 80 columns.
_TEXT_WIDTH = 16


class NothingToReview(ValueError):
    """There is nothing the review can judge yet; the message says what is missing."""


@dataclass(frozen=True)
class Flag:
    """One suspect annotation: `label` of `control` on task `task_id` is annotated present
    (`annotated` True) or absent, while the out-of-fold `probability` that it is present says
    the opposite; `score` ranks the flags (higher: more confident disagreement)."""

    task_id: int
    control: str
    label: str
    annotated: bool
    probability: float
    score: float


def oof_probabilities(
    features: np.ndarray, targets: np.ndarray, *, folds: int = DEFAULT_FOLDS
) -> np.ndarray:
    """(n, C) probabilities, each row from a head fitted without it (`out_of_fold`)."""
    x, y = _check(features, targets)
    n, n_classes = y.shape
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    # Not the served head as the start: it was fitted on these very labels, and L-BFGS stopped
    # early could keep some of what it learnt from the label being judged. The problem is
    # convex, so the start changes the iterations needed, not the solution.
    start = Head(np.zeros((n_classes, x.shape[1]), np.float32), np.zeros(n_classes, np.float32))
    # Unweighted classes: confident learning needs probabilities, and class weights would
    # inflate those of rare classes; the per-class thresholds already handle imbalance.
    probs = out_of_fold(
        x,
        y,
        np.ones(n, np.float32),
        init=start,
        pos_weight=np.ones(n_classes, np.float32),
        folds=folds,
    )
    if probs is None:
        raise NothingToReview(
            f"the review needs at least {2 * folds} labelled images for {folds} folds, got {n}"
        )
    return probs


def class_thresholds(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class: t_present (mean p over the labelled positives) and t_absent (mean 1 - p over
    the labelled negatives); NaN for a class without positives or negatives."""
    p, y = _check_probs(probs, targets)
    positive = y > 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        t_present = (p * positive).sum(axis=0) / positive.sum(axis=0)
        t_absent = ((1.0 - p) * ~positive).sum(axis=0) / (~positive).sum(axis=0)
    return t_present, t_absent


def suspects(
    probs: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    controls: Sequence[str],
    task_ids: Sequence[int],
    *,
    scoring: Scoring = DEFAULT_SCORING,
    min_per_class: int = MIN_PER_CLASS,
    top: int | None = None,
    skipped_level: int = logging.WARNING,
) -> list[Flag]:
    """The confident-learning suspects among out-of-fold `probs`, best first.

    `classes[c]` is column c's label and `controls[c]` the Label Studio control it belongs
    to. A class with fewer than `min_per_class` images labelled with it, or without it, is
    skipped and logged at `skipped_level` (it cannot be told from a class not learnt yet);
    NothingToReview when every class is skipped.
    """
    p, y = _check_probs(probs, targets)
    n, n_classes = y.shape
    _check_options(y.shape, classes, controls, task_ids, scoring, min_per_class, top)

    positive = y > 0.5
    n_pos = positive.sum(axis=0)
    reviewed = (n_pos >= min_per_class) & (n - n_pos >= min_per_class)
    skipped = [
        f"{controls[c]}/{classes[c]} ({n_pos[c]} of {n} with it)"
        for c in range(n_classes)
        if not reviewed[c]
    ]
    if skipped:
        logger.log(
            skipped_level,
            "Label review skips %s: fewer than %d images labelled with or without them",
            ", ".join(skipped),
            min_per_class,
        )
    if not reviewed.any():
        raise NothingToReview(
            f"no class has {min_per_class} images labelled with it and {min_per_class} without "
            f"it among the {n} labelled images ({', '.join(skipped)})"
        )

    t_present, t_absent = class_thresholds(p, y)
    # Per entry: the probability of the annotation's opposite and of the annotation itself,
    # and the thresholds that go with each.
    p_opp = np.where(positive, 1.0 - p, p)
    p_own = 1.0 - p_opp
    t_opp = np.where(positive, t_absent, t_present)
    t_own = np.where(positive, t_present, t_absent)
    # Confident learning's rule: the opposite reaches its class threshold, and wins the argmax
    # when the annotation reaches its own threshold as well.
    suspect = (p_opp >= t_opp) & ((p_own < t_own) | (p_opp > p_own)) & reviewed
    score = _score(scoring, p_opp, t_opp)

    rows, cols = np.nonzero(suspect)
    # Stable ties (task, then class order) so the same inputs always give the same list.
    order = sorted(range(len(rows)), key=lambda k: (-score[rows[k], cols[k]], rows[k], cols[k]))
    if top is not None:
        order = order[:top]
    return [
        Flag(
            task_id=int(task_ids[rows[k]]),
            control=controls[cols[k]],
            label=classes[cols[k]],
            annotated=bool(positive[rows[k], cols[k]]),
            probability=float(p[rows[k], cols[k]]),
            score=float(score[rows[k], cols[k]]),
        )
        for k in order
    ]


def review(
    features: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    controls: Sequence[str],
    task_ids: Sequence[int],
    *,
    folds: int = DEFAULT_FOLDS,
    scoring: Scoring = DEFAULT_SCORING,
    min_per_class: int = MIN_PER_CLASS,
    top: int | None = None,
    skipped_level: int = logging.WARNING,
) -> list[Flag]:
    """Suspect annotations of `features` (n, d) labelled `targets` (n, C of 0/1), best first:
    `oof_probabilities`, then `suspects`."""
    # Inconsistent arguments fail before the fits, not after.
    _check_options(np.shape(targets), classes, controls, task_ids, scoring, min_per_class, top)
    probs = oof_probabilities(features, targets, folds=folds)
    return suspects(
        probs,
        targets,
        classes,
        controls,
        task_ids,
        scoring=scoring,
        min_per_class=min_per_class,
        top=top,
        skipped_level=skipped_level,
    )


def review_project(
    ledger: AnnotationLedger,
    project_id: int,
    bundle: ModelBundle,
    fetch: Callable[[TrainingExample], bytes | None],
    embeddings: EmbeddingCache,
    *,
    top: int | None = None,
    folds: int = DEFAULT_FOLDS,
    scoring: Scoring = DEFAULT_SCORING,
    min_per_class: int = MIN_PER_CLASS,
    workers: int = 8,
) -> list[Flag]:
    """Suspect annotations of a project, best first, with `bundle`'s backbone as the features.

    The project's annotations are what the training set holds (`training_set`: the winning
    annotation of each task), held-out tasks included: the review trains nothing that is
    served, and a wrong label is as wrong on a held-out task, where it skews the gate. `fetch`
    returns an example's image bytes, or None when it cannot (that task is left out).
    Embeddings come from `embeddings` where cached, as in the fast update.
    """
    # A bad option fails before the images are fetched, not after.
    _check_settings(scoring, min_per_class, top)
    config_xml = ledger.label_config(project_id)
    if config_xml is None:
        raise NothingToReview(f"the label config of project {project_id} is not known yet")
    try:
        config = parse_label_config(config_xml)
    except LabelConfigError as exc:
        raise NothingToReview(
            f"the label config of project {project_id} is unusable: {exc}"
        ) from exc
    examples = ledger.training_set(project_id)
    if not examples:
        raise NothingToReview(f"project {project_id} has no annotations yet")
    space = label_space_for(bundle.label_space, config.controls, examples)

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="review-fetch") as pool:
        fetched = list(pool.map(fetch, examples))
    pairs = [(e, d) for e, d in zip(examples, fetched, strict=True) if d is not None]
    features, failed = embed_images(bundle, [(str(e.task_id), d) for e, d in pairs], embeddings)
    failed_keys = set(failed)
    kept = [e for e, _ in pairs if str(e.task_id) not in failed_keys]
    if len(kept) < len(examples):
        logger.warning(
            "Label review of project %d leaves out %d of %d tasks whose image could not be "
            "fetched or decoded",
            project_id,
            len(examples) - len(kept),
            len(examples),
        )
    if not kept:
        raise NothingToReview(
            f"none of the {len(examples)} annotated images of project {project_id} could be read"
        )
    return review_examples(
        config.controls,
        space,
        kept,
        features,
        folds=folds,
        scoring=scoring,
        min_per_class=min_per_class,
        top=top,
    )


def review_examples(
    controls: Sequence[ChoicesControl],
    space: LabelSpace,
    examples: Sequence[TrainingExample],
    features: np.ndarray,
    *,
    folds: int = DEFAULT_FOLDS,
    scoring: Scoring = DEFAULT_SCORING,
    min_per_class: int = MIN_PER_CLASS,
    top: int | None = None,
    skipped_level: int = logging.WARNING,
) -> list[Flag]:
    """Suspect annotations among `examples`, whose backbone features are the rows of
    `features`, in the project's label space `space`: `review` over the classes some control
    of the config can label (a class of the model no control offers is not the project's).
    The fast update passes `skipped_level` INFO: until a class has enough labels, every update
    would warn about it again."""
    control_of = _control_of_class(controls, examples)
    columns = [i for i, name in enumerate(space.classes) if name in control_of]
    targets = targets_of(space, examples, [c.name for c in controls])[:, columns]
    classes = [space.classes[i] for i in columns]
    return review(
        features,
        targets,
        classes,
        [control_of[name] for name in classes],
        [e.task_id for e in examples],
        folds=folds,
        scoring=scoring,
        min_per_class=min_per_class,
        top=top,
        skipped_level=skipped_level,
    )


def review_predictions(
    flags: Sequence[Flag],
    ledger: AnnotationLedger,
    project_id: int,
    served_version: str,
) -> list[tuple[int, TaskPrediction]]:
    """One Label Studio prediction per flagged task, as (task id, prediction).

    Each is the task's annotation with every flagged label turned over, what the model proposes
    (a single-choice control takes the proposed label in place of the annotated one); each
    result item lists its control's flags under ``meta.review``. The score is 1 - the task's
    highest flag score, so that ascending order (Label Studio's) shows the most suspect first.
    Labels no control of the config offers are left out: Label Studio could not show them.
    """
    config_xml = ledger.label_config(project_id)
    if config_xml is None:
        raise NothingToReview(f"the label config of project {project_id} is not known yet")
    config = parse_label_config(config_xml)
    annotated = {e.task_id: e.labels for e in ledger.training_set(project_id)}
    by_task: dict[int, list[Flag]] = {}
    for flag in flags:
        by_task.setdefault(flag.task_id, []).append(flag)
    version = review_version(served_version)
    out = []
    for task_id, task_flags in by_task.items():
        if task_id not in annotated:
            continue  # its annotation was deleted since the review
        prediction = TaskPrediction(
            result=_proposed(config, annotated[task_id], task_flags),
            score=round(1.0 - max(f.score for f in task_flags), 4),
            model_version=version,
        )
        validate_prediction(prediction, config)
        out.append((task_id, prediction))
    return out


def review_version(served_version: str) -> str:
    """The model version review predictions of `served_version` carry in Label Studio."""
    return f"{REVIEW_PREFIX}{served_version}"


def push_review(
    client: LabelStudioClient,
    project_id: int,
    predictions: Sequence[tuple[int, TaskPrediction]],
) -> tuple[int, int]:
    """Replace the project's review predictions (every model version starting with
    REVIEW_PREFIX) by `predictions`; (deleted, created)."""
    old = {
        str(p["model_version"])
        for p in client.predictions(project_id=project_id)
        if str(p.get("model_version", "")).startswith(REVIEW_PREFIX)
    }
    deleted = sum(client.delete_version_predictions(project_id, v) for v in sorted(old))
    payload = [
        {"task": task_id, **prediction.model_dump(mode="json", exclude_none=True)}
        for task_id, prediction in predictions
    ]
    created = client.import_predictions(project_id, payload) if payload else 0
    logger.info(
        "Project %d: %d review predictions replace %d earlier ones", project_id, created, deleted
    )
    return deleted, created


def _proposed(
    config: LabelConfig, labels: dict[str, tuple[str, ...]], flags: Sequence[Flag]
) -> list[ResultItem]:
    items = []
    for control in config.controls:
        mine = [f for f in flags if f.control == control.name]
        chosen = set(labels.get(control.name, ()))
        for flag in mine:
            if flag.annotated:
                chosen.discard(flag.label)
            elif control.multiple:
                chosen.add(flag.label)
            else:
                chosen = {flag.label}
        choices = [c for c in control.choices if c in chosen]
        if not choices:
            continue  # "none of these": no result item, as an annotation would have
        items.append(
            ResultItem(
                from_name=control.name,
                to_name=control.to_name,
                value=ChoicesValue(choices=choices),
                meta={"review": [flag_record(f) for f in mine]} if mine else None,
            )
        )
    return items


def format_flags(flags: Sequence[Flag], fmt: Format = "table") -> str:
    """The flags as an aligned text table (80 columns), a JSON list of objects, or CSV."""
    if fmt == "json":
        return json.dumps([flag_record(f) for f in flags], indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_FIELDS, lineterminator="\n")
        writer.writeheader()
        for flag in flags:
            writer.writerow({**flag_record(flag), "annotated": str(flag.annotated).lower()})
        return buffer.getvalue()
    if fmt == "table":
        return _table(flags)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


# --------------------------------------------------------------------------- helpers


def _check(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(targets, dtype=np.float32)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"features must be (n, d) and targets (n, n_classes); got shapes {x.shape} and "
            f"{y.shape}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} target rows")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("targets must be 0 or 1: the review judges annotations, not soft labels")
    return x, y


def _check_options(
    shape: tuple[int, ...],
    classes: Sequence[str],
    controls: Sequence[str],
    task_ids: Sequence[int],
    scoring: str,
    min_per_class: int,
    top: int | None,
) -> None:
    if len(shape) != 2:
        raise ValueError(f"targets must be (n, n_classes), got shape {shape}")
    n, n_classes = shape
    if len(classes) != n_classes or len(controls) != n_classes:
        raise ValueError(
            f"{n_classes} target columns but {len(classes)} classes and {len(controls)} controls"
        )
    if len(task_ids) != n:
        raise ValueError(f"{n} target rows but {len(task_ids)} task ids")
    _check_settings(scoring, min_per_class, top)


def _check_settings(scoring: str, min_per_class: int, top: int | None) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {list(SCORINGS)}, got {scoring!r}")
    if top is not None and top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if min_per_class < 1:
        raise ValueError(f"min_per_class must be at least 1, got {min_per_class}")


def _check_probs(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, y = _check(probs, targets)
    if p.shape != y.shape:
        raise ValueError(f"probabilities {p.shape} and targets {y.shape} differ in shape")
    if not (np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()):
        raise ValueError("probabilities must lie in [0, 1]")
    return p, y


def _score(scoring: Scoring, p_opp: np.ndarray, t_opp: np.ndarray) -> np.ndarray:
    if scoring == "probability":
        return p_opp
    if scoring == "margin":
        return p_opp - t_opp
    # A threshold of 1 leaves no room above it; only p_opp == 1 reaches it and scores 0.
    return (p_opp - t_opp) / np.maximum(1.0 - t_opp, 1e-6)


def _control_of_class(
    controls: Sequence[ChoicesControl], examples: Sequence[TrainingExample]
) -> dict[str, str]:
    """Label -> the control that offers it (the config's choices, then what annotations used):
    the name the annotator finds it under in Label Studio."""
    owner: dict[str, str] = {}
    for control in controls:
        for choice in control.choices:
            owner.setdefault(choice, control.name)
    names = {c.name for c in controls}
    for example in examples:
        for control_name, labels in example.labels.items():
            if control_name in names:
                for label in labels:
                    owner.setdefault(label, control_name)
    return owner


def flag_record(flag: Flag) -> dict[str, object]:
    """A flag as JSON: the `--format json` objects, the page's rows and a version's record."""
    # Four decimals: more would only be the fit's noise.
    return {
        **asdict(flag),
        "probability": round(flag.probability, 4),
        "score": round(flag.score, 4),
    }


def _cut(text: str) -> str:
    return text if len(text) <= _TEXT_WIDTH else text[: _TEXT_WIDTH - 1] + "…"


def _table(flags: Sequence[Flag]) -> str:
    if not flags:
        return "No suspect labels: the model agrees with every annotation it can judge.\n"
    header = ("#", "task", "control", "label", "annotated", "p(present)", "score")
    rows = [
        (
            str(rank),
            str(f.task_id),
            _cut(f.control),
            _cut(f.label),
            "present" if f.annotated else "absent",
            f"{f.probability:.3f}",
            f"{f.score:.3f}",
        )
        for rank, f in enumerate(flags, 1)
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    # Numbers right-aligned, text left-aligned.
    right = {0, 1, 5, 6}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)]) + "\n"
