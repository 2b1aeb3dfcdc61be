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
from pathlib import Path
from types import TracebackType
from typing import Protocol

import numpy as np
import torch
from torch import nn

from labelloop.config import PreprocessConfig
from labelloop.ml.checkpoints import head_name
from labelloop.ml.images import ImageError, decode_image
from labelloop.ml.transforms import eval_transform, resize_size

logger = logging.getLogger(__name__)

__all__ = [
    "EmbeddingCache",
    "backbone_fingerprint",
    "content_key",
    "embed_images",
    "embedding_space",
    "extract_features",
]


_FINGERPRINT_CHARS = 16
# Feature extractors are full copies of a network; two cover "the served model and the
# candidate being trained" without holding every model the process has ever seen.
_MAX_EXTRACTORS = 2
# SQLite's default limit on host parameters was 999 before 3.32; stay under it everywhere.
_SQL_CHUNK = 500


# --------------------------------------------------------------------------- fingerprints


def head_module(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
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


class EmbeddingSource(Protocol):
    """What embedding needs of a model bundle: the network and its eval preprocessing."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def preprocess(self) -> PreprocessConfig: ...


def embedding_space(bundle: EmbeddingSource) -> str:
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
        parent, attr, _ = head_module(extractor)
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
    bundle: EmbeddingSource,
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
                image = decode_image(data_of[ck], min_side=resize_size(bundle.preprocess))
            except ImageError as exc:
                logger.warning("Not embedding %s: %s", ", ".join(names_of[ck]), exc.reason)
                undecodable.add(ck)
                continue
            tensors.append(transform(image))
            computed.append(ck)
        if tensors:
            batch = extract_features(bundle.model, torch.stack(tensors), fingerprint=fingerprint)
            fresh = dict(zip(computed, batch.float().cpu().numpy(), strict=True))
            vectors.update(fresh)
            _store(cache, space, fresh)
        if progress is not None:
            progress(done, len(misses))

    dim = head_module(bundle.model)[2].in_features
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
