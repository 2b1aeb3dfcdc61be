from __future__ import annotations

import copy
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from torch import nn

from labelloop.config import PreprocessConfig
from labelloop.labels import LabelSpace
from labelloop.ml import embeddings as incremental
from labelloop.ml.checkpoints import head_name
from labelloop.ml.embeddings import (
    EmbeddingCache,
    backbone_fingerprint,
    content_key,
    embed_images,
    embedding_space,
    extract_features,
)
from labelloop.ml.head import (
    NEW_CLASS_BIAS,
    Head,
    extend_head,
    fit_head,
    head_of,
    model_with_head,
    predict_features,
)
from labelloop.ml.model import build_model
from labelloop.ml.transforms import eval_transform
from labelloop.store import ModelBundle, manifest_for

SPACE = LabelSpace.from_mapping({"components": ["bolt", "nut"], "defects": ["rust"]})


def _bundle(
    backbone: str = "resnet18", *, dropout: float = 0.0, image_size: int = 32, seed: int = 0
) -> ModelBundle:
    torch.manual_seed(seed)
    model = build_model(backbone, len(SPACE), dropout=dropout).eval()
    preprocess = PreprocessConfig(image_size=image_size)
    manifest = manifest_for(
        version="v1-20240101T000000",
        backbone=backbone,
        dropout=dropout,
        label_space=SPACE,
        preprocess=preprocess,
    )
    return ModelBundle(model, SPACE, [0.5] * len(SPACE), preprocess, manifest, Path("."))


def _png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _batch(bundle: ModelBundle, n: int = 3) -> torch.Tensor:
    transform = eval_transform(bundle.preprocess)
    return torch.stack([transform(Image.open(io.BytesIO(_png(i)))) for i in range(n)])


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_ignores_the_head_and_sees_the_backbone() -> None:
    bundle = _bundle()
    other_head = model_with_head(bundle.model, Head(np.ones((5, 512)), np.zeros(5)))
    assert backbone_fingerprint(other_head) == backbone_fingerprint(bundle.model)
    wrapped = build_model("resnet18", 2, dropout=0.5)
    wrapped.load_state_dict(
        {k: v for k, v in bundle.model.state_dict().items() if not k.startswith("fc.")},
        strict=False,
    )
    assert backbone_fingerprint(wrapped) == backbone_fingerprint(bundle.model)

    changed = copy.deepcopy(bundle.model)
    with torch.no_grad():
        changed.layer3[0].bn1.running_mean[0] += 1.0
    assert backbone_fingerprint(changed) != backbone_fingerprint(bundle.model)
    assert len(backbone_fingerprint(bundle.model)) == 16


def test_embedding_space_depends_on_preprocessing() -> None:
    small, large = _bundle(image_size=32), _bundle(image_size=48)
    assert backbone_fingerprint(small.model) == backbone_fingerprint(large.model)
    assert embedding_space(small) != embedding_space(large)


# --------------------------------------------------------------------------- features


@pytest.mark.parametrize(("backbone", "dim"), [("resnet18", 512), ("mobilenet_v2", 1280)])
def test_features_are_the_head_input(backbone: str, dim: int) -> None:
    bundle = _bundle(backbone)
    x = _batch(bundle)
    with torch.inference_mode():
        before = bundle.model(x)
    features = extract_features(bundle.model, x)
    assert features.shape == (3, dim)
    head = bundle.model.get_submodule(head_name(bundle.model))
    with torch.inference_mode():
        torch.testing.assert_close(head(features), before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bundle.model(x), before, atol=0, rtol=0)
    assert isinstance(head, nn.Linear)
    assert not _has_hooks(bundle.model)


def test_features_skip_a_dropout_wrapper() -> None:
    bundle = _bundle(dropout=0.5)
    x = _batch(bundle, 2)
    features = extract_features(bundle.model, x)
    with torch.inference_mode():
        torch.testing.assert_close(bundle.model.fc[1](features), bundle.model(x), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- cache


def test_cache_round_trip_prune_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "embeddings.sqlite3"
    a, b = np.arange(4, dtype=np.float32), np.ones(3, dtype=np.float64)
    with EmbeddingCache(path) as cache:
        cache.put_many("bb1", {"k1": a, "k2": b})
        cache.put_many("bb2", {"k1": -a})
        got = cache.get_many("bb1", ["k1", "k2", "missing"])
        assert set(got) == {"k1", "k2"}
        np.testing.assert_array_equal(got["k1"], a)
        assert got["k2"].dtype == np.float32 and got["k2"].tolist() == [1.0, 1.0, 1.0]
        assert cache.get_many("bb3", ["k1"]) == {}
    with EmbeddingCache(path) as cache:
        np.testing.assert_array_equal(cache.get_many("bb2", ["k1"])["k1"], -a)
        assert cache.prune(["bb2"]) == 2
        assert cache.get_many("bb1", ["k1", "k2"]) == {}
        assert set(cache.get_many("bb2", ["k1"])) == {"k1"}
        with pytest.raises(ValueError, match="1-D"):
            cache.put_many("bb1", {"k": np.zeros((2, 2))})


def test_cache_is_shared_by_threads(tmp_path: Path) -> None:
    with EmbeddingCache(tmp_path / "e.sqlite3") as cache:

        def work(t: int) -> int:
            for i in range(20):
                cache.put_many("bb", {f"{t}-{i}": np.full(4, t, np.float32)})
            return len(cache.get_many("bb", [f"{t}-{i}" for i in range(20)]))

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(work, range(4))) == [20] * 4


def test_unreadable_cache_file_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "embeddings.sqlite3"
    path.write_bytes(b"this is not a database, just some bytes" * 100)
    with EmbeddingCache(path) as cache:
        cache.put_many("bb", {"k": np.ones(2)})
        assert set(cache.get_many("bb", ["k"])) == {"k"}


@pytest.fixture
def forward_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of every feature extraction embed_images runs."""
    calls: list[int] = []
    real = incremental.extract_features

    def spy(model: nn.Module, batch: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append(len(batch))
        return real(model, batch, **kwargs)

    monkeypatch.setattr(incremental, "extract_features", spy)
    return calls


def test_embed_images_uses_the_cache(tmp_path: Path, forward_passes: list[int]) -> None:
    bundle = _bundle()
    images = [(f"task{i}", _png(i)) for i in range(5)]
    images.append(("copy-of-task1", images[1][1]))
    progress: list[tuple[int, int]] = []
    with EmbeddingCache(tmp_path / "e.sqlite3") as cache:
        features, failed = embed_images(
            bundle, images, cache, batch_size=2, progress=lambda d, t: progress.append((d, t))
        )
        assert features.shape == (6, 512) and features.dtype == np.float32
        assert failed == []
        assert forward_passes == [2, 2, 1]  # five distinct images, the copy embedded once
        assert progress == [(2, 5), (4, 5), (5, 5)]
        np.testing.assert_array_equal(features[1], features[5])
        direct = extract_features(bundle.model, _batch(bundle, 3)).numpy()
        np.testing.assert_allclose(features[:3], direct, atol=1e-5)

        forward_passes.clear()
        again, _ = embed_images(bundle, images, cache)
        assert forward_passes == []
        np.testing.assert_array_equal(again, features)

        other = _bundle(seed=1)
        embed_images(other, images[:2], cache)
        assert forward_passes == [2]
        assert cache.prune([embedding_space(other)]) == 5
        stored = cache.get_many(embedding_space(other), [content_key(d) for _, d in images])
        assert len(stored) == 2


def test_embed_images_reports_undecodable_images(forward_passes: list[int]) -> None:
    bundle = _bundle()
    images = [("a", _png(0)), ("broken", b"not an image"), ("empty", b""), ("b", _png(1))]
    features, failed = embed_images(bundle, images, None)
    assert failed == ["broken", "empty"]
    assert features.shape == (2, 512)
    np.testing.assert_allclose(features, extract_features(bundle.model, _batch(bundle, 2)), 1e-5)

    nothing, failed = embed_images(bundle, images[1:3], None)
    assert nothing.shape == (0, 512) and failed == ["broken", "empty"]


# --------------------------------------------------------------------------- head


def test_extend_head_keeps_rows_by_name() -> None:
    head = Head(np.arange(6, dtype=np.float32).reshape(3, 2), np.array([0.1, 0.2, 0.3]))
    extended = extend_head(head, ["a", "b", "c"], ["c", "a", "d"])
    np.testing.assert_array_equal(extended.weight, [[4, 5], [0, 1], [0, 0]])
    np.testing.assert_allclose(extended.bias, [0.3, 0.1, NEW_CLASS_BIAS])
    assert 1 / (1 + np.exp(-NEW_CLASS_BIAS)) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="3 rows but 2"):
        extend_head(head, ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="more than once"):
        extend_head(head, ["a", "b", "c"], ["a", "a"])


def _blobs(
    n: int, seed: int, *, noise: float = 1.0, n_classes: int = 3, dim: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Each class shifts the features one way when present and the other way when absent."""
    centres = np.random.default_rng(100).normal(size=(n_classes, dim))
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_classes)) < 0.3).astype(np.float32)
    x = (2 * y - 1) @ centres + noise * rng.normal(size=(n, dim))
    return x.astype(np.float32), y


def _objective(x: np.ndarray, y: np.ndarray, head: Head, l2: float) -> float:
    z = x.astype(np.float64) @ head.weight.T + head.bias
    bce = np.logaddexp(0, z) - y * z
    return float(bce.sum() / len(x) + l2 * np.square(head.weight.astype(np.float64)).sum())


def test_fit_head_learns_a_separable_problem() -> None:
    x, y = _blobs(200, seed=1)
    x_test, y_test = _blobs(200, seed=2)
    head = fit_head(x, y)
    probs = predict_features(x_test, head)
    for c in range(y.shape[1]):
        assert average_precision_score(y_test[:, c], probs[:, c]) > 0.95
    again = fit_head(x, y)
    np.testing.assert_array_equal(again.weight, head.weight)


def _iterations_to_converge(x: np.ndarray, y: np.ndarray, init: Head | None, l2: float) -> int:
    best = _objective(x, y, fit_head(x, y, l2=l2, max_iter=200), l2)
    for k in range(1, 200):
        if _objective(x, y, fit_head(x, y, init=init, l2=l2, max_iter=k), l2) <= best + 1e-4:
            return k
    raise AssertionError("did not converge")


def test_warm_start_converges_no_slower() -> None:
    x, y = _blobs(200, seed=1)
    old = fit_head(x[:60], y[:60], l2=1e-2)
    cold = _iterations_to_converge(x, y, None, 1e-2)
    warm = _iterations_to_converge(x, y, old, 1e-2)
    assert warm <= cold


def test_anchor_pulls_toward_init() -> None:
    x, y = _blobs(200, seed=1)
    init = fit_head(x, y)
    few_x, few_y = _blobs(6, seed=3)
    few_y[:, 0] = 1 - few_y[:, 0]  # a few labels that contradict what the head knows
    free = fit_head(few_x, few_y, init=init)
    anchored = fit_head(few_x, few_y, init=init, anchor=1.0)
    distance = {
        name: float(np.linalg.norm(head.weight - init.weight))
        for name, head in (("free", free), ("anchored", anchored))
    }
    assert distance["anchored"] < 0.5 * distance["free"], distance


def test_pos_weight_raises_the_weighted_class() -> None:
    x, y = _blobs(200, seed=1, noise=4.0)
    plain = predict_features(x, fit_head(x, y))
    weighted = predict_features(x, fit_head(x, y, pos_weight=np.array([5.0, 1.0, 1.0])))
    assert weighted[:, 0].mean() > plain[:, 0].mean() + 0.02
    assert abs(weighted[:, 1].mean() - plain[:, 1].mean()) < 0.02


def test_fit_head_rejects_mismatched_shapes() -> None:
    x, y = _blobs(20, seed=1)
    with pytest.raises(ValueError, match="20 feature rows but 19 target rows"):
        fit_head(x, y[:19])
    with pytest.raises(ValueError, match="init head is 2 classes x 16 features"):
        fit_head(x, y, init=Head(np.zeros((2, 16)), np.zeros(2)))
    with pytest.raises(ValueError, match=r"pos_weight must have shape \(3,\)"):
        fit_head(x, y, pos_weight=np.ones(2))
    with pytest.raises(ValueError, match="init must be given"):
        fit_head(x, y, anchor=1.0)
    with pytest.raises(ValueError, match="no training examples"):
        fit_head(x[:0], y[:0])
    with pytest.raises(ValueError, match=r"features must be \(n, 16\)"):
        predict_features(x[:, :5], Head(np.zeros((3, 16)), np.zeros(3)))


def test_fit_head_works_inside_inference_mode() -> None:
    x, y = _blobs(50, seed=1)
    with torch.inference_mode():
        head = fit_head(x, y, max_iter=5)
    assert head.weight.shape == (3, 16)


# --------------------------------------------------------------------------- written back


def test_model_with_its_own_head_is_the_same_model() -> None:
    bundle = _bundle(dropout=0.3)
    x = _batch(bundle)
    rebuilt = model_with_head(bundle.model, head_of(bundle.model))
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), bundle.model(x), atol=1e-6, rtol=0)
    assert isinstance(rebuilt.fc, nn.Sequential) and isinstance(rebuilt.fc[1], nn.Linear)
    assert not rebuilt.training
    assert backbone_fingerprint(rebuilt) == backbone_fingerprint(bundle.model)


def test_a_new_head_predicts_as_its_features_do() -> None:
    bundle = _bundle()
    head = extend_head(head_of(bundle.model), SPACE.classes, [*SPACE.classes, "crack"])
    head = Head(head.weight + 0.01, head.bias)
    model = model_with_head(bundle.model, head)
    x = _batch(bundle)
    with torch.inference_mode():
        logits = model(x)
    assert logits.shape == (3, 4)
    probs = predict_features(extract_features(bundle.model, x).numpy(), head)
    np.testing.assert_allclose(probs, torch.sigmoid(logits).numpy(), atol=1e-5)
    assert bundle.model.fc.out_features == 3  # the served model is left alone
    with pytest.raises(ValueError, match="takes 8 features"):
        model_with_head(bundle.model, Head(np.zeros((2, 8)), np.zeros(2)))
