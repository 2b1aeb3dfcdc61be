"""Learning from new annotations in seconds: cached backbone features and a refitted head.

A full fine-tune takes minutes to hours; most of what a few new labels can teach lives in the
final Linear layer. So the backbone's penultimate features are computed once per image and kept
in an SQLite cache keyed by the image bytes and by a fingerprint of the backbone's weights, and
each update refits only the head on those features (full-batch L-BFGS, well under a second).
The fitted head is written back into a copy of the network, so the result is an ordinary model
that serves and publishes like any other.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import PreprocessConfig
from .labelstudio.images import ImageFetchError, decode_image
from .model import head_name
from .store import ModelBundle
from .transforms import eval_transform

logger = logging.getLogger(__name__)

__all__ = [
    "NEW_CLASS_BIAS",
    "EmbeddingCache",
    "Head",
    "backbone_fingerprint",
    "content_key",
    "embed_images",
    "embedding_space",
    "extend_head",
    "extract_features",
    "fit_head",
    "head_of",
    "model_with_head",
    "predict_features",
]

# A class the head has never seen starts at a prior of 5 %: "off" under any sensible threshold,
# so adding a class to the label config does not flood the annotators with suggestions of it
# before a single example has been labelled, yet not so far off that the first few positives
# cannot move it.
NEW_CLASS_PRIOR = 0.05
NEW_CLASS_BIAS = float(np.log(NEW_CLASS_PRIOR / (1.0 - NEW_CLASS_PRIOR)))

_FINGERPRINT_CHARS = 16
# Feature extractors are full copies of a network; two cover "the served model and the
# candidate being trained" without holding every model the process has ever seen.
_MAX_EXTRACTORS = 2
# SQLite's default limit on host parameters was 999 before 3.32; stay under it everywhere.
_SQL_CHUNK = 500


# --------------------------------------------------------------------------- fingerprints


def _head_module(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The head Linear together with its parent module and attribute name."""
    name = head_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = getattr(parent, attr)
    return parent, attr, head


def backbone_fingerprint(model: nn.Module) -> str:
    """A short sha256 over every tensor except the head's: names, dtypes, shapes and bytes.

    Buffers count too (BatchNorm running statistics change the features), while the head does
    not, so a head refit keeps cached embeddings valid and anything that touches the backbone
    invalidates them. The head's layout (with or without a Dropout wrapper) is left out as well:
    in eval mode it does not change the head's input.
    """
    head_prefix = head_name(model) + "."
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        if name.startswith(head_prefix):
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        # A uint8 view hashes any dtype (bfloat16 included) without a conversion copy.
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()[:_FINGERPRINT_CHARS]


def embedding_space(bundle: ModelBundle) -> str:
    """The cache namespace of a bundle's features: its backbone and its eval preprocessing.

    The same backbone fed a different crop or normalisation gives different features, so both
    go into the key under which embeddings are stored (and which `EmbeddingCache.prune` keeps).
    """
    return _space_key(backbone_fingerprint(bundle.model), bundle.preprocess)


def _space_key(fingerprint: str, preprocess: PreprocessConfig) -> str:
    p = preprocess
    recipe = f"{p.image_size}|{p.crop_ratio!r}|{tuple(p.mean)!r}|{tuple(p.std)!r}"
    return f"{fingerprint}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def content_key(data: bytes) -> str:
    """The cache key of an image: sha256 of its bytes, so a re-upload under a new id still hits."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- the cache


class EmbeddingCache:
    """Feature vectors per (embedding space, image content) in one SQLite file.

    Thread-safe: one connection behind a lock. WAL lets a second process read while this one
    writes. It is only a cache, so a file that is not a database is replaced, not repaired.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = self._connect()
        except sqlite3.DatabaseError as exc:
            logger.warning("Embedding cache %s is unreadable (%s); starting it afresh", path, exc)
            for suffix in ("", "-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            self._conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # A crash may lose the last writes, which only costs recomputing them.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS embeddings ("
                " backbone TEXT NOT NULL, content_key TEXT NOT NULL, dim INTEGER NOT NULL,"
                " vector BLOB NOT NULL, PRIMARY KEY (backbone, content_key))"
            )
            conn.commit()
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def get_many(self, backbone: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors among `keys`; absent keys are simply missing from the result."""
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), _SQL_CHUNK):
                chunk = unique[start : start + _SQL_CHUNK]
                rows = self._conn.execute(
                    "SELECT content_key, dim, vector FROM embeddings WHERE backbone = ? AND "
                    f"content_key IN ({','.join('?' * len(chunk))})",
                    (backbone, *chunk),
                ).fetchall()
                for key, dim, blob in rows:
                    vector = np.frombuffer(blob, dtype="<f4")
                    if vector.shape != (dim,):
                        logger.warning("Embedding cache: dropping a damaged row for %s", key)
                        continue
                    found[key] = vector.astype(np.float32)
        return found

    def put_many(self, backbone: str, vectors: Mapping[str, np.ndarray]) -> None:
        rows = []
        for key, vector in vectors.items():
            array = np.asarray(vector)
            if array.ndim != 1 or array.size == 0:
                raise ValueError(
                    f"embedding for {key} must be a non-empty 1-D vector, got shape {array.shape}"
                )
            rows.append((backbone, key, int(array.size), array.astype("<f4").tobytes()))
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO embeddings (backbone, content_key, dim, vector) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )

    def prune(self, keep_backbones: Collection[str]) -> int:
        """Delete the vectors of every other backbone; returns how many rows went."""
        keep = list(keep_backbones)
        with self._lock, self._conn:
            cursor = self._conn.execute(
                f"DELETE FROM embeddings WHERE backbone NOT IN ({','.join('?' * len(keep))})",
                keep,
            )
        removed = cursor.rowcount
        if removed:
            logger.info("Embedding cache: pruned %d vectors of retired backbones", removed)
        return removed

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- features

_extractors: OrderedDict[tuple[str, str], nn.Module] = OrderedDict()
_extractors_lock = threading.Lock()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _extractor(model: nn.Module, fingerprint: str) -> nn.Module:
    """A private copy of `model` with the head replaced by Identity, built once per backbone.

    Hooks or swapping the head in place would be seen by every thread serving predictions with
    the same module; a copy keeps the served model untouched.
    """
    key = (fingerprint, str(_device_of(model)))
    with _extractors_lock:
        cached = _extractors.get(key)
        if cached is not None:
            _extractors.move_to_end(key)
            return cached
        extractor = copy.deepcopy(model)
        parent, attr, _ = _head_module(extractor)
        setattr(parent, attr, nn.Identity())
        extractor.eval()
        _extractors[key] = extractor
        while len(_extractors) > _MAX_EXTRACTORS:
            _extractors.popitem(last=False)
        return extractor


@torch.inference_mode()
def extract_features(
    model: nn.Module, batch: torch.Tensor, *, fingerprint: str | None = None
) -> torch.Tensor:
    """The input of the head Linear for a batch of preprocessed images, in eval mode.

    `fingerprint` (of `model`'s backbone) saves hashing the weights again on every batch.
    """
    extractor = _extractor(model, fingerprint or backbone_fingerprint(model))
    return extractor(batch.to(_device_of(extractor)))


def embed_images(
    bundle: ModelBundle,
    images: Sequence[tuple[str, bytes]],
    cache: EmbeddingCache | None,
    *,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Features (n_ok, d) of the images that decode, in input order, and the keys that did not.

    `images` are (key, bytes) pairs; the key (a task id, say) only names failures. Vectors come
    from `cache` where present; the rest are decoded, preprocessed as in serving and embedded in
    batches, each batch stored as soon as it is done so an interrupted run keeps its work.
    Identical bytes under several keys are embedded once. `progress(done, total)` follows each
    batch, counting the distinct images that had to be embedded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    fingerprint = backbone_fingerprint(bundle.model)
    space = _space_key(fingerprint, bundle.preprocess)
    keyed = [(key, content_key(data)) for key, data in images]
    data_of = {ck: data for (_, ck), (_, data) in zip(keyed, images, strict=True)}
    vectors = _cached(cache, space, list(data_of))
    misses = [ck for ck in data_of if ck not in vectors]
    names_of: dict[str, list[str]] = {}
    for key, ck in keyed:
        names_of.setdefault(ck, []).append(key)

    transform = eval_transform(bundle.preprocess)
    undecodable: set[str] = set()
    for done, chunk in _batches(misses, batch_size):
        tensors, computed = [], []
        for ck in chunk:
            try:
                image = decode_image(data_of[ck])
            except ImageFetchError as exc:
                logger.warning("Not embedding %s: %s", ", ".join(names_of[ck]), exc.reason)
                undecodable.add(ck)
                continue
            tensors.append(transform(image))
            computed.append(ck)
        if tensors:
            features = extract_features(bundle.model, torch.stack(tensors), fingerprint=fingerprint)
            fresh = dict(zip(computed, features.float().cpu().numpy(), strict=True))
            vectors.update(fresh)
            _store(cache, space, fresh)
        if progress is not None:
            progress(done, len(misses))

    dim = _head_module(bundle.model)[2].in_features
    rows = [vectors[ck] for _, ck in keyed if ck not in undecodable]
    features = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    failed = [key for key, ck in keyed if ck in undecodable]
    logger.info(
        "Embedded %d images (%d from cache, %d computed, %d undecodable)",
        len(images),
        len(data_of) - len(misses),
        len(misses) - len(undecodable),
        len(undecodable),
    )
    return features, failed


def _batches(items: Sequence[str], size: int) -> Iterator[tuple[int, Sequence[str]]]:
    """Consecutive chunks with the number of items handed out so far, this chunk included."""
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        yield start + len(chunk), chunk


# A broken cache costs time, never a training run: its errors are logged and worked around.
def _cached(cache: EmbeddingCache | None, space: str, keys: list[str]) -> dict[str, np.ndarray]:
    if cache is None:
        return {}
    try:
        return cache.get_many(space, keys)
    except sqlite3.Error as exc:
        logger.warning("Embedding cache unreadable (%s); computing every embedding", exc)
        return {}


def _store(cache: EmbeddingCache | None, space: str, vectors: Mapping[str, np.ndarray]) -> None:
    if cache is None:
        return
    try:
        cache.put_many(space, vectors)
    except sqlite3.Error as exc:
        logger.warning("Embedding cache not updated (%s)", exc)


# --------------------------------------------------------------------------- the head


@dataclass(frozen=True, eq=False)
class Head:
    """Weights of a head Linear as arrays: `weight` (n_classes, d), `bias` (n_classes,).

    eq=False: generated equality would compare arrays elementwise and then fail on truthiness.
    """

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        weight = np.ascontiguousarray(self.weight, dtype=np.float32)
        bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        if weight.ndim != 2:
            raise ValueError(f"head weight must be 2-D (n_classes, d), got shape {weight.shape}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"head bias must have shape ({weight.shape[0]},) to match the weight, "
                f"got {bias.shape}"
            )
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])


def head_of(model: nn.Module) -> Head:
    linear = _head_module(model)[2]
    weight = linear.weight.detach().cpu().numpy().copy()
    bias = (
        linear.bias.detach().cpu().numpy().copy()
        if linear.bias is not None
        else np.zeros(linear.out_features, np.float32)
    )
    return Head(weight, bias)


def extend_head(head: Head, old_classes: Sequence[str], new_classes: Sequence[str]) -> Head:
    """The head for `new_classes`: rows taken from `head` by class name, new classes off.

    Matching by name keeps what was learnt when classes are reordered or appended; classes not
    in `new_classes` are dropped; a new class gets zero weights and the bias `NEW_CLASS_BIAS`.
    """
    if len(old_classes) != head.n_classes:
        raise ValueError(
            f"the head has {head.n_classes} rows but {len(old_classes)} old class names were given"
        )
    for label, names in (("old", old_classes), ("new", new_classes)):
        duplicates = sorted({n for n in names if list(names).count(n) > 1})
        if duplicates:
            raise ValueError(f"{label} classes name {duplicates} more than once")
    row_of = {name: i for i, name in enumerate(old_classes)}
    weight = np.zeros((len(new_classes), head.dim), np.float32)
    bias = np.full(len(new_classes), NEW_CLASS_BIAS, np.float32)
    for j, name in enumerate(new_classes):
        i = row_of.get(name)
        if i is not None:
            weight[j] = head.weight[i]
            bias[j] = head.bias[i]
    added = [n for n in new_classes if n not in row_of]
    dropped = sorted(set(old_classes) - set(new_classes))
    if added or dropped:
        logger.info("Head extended: new classes %s, dropped %s", added, dropped)
    return Head(weight, bias)


def fit_head(
    features: np.ndarray,
    targets: np.ndarray,
    *,
    init: Head | None = None,
    pos_weight: np.ndarray | None = None,
    l2: float = 1e-3,
    max_iter: int = 100,
    anchor: float = 0.0,
) -> Head:
    """Fit the head on fixed features: full-batch L-BFGS with a strong-Wolfe line search.

    Objective, per class summed and over samples averaged (so each class is its own logistic
    regression, whose penalty does not depend on how many other classes there are)::

        mean_i sum_c BCEWithLogits(pos_weight_c) + l2 * ||W||^2 + anchor * ||W - W_init||^2

    The bias is not penalised. `anchor` keeps the solution near `init` when the new labels are
    few; it needs `init`. Features are used as they are (no standardisation) so the result can
    be written back into the network. Without `init` the start is W = 0 and the bias at each
    class's log-odds, so the fit involves no randomness at all.
    """
    x, y = _check_training_data(features, targets)
    n_classes, dim = y.shape[1], x.shape[1]
    if init is not None and (init.n_classes, init.dim) != (n_classes, dim):
        raise ValueError(
            f"init head is {init.n_classes} classes x {init.dim} features but the data are "
            f"{n_classes} classes x {dim} features; use extend_head to match the classes"
        )
    if anchor < 0 or l2 < 0:
        raise ValueError(f"l2 and anchor must be >= 0, got l2={l2}, anchor={anchor}")
    if anchor > 0 and init is None:
        raise ValueError("anchor > 0 pulls the weights toward init, so init must be given")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    pw = _check_pos_weight(pos_weight, n_classes)

    start = init if init is not None else _prior_head(y, dim)
    # A caller may sit inside inference_mode or no_grad; L-BFGS needs autograd, and tensors
    # made under inference_mode could not take part in it.
    with torch.inference_mode(False), torch.enable_grad():
        head, n_iter, loss = _lbfgs(x, y, start, pw, l2=l2, anchor=anchor, max_iter=max_iter)
    logger.debug("fit_head: %d L-BFGS iterations, objective %.6f", n_iter, loss)
    return head


def _lbfgs(
    features: np.ndarray,
    targets: np.ndarray,
    start: Head,
    pos_weight: np.ndarray | None,
    *,
    l2: float,
    anchor: float,
    max_iter: int,
) -> tuple[Head, int, float]:
    """The fitted head, the iterations taken and the final objective."""
    x, y = torch.from_numpy(features), torch.from_numpy(targets)
    pw = torch.from_numpy(pos_weight) if pos_weight is not None else None
    weight = torch.tensor(start.weight, requires_grad=True)
    bias = torch.tensor(start.bias, requires_grad=True)
    anchor_to = torch.tensor(start.weight)

    def objective() -> torch.Tensor:
        logits = torch.addmm(bias, x, weight.T)
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw, reduction="sum")
        loss = loss / x.shape[0] + l2 * weight.square().sum()
        if anchor > 0:
            loss = loss + anchor * (weight - anchor_to).square().sum()
        return loss

    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    n_iter = int(optimizer.state[weight]["n_iter"])
    with torch.no_grad():
        final = float(objective())
    return Head(weight.detach().numpy(), bias.detach().numpy()), n_iter, final


def _check_training_data(
    features: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(targets, dtype=np.float32)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"features must be (n, d) and targets (n, n_classes); got shapes {x.shape} and "
            f"{y.shape}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} target rows")
    if x.shape[0] == 0:
        raise ValueError("no training examples: features and targets are empty")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    if ((y < 0) | (y > 1)).any():
        raise ValueError("targets must lie in [0, 1]")
    return x, y


def _check_pos_weight(pos_weight: np.ndarray | None, n_classes: int) -> np.ndarray | None:
    if pos_weight is None:
        return None
    pw = np.asarray(pos_weight, dtype=np.float32)
    if pw.shape != (n_classes,):
        raise ValueError(f"pos_weight must have shape ({n_classes},), got {pw.shape}")
    if not (np.isfinite(pw).all() and (pw > 0).all()):
        raise ValueError("pos_weight must be finite and positive")
    return pw


def _prior_head(targets: np.ndarray, dim: int) -> Head:
    """W = 0 and each bias at its class's (smoothed) log-odds: the best start that ignores x."""
    rate = (targets.sum(axis=0) + 0.5) / (targets.shape[0] + 1.0)
    return Head(np.zeros((targets.shape[1], dim), np.float32), np.log(rate / (1.0 - rate)))


def predict_features(features: np.ndarray, head: Head) -> np.ndarray:
    """Sigmoid probabilities (n, n_classes) of `head` on features (n, d)."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != head.dim:
        raise ValueError(f"features must be (n, {head.dim}) for this head, got shape {x.shape}")
    logits = torch.addmm(
        torch.from_numpy(head.bias), torch.from_numpy(x), torch.from_numpy(head.weight).T
    )
    return torch.sigmoid(logits).numpy()


def model_with_head(bundle: ModelBundle, head: Head) -> nn.Module:
    """A copy of the bundle's model carrying `head`, in eval mode; the backbone is untouched.

    Only the Linear is replaced, so a Dropout wrapper around it stays and the state dict keeps
    the layout the manifest's `dropout` describes.
    """
    model = copy.deepcopy(bundle.model)
    parent, attr, old = _head_module(model)
    if head.dim != old.in_features:
        raise ValueError(
            f"the head takes {head.dim} features but {bundle.manifest.backbone}'s backbone "
            f"gives {old.in_features}"
        )
    linear = nn.Linear(head.dim, head.n_classes, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(head.weight))
        linear.bias.copy_(torch.from_numpy(head.bias))
    setattr(parent, attr, linear)
    return model.eval()
