"""Benchmark: does labelling in the product's order save labels over labelling in random order?

Issue 18's measurement: in the loop simulation (same pool, same test set, 3 seeds), annotating
in the product's order vs in random order, the number of labels needed to reach the macro-F1
that random order reaches at 300 labels (target: >= 30 % fewer), and F1 at 50, 100, 200 labels
for both orders.

Data: one labelloop.realdata set, a pool of --n-pool train images and --n-test test images
from disjoint source photos, embedded once by the cold start's backbone
(`resolve_backbone("auto", "imagenet")`, MobileNetV2 with offline ImageNet weights, 224 px);
the embeddings are cached in the system temp dir, keyed by the data parameters, so a rerun
skips straight to the simulation.

The loop, per seed and order, on those embeddings (what a cold-start project's fast update
does, Updater.fast, without the offline replay a cold start does not have): --start random
images labelled (the same for every order of a seed), then rounds of --batch labels. Each
round fits the head as the fast update does (`fit_head` with `class_weights` of the model's
TrainConfig, thresholds from `out_of_fold` probabilities through `tune`, the parent's 0.5
where a class cannot be tuned), records test macro-F1 (`gate.macro_f1`), scores the unlabelled
pool (`labelloop.ml.selection`) and "labels" the --batch lowest scores, or the next --batch of
a fixed random permutation for random order. Differences from the product, the same for
every order: every label is trained on (the product holds 20 % out for its gate), the head
starts from zeros rather than a random Linear (the problem is convex), and the scores are
refreshed after every batch. Product orders that have not reached the target at --random-max
labels go on (up to --max-labels) to find where they do. References (--orders): k-center and
TypiClust, with --typiclust-shuffle to show what TypiClust owes to its k-means start; and the
candidates tried for issue 18 (CANDIDATES, `candidate_scores`), with --strategy-seed to show
what the randomised one (badge) owes to its seed. Runs on
demand, not in the tests (about 11 min for the default orders on a busy 2-core machine):

    nice -n 10 .venv/bin/python bench/active_learning.py --record
    nice -n 10 .venv/bin/python bench/active_learning.py --orders random k-center typiclust --record
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from _common import REPO, machine
from threadpoolctl import threadpool_limits

from labelloop.config import PreprocessConfig, TrainConfig
from labelloop.labels import LabelSpace
from labelloop.loop.gate import macro_f1
from labelloop.ml.embeddings import EmbeddingCache, embed_images
from labelloop.ml.head import Head, fit_head, out_of_fold, predict_features
from labelloop.ml.model import build_model, resolve_backbone
from labelloop.ml.selection import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    diversity_priority,
    priority_scores,
    typicality,
)
from labelloop.realdata import build_realdata, fashion_mnist_dir, load_fashion_mnist
from labelloop.store import ModelBundle, manifest_for
from labelloop.training.core import class_weights, tune

RANDOM = "random"
# References, not product strategies (run them with --orders): pure diversity (k-center greedy
# over the pool, the model ignored), which shows what the weights of the greedy pass add; and
# TypiClust (Hacohen et al., 2022: k-means of the whole pool, in pool order, into labelled +
# batch clusters; the most typical image of each of the largest clusters without a label), the
# low-budget method the density term borrows from (docs/active-learning.md: why it is not one).
KCENTER = "k-center"
TYPICLUST = "typiclust"
# Candidates tried for issue 18 (references until one meets the bar; `candidate_scores`):
# multi-label uncertainty over every class (expected wrong labels, summed binary entropy),
# with and without the density-weighted greedy pass; BADGE (gradient embeddings, k-means++);
# class-aware weighting; stronger density weighting; density alone.
EWL = "ewl"
EWL_DD = "ewl-density-diversity"
ENTROPY_DD = "entropy-density-diversity"
EWL_D = "ewl-density"
MARGIN_D2D = "margin-density2-diversity"
DENSITY_D = "density-diversity"
BADGE = "badge"
BADGE_DENSITY = "badge-density"
CLASS_DD = "class-ewl-density-diversity"
PROBCOVER_EWL = "probcover-ewl"
DENSITY_THEN_EWL = "density-then-ewl-dd"
MARGIN_SQRTD_D = "margin-sqrtdensity-diversity"
EWL_SQRTD_D = "ewl-sqrtdensity-diversity"
# density-then-ewl-dd: labels before this many go by density-diversity (the model-free cold
# start), later ones by ewl-density-diversity.
SWITCH_AT = 100
CANDIDATES = (
    MARGIN_SQRTD_D,
    EWL_SQRTD_D,
    DENSITY_THEN_EWL,
    PROBCOVER_EWL,
    EWL,
    EWL_DD,
    ENTROPY_DD,
    EWL_D,
    MARGIN_D2D,
    DENSITY_D,
    BADGE,
    BADGE_DENSITY,
    CLASS_DD,
)
REFERENCES = (KCENTER, TYPICLUST, *CANDIDATES)
ORDERS = (RANDOM, *STRATEGIES, *REFERENCES)
REPORT_AT = (50, 100, 200, 300)
IMAGE_SIZE = 224  # the cold start's (TrainerSettings.cold_start_image_size)
TRAIN = TrainConfig()


@dataclass(frozen=True)
class Data:
    x_pool: np.ndarray
    y_pool: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    backbone: str
    embed_seconds: float  # 0 when read from the cache
    typical: np.ndarray = field(default_factory=lambda: np.zeros(0))  # typicality of the pool
    typical_seconds: float = 0.0


@dataclass
class Curve:
    order: str
    seed: int
    f1: dict[int, float] = field(default_factory=dict)  # labels -> test macro-F1
    select_seconds: list[float] = field(default_factory=list)

    def reach(self, target: float) -> int | None:
        """The fewest labels at which test macro-F1 reached `target`, None if it never did."""
        return next((n for n, f in sorted(self.f1.items()) if f >= target - 1e-12), None)


def cold_start_bundle(groups: dict[str, tuple[str, ...]]) -> ModelBundle:
    """The backbone a project without a model starts from, with a head over `groups`."""
    space = LabelSpace.from_mapping({g: list(c) for g, c in groups.items()})
    backbone = resolve_backbone("auto", "imagenet")
    model = build_model(backbone, len(space), weights="imagenet").eval()
    preprocess = PreprocessConfig(image_size=IMAGE_SIZE)
    manifest = manifest_for(
        version="bench", backbone=backbone, dropout=0.0, label_space=space, preprocess=preprocess
    )
    return ModelBundle(model, space, [0.5] * len(space), preprocess, manifest, Path("."))


def load_data(args: argparse.Namespace) -> Data:
    """The pool's and test set's embeddings and targets, from the cache file when it exists."""
    params = {
        "source": "fashion-mnist",
        "n_pool": args.n_pool,
        "n_test": args.n_test,
        "data_seed": args.data_seed,
        "image_px": args.image_px,
        "backbone": resolve_backbone("auto", "imagenet"),
        "image_size": IMAGE_SIZE,
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / f"realdata-{key}.npz"
    if path.exists():
        with np.load(path) as f:
            return Data(
                f["x_pool"],
                f["y_pool"],
                f["x_test"],
                f["y_test"],
                tuple(str(c) for c in f["classes"]),
                str(f["backbone"]),
                0.0,
            )
    started = time.perf_counter()
    pool = load_fashion_mnist(fashion_mnist_dir(args.cache))
    with tempfile.TemporaryDirectory() as tmp:
        data = build_realdata(
            Path(tmp),
            pool,
            n_train=args.n_pool,
            n_test=args.n_test,
            seed=args.data_seed,
            size=args.image_px,
        )
        groups = {g: tuple(c) for g, c in data.groups.items()}
        classes = tuple(c for cs in groups.values() for c in cs)
        bundle = cold_start_bundle(groups)
        # The per-image cache lets an interrupted first run resume where it stopped.
        with EmbeddingCache(args.work / "embeddings.sqlite3") as cache:
            arrays = {}
            for split in ("train", "test"):
                ds = data.split(split)
                truth = ds.labels()
                names = sorted(truth)
                x, failed = embed_images(
                    bundle, [(n, (ds.images_dir / n).read_bytes()) for n in names], cache
                )
                assert not failed, failed
                y = np.array(
                    [[c in sum(truth[n].values(), []) for c in classes] for n in names],
                    dtype=np.float32,
                )
                arrays[split] = (x, y)
    embed_seconds = time.perf_counter() - started
    (x_pool, y_pool), (x_test, y_test) = arrays["train"], arrays["test"]
    np.savez(
        path,
        x_pool=x_pool,
        y_pool=y_pool,
        x_test=x_test,
        y_test=y_test,
        classes=np.array(classes),
        backbone=np.array(params["backbone"]),
    )
    return Data(x_pool, y_pool, x_test, y_test, classes, str(params["backbone"]), embed_seconds)


def fit_round(
    x: np.ndarray, y: np.ndarray, classes: Sequence[str], folds: int
) -> tuple[Head, np.ndarray]:
    """The fast update's head and thresholds on these labels (module docstring)."""
    n_classes = y.shape[1]
    init = Head(np.zeros((n_classes, x.shape[1]), np.float32), np.zeros(n_classes, np.float32))
    pos_weight = class_weights(y, TRAIN.optim, classes).numpy()
    w = np.ones(len(x), np.float32)
    carried = [TRAIN.thresholds.default] * n_classes
    oof = out_of_fold(x, y, w, init=init, pos_weight=pos_weight, folds=folds)
    if oof is None:
        thresholds = np.asarray(carried)
    else:
        thresholds = np.asarray(tune(y, oof, TRAIN.thresholds, classes, carried=carried).values)
    head = fit_head(x, y, init=init, pos_weight=pos_weight, sample_weight=w)
    return head, thresholds


def simulate(
    order: str, seed: int, data: Data, args: argparse.Namespace, stop_at: float | None
) -> Curve:
    """Test F1 along one labelling order, to --random-max labels for random order, to
    --random-max and on (up to --max-labels) until `stop_at` is reached for the others."""
    n_pool = len(data.x_pool)
    rng = np.random.default_rng(seed)
    labelled = list(rng.choice(n_pool, size=args.start, replace=False))
    rest = np.setdiff1d(np.arange(n_pool), labelled)
    permutation = list(np.random.default_rng([seed, 1]).permutation(rest))
    curve = Curve(order, seed)
    limit = args.random_max if order == RANDOM else args.max_labels
    while True:
        x, y = data.x_pool[labelled], data.y_pool[labelled]
        head, thresholds = fit_round(x, y, data.classes, args.folds)
        f1 = macro_f1(data.y_test, predict_features(data.x_test, head) >= thresholds)
        n = len(labelled)
        curve.f1[n] = f1
        if n + args.batch > limit or n + args.batch > n_pool:
            break
        if n >= args.random_max and (stop_at is None or f1 >= stop_at):
            break
        if order == RANDOM:
            chosen = [int(i) for i in permutation[: args.batch]]
            permutation = permutation[args.batch :]
        else:
            chosen, seconds = pick(order, head, thresholds, labelled, data, args)
            curve.select_seconds.append(seconds)
        labelled.extend(chosen)
    return curve


def pick(
    order: str,
    head: Head,
    thresholds: np.ndarray,
    labelled: list[int],
    data: Data,
    args: argparse.Namespace,
) -> tuple[list[int], float]:
    """The --batch unlabelled items the order labels next (its lowest scores), and the
    seconds the scoring took."""
    mask = np.ones(len(data.x_pool), dtype=bool)
    mask[labelled] = False
    unlabelled = np.flatnonzero(mask)
    x_unl, x_lab = data.x_pool[unlabelled], data.x_pool[labelled]
    probs = predict_features(x_unl, head)
    t0 = time.perf_counter()
    if order == KCENTER:
        scores = diversity_priority(x_unl, x_lab, np.ones(len(x_unl)), horizon=args.batch)
    elif order == TYPICLUST:
        scores = typiclust(data, labelled, unlabelled, args.batch, args.typiclust_shuffle)
    elif order in CANDIDATES:
        scores = candidate_scores(
            order,
            probs,
            thresholds,
            x_unl,
            x_lab,
            data.y_pool[labelled],
            data.typical[unlabelled],
            args.batch,
            [args.strategy_seed, len(labelled)],
        )
    else:
        scores = priority_scores(
            probs,
            thresholds,
            strategy=order,  # type: ignore[arg-type]
            unlabelled=x_unl,
            labelled=x_lab,
            # Only the first --batch places are labelled before the next round re-plans, and
            # they do not depend on the horizon (tests/unit/test_selection.py): plan just those.
            horizon=args.batch,
            # The pool's typicality, computed once (it does not depend on the model), as
            # the serving side would keep it.
            typical=data.typical[unlabelled],
        )
    seconds = time.perf_counter() - t0
    # Stable: equal scores keep pool order, so the run is deterministic.
    order_of = np.argsort(scores, kind="stable")[: args.batch]
    return [int(unlabelled[i]) for i in order_of], seconds


def typiclust(
    data: Data, labelled: list[int], unlabelled: np.ndarray, batch: int, shuffle: bool
) -> np.ndarray:
    """Scores putting TypiClust's `batch` picks first (the reference, module constants).

    k-means sees the pool in pool order, the same every round, unless `shuffle`: then in an
    order drawn afresh each round, which shows how much the result owes to the initialisation.
    """
    from sklearn.cluster import KMeans

    x = data.x_pool / np.linalg.norm(data.x_pool, axis=1, keepdims=True)
    order = (
        np.random.default_rng(len(labelled)).permutation(len(x)) if shuffle else np.arange(len(x))
    )
    n_clusters = min(len(x), len(labelled) + batch)
    cluster = np.empty(len(x), dtype=int)
    cluster[order] = KMeans(n_clusters=n_clusters, n_init=1, random_state=0).fit(x[order]).labels_
    covered = set(cluster[labelled].tolist())
    sizes = np.bincount(cluster, minlength=n_clusters)
    free = [c for c in np.argsort(-sizes, kind="stable") if c not in covered][:batch]
    position = {int(g): j for j, g in enumerate(unlabelled)}
    scores = np.ones(len(unlabelled))
    for rank, c in enumerate(free):
        members = [int(i) for i in np.flatnonzero(cluster == c) if int(i) in position]
        best = members[int(np.argmax(typicality(x[members])))] if len(members) > 1 else members[0]
        scores[position[best]] = rank / (2 * batch)
    return scores


def calibrated(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Probabilities mapped piecewise-linearly so that each class's threshold sits at 0.5
    (0 -> 0, t -> 0.5, 1 -> 1): `|2q - 1|` is then the per-class margin of
    `prediction_confidence`, and `min(q, 1 - q)` the chance of being on the wrong side."""
    t = np.clip(np.asarray(thresholds, dtype=np.float64), 1e-6, 1 - 1e-6)
    p = np.asarray(probs, dtype=np.float64)
    q = np.where(p < t, p / (2 * t), 0.5 + (p - t) / (2 * (1 - t)))
    return np.clip(q, 0.0, 1.0)


def expected_wrong(q: np.ndarray, class_weight: np.ndarray | None = None) -> np.ndarray:
    """Expected share of wrong labels per item in [0, 1]: sum_c w_c min(q, 1 - q) / (sum w / 2)."""
    wrong = np.minimum(q, 1.0 - q)
    w = np.ones(q.shape[1]) if class_weight is None else class_weight
    return np.clip((wrong @ w) / (w.sum() / 2.0), 0.0, 1.0)


def summed_entropy(q: np.ndarray) -> np.ndarray:
    """Mean binary entropy (bits) of the calibrated probabilities, in [0, 1]."""
    r = np.clip(q, 1e-12, 1 - 1e-12)
    h = -(r * np.log2(r) + (1 - r) * np.log2(1 - r))
    return np.clip(h.mean(axis=1), 0.0, 1.0)


def ranked(first: np.ndarray, n: int, tail: np.ndarray) -> np.ndarray:
    """Scores with `first` (item indices, in order) ahead of everything, then `tail` order."""
    k = len(first)
    h = k / n
    scores = h + (1.0 - h) * np.clip(tail, 0.0, 1.0)
    scores[np.asarray(first, dtype=int)] = np.arange(k) / n
    return scores


def badge_order(
    q: np.ndarray,
    x: np.ndarray,
    k: int,
    rng: np.random.Generator | None,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """BADGE's batch (Ash et al., 2020) for a sigmoid head: k-means++ seeding over the
    gradient embeddings of the binary cross-entropy w.r.t. the head's weights with the head's
    own hard predictions as labels, g_i = (q_i - yhat_i) (x) x_i (C x d). Never formed:
    <g_i, g_j> = <r_i, r_j> <x_i, x_j>. First centre: the largest norm; then D^2 sampling
    (`rng`), or, with `rng` None, the argmax of `weight` * D^2 (deterministic)."""
    r = q - (q >= 0.5)
    xx = x.astype(np.float64)
    norms = (r * r).sum(axis=1) * (xx * xx).sum(axis=1)
    w = np.ones(len(x)) if weight is None else weight
    first = int(np.argmax(norms * w))
    chosen = [first]
    d2 = np.full(len(x), np.inf)
    for _ in range(1, min(k, len(x))):
        c = chosen[-1]
        dist = norms + norms[c] - 2.0 * (r @ r[c]) * (xx @ xx[c])
        np.minimum(d2, np.maximum(dist, 0.0), out=d2)
        d2[chosen] = 0.0
        if rng is None:
            c = int(np.argmax(w * d2))
        else:
            total = d2.sum()
            c = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(np.argmax(w))
        chosen.append(c)
    return np.asarray(chosen)


def probcover_ewl(
    x_unl: np.ndarray, x_lab: np.ndarray, ewl: np.ndarray, typical: np.ndarray, k: int
) -> np.ndarray:
    """ProbCover (Yehuda et al., 2022), deterministic greedy max coverage of delta-balls, with
    each covered item counted by its expected wrong labels: pick the unlabelled item whose ball
    holds the most uncertainty not yet in a labelled or picked item's ball. delta: the median
    distance to the 20th nearest neighbour (typicality's neighbourhood). With nothing left to
    cover, the remaining picks go by ewl * typicality."""
    xu = x_unl / np.linalg.norm(x_unl, axis=1, keepdims=True)
    xl = x_lab / np.linalg.norm(x_lab, axis=1, keepdims=True)
    d_uu = np.clip((1.0 - xu @ xu.T) / 2.0, 0.0, 1.0)
    kth = np.partition(d_uu + np.eye(len(xu)) * 9, 19, axis=1)[:, 19]
    delta = float(np.median(kth))
    ball = d_uu < delta  # includes the item itself
    covered = (np.clip((1.0 - xu @ xl.T) / 2.0, 0.0, 1.0) < delta).any(axis=1)
    picks: list[int] = []
    for _ in range(min(k, len(xu))):
        gain = ball[:, ~covered].astype(np.float64) @ ewl[~covered]
        gain[picks] = -1.0
        if gain.max() <= 0:
            w = ewl * typical
            w[picks] = -1.0
            c = int(np.argmax(w))
        else:
            c = int(np.argmax(gain))
        picks.append(c)
        covered |= ball[c]
    return ranked(np.asarray(picks), len(xu), 1.0 - ewl)


def candidate_scores(
    order: str,
    probs: np.ndarray,
    thresholds: np.ndarray,
    x_unl: np.ndarray,
    x_lab: np.ndarray,
    y_lab: np.ndarray,
    typical: np.ndarray,
    batch: int,
    seed: list[int],
) -> np.ndarray:
    """Scores (lower = label first) of the candidate orders (module constants)."""
    n = len(x_unl)
    q = calibrated(probs, thresholds)
    ewl = expected_wrong(q)
    margin = 1.0 - 2.0 * np.minimum(q, 1.0 - q).max(axis=1)  # = prediction_confidence
    if order == EWL:
        return 1.0 - ewl
    if order == EWL_D:
        return 1.0 - ewl * typical
    if order == DENSITY_THEN_EWL:
        order = DENSITY_D if len(y_lab) < SWITCH_AT else EWL_DD
    if order == EWL_DD:
        return diversity_priority(x_unl, x_lab, ewl * typical, horizon=batch, margins=1.0 - ewl)
    if order == ENTROPY_DD:
        h = summed_entropy(q)
        return diversity_priority(x_unl, x_lab, h * typical, horizon=batch, margins=1.0 - h)
    if order == EWL_SQRTD_D:
        return diversity_priority(
            x_unl, x_lab, ewl * np.sqrt(typical), horizon=batch, margins=1.0 - ewl
        )
    if order == MARGIN_SQRTD_D:
        u = np.clip(1.0 - margin, 0.0, 1.0)
        return diversity_priority(x_unl, x_lab, u * np.sqrt(typical), horizon=batch, margins=margin)
    if order == MARGIN_D2D:
        u = np.clip(1.0 - margin, 0.0, 1.0)
        return diversity_priority(x_unl, x_lab, u * typical**2, horizon=batch, margins=margin)
    if order == DENSITY_D:
        return diversity_priority(x_unl, x_lab, typical, horizon=batch, margins=1.0 - ewl)
    if order == CLASS_DD:
        # Classes with few labelled examples on their rarer side weigh more: 1 / sqrt(1 + n).
        pos = y_lab.sum(axis=0)
        rare = np.minimum(pos, len(y_lab) - pos)
        w = 1.0 / np.sqrt(1.0 + rare)
        # ... and so do items predicted positive for a class with few labelled positives.
        positive = (q >= 0.5) @ (1.0 / np.sqrt(1.0 + pos))
        u = expected_wrong(q, w) * (1.0 + positive / max(positive.max(), 1e-12))
        u = u / max(u.max(), 1e-12)
        return diversity_priority(x_unl, x_lab, u * typical, horizon=batch, margins=1.0 - u)
    if order == PROBCOVER_EWL:
        return probcover_ewl(x_unl, x_lab, ewl, typical, batch)
    if order == BADGE:
        picks = badge_order(q, x_unl, batch, np.random.default_rng(seed))
        return ranked(picks, n, 1.0 - ewl)
    if order == BADGE_DENSITY:
        picks = badge_order(q, x_unl, batch, None, weight=typical)
        return ranked(picks, n, 1.0 - ewl)
    raise ValueError(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-pool", type=int, default=2000, help="unlabelled pool (train)")
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the realdata set")
    parser.add_argument("--image-px", type=int, default=96)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--start", type=int, default=20, help="random labels to start from")
    parser.add_argument("--batch", type=int, default=10, help="labels per round")
    parser.add_argument("--random-max", type=int, default=300)
    parser.add_argument("--max-labels", type=int, default=600, help="cap for product orders")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--typiclust-shuffle",
        action="store_true",
        help="the typiclust reference clusters the pool in a new random order each round",
    )
    parser.add_argument(
        "--strategy-seed",
        type=int,
        default=0,
        help="seed of the randomised candidates (badge's k-means++ sampling), to show what "
        "their result owes to it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and BLAS threads: the fits and the greedy pass are small (a few hundred x "
        "1280, one matrix-vector product per pick), and more threads only add "
        "synchronisation, which on a busy machine made a round 30x slower",
    )
    parser.add_argument(
        "--orders",
        nargs="+",
        choices=ORDERS,
        default=[RANDOM, *STRATEGIES],
        help=f"orders to compare; references: {', '.join(REFERENCES)}",
    )
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "labelloop-active-learning"
    )
    parser.add_argument("--cache", type=Path, default=None, help="Fashion-MNIST cache folder")
    parser.add_argument("--record", action="store_true", help="append the section to --out")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "active-learning.md")
    args = parser.parse_args()
    if RANDOM not in args.orders:
        parser.error("random order is the baseline: --orders must include it")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Classes without positives in the first rounds are expected; one warning per fit is noise.
    logging.getLogger("labelloop").setLevel(logging.ERROR)

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    started = time.perf_counter()
    data = load_data(args)
    t0 = time.perf_counter()
    typical = typicality(data.x_pool)
    data = replace(data, typical=typical, typical_seconds=time.perf_counter() - t0)
    print(
        f"pool {data.x_pool.shape}, test {data.x_test.shape}, classes {list(data.classes)}; "
        f"embedded in {data.embed_seconds:.0f} s",
        flush=True,
    )
    curves: list[Curve] = []
    for seed in args.seeds:
        baseline = simulate(RANDOM, seed, data, args, None)
        curves.append(baseline)
        target = baseline.f1[max(baseline.f1)]
        for order in [o for o in args.orders if o != RANDOM]:
            curves.append(simulate(order, seed, data, args, target))
        for c in curves[-len(args.orders) :]:
            shown = "  ".join(f"@{n} {c.f1[n]:.3f}" for n in REPORT_AT if n in c.f1)
            print(
                f"seed {seed} {c.order:<16} {shown}  reach {target:.3f}: {c.reach(target)}",
                flush=True,
            )
    total = time.perf_counter() - started
    section = render(args, data, curves, total)
    print("\n" + section)
    if args.record:
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(section)


def mean_curve(curves: list[Curve]) -> dict[int, float]:
    """Mean F1 over the seeds at every label count all of them reached."""
    common = set.intersection(*(set(c.f1) for c in curves))
    return {n: statistics.fmean(c.f1[n] for c in curves) for n in sorted(common)}


def first_reach(curve: dict[int, float], target: float) -> int | None:
    return next((n for n, f in sorted(curve.items()) if f >= target - 1e-12), None)


def render(args: argparse.Namespace, data: Data, curves: list[Curve], total: float) -> str:
    by_order = {o: [c for c in curves if c.order == o] for o in args.orders}
    random_mean = mean_curve(by_order[RANDOM])
    target = random_mean[args.random_max]
    seeds = ", ".join(str(s) for s in args.seeds)
    n_classes = len(data.classes)
    prevalence = ", ".join(
        f"{c} {p:.0%}" for c, p in zip(data.classes, data.y_pool.mean(axis=0), strict=True)
    )
    lines = [
        f"\n### Labelling order on real photos, {dt.date.today()}\n",
        f"Machine: {machine()}. `bench/active_learning.py`: labelloop.realdata "
        f"({args.image_px} px, data seed {args.data_seed}), a pool of {len(data.x_pool)} train "
        f"images and {len(data.x_test)} fixed test images from disjoint source photos, "
        f"{n_classes} classes (pool prevalence: {prevalence}); {data.backbone} ImageNet "
        f"features at {IMAGE_SIZE} px. Start: {args.start} random labels (seeds {seeds}: the "
        f"start and the random order); rounds of {args.batch} labels; each round the fast "
        f"update's head (class weights, {args.folds}-fold out-of-fold thresholds) on the "
        f"labels so far, test macro-F1, then the next {args.batch} in the order"
        + (
            " (typiclust: k-means in a new random pool order each round)"
            if args.typiclust_shuffle
            else ""
        )
        + (f" (badge: strategy seed {args.strategy_seed})" if args.strategy_seed else "")
        + f". Target: the mean F1 random order reaches at {args.random_max} "
        f"labels, {target:.3f}; labels to reach it on the mean curve over the seeds (per seed: "
        f"each seed's own random F1 at {args.random_max}); saving = 1 - labels / "
        f"{args.random_max}. Whole run {total / 60:.1f} min"
        + (f" (embedding {data.embed_seconds:.0f} s)" if data.embed_seconds else "")
        + ".\n",
        "| order | labels to reach | saving | per seed | F1@50 | F1@100 | F1@200 "
        f"| F1@{args.random_max} | selection ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for order, rows in by_order.items():
        mean = mean_curve(rows)
        reach = args.random_max if order == RANDOM else first_reach(mean, target)
        longest = max(mean)
        reached = f"{reach}" if reach is not None else f"> {longest}"
        saving = f"{1 - reach / args.random_max:.0%}" if reach is not None else "-"
        per_seed = []
        for c in rows:
            own = by_order[RANDOM][args.seeds.index(c.seed)]
            r = c.reach(own.f1[args.random_max])
            per_seed.append(str(r) if r is not None else f">{max(c.f1)}")
        at = [
            f"{mean[n]:.3f} ({min(c.f1[n] for c in rows):.3f}-{max(c.f1[n] for c in rows):.3f})"
            if n in mean
            else "-"
            for n in (50, 100, 200, args.random_max)
        ]
        timing = [s for c in rows for s in c.select_seconds]
        ms = f"{1000 * statistics.fmean(timing):.0f}" if timing else "-"
        name = f"{order} (default)" if order == DEFAULT_STRATEGY else order
        if order == RANDOM:
            # Its own first reach: how early the noise of the curve alone crosses the target.
            early = first_reach(mean, target)
            reached = f"{args.random_max} (first touch: {early})"
        lines.append(
            f"| {name} | {reached} | {saving} | {' / '.join(per_seed)} | {' | '.join(at)} | {ms} |"
        )
    lines.append(
        "\nF1 cells: mean over the seeds (min-max). Selection ms: scoring the whole unlabelled "
        "pool once (`priority_scores` / `diversity_priority`), the model's probabilities "
        f"excluded; the pool's `typicality`, computed once, took {1000 * data.typical_seconds:.0f} "
        "ms more."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
