"""The labelling order of a pool of tasks (loop.ordering): real embeddings of a small backbone,
a fake fetcher standing in for Label Studio's images."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from labelloop.config import PreprocessConfig
from labelloop.labels import LabelSpace
from labelloop.loop.ordering import LabellingOrder, PoolTask
from labelloop.ml.embeddings import EmbeddingCache, embed_images
from labelloop.ml.model import build_model
from labelloop.store import ModelBundle, manifest_for

SPACE = LabelSpace.from_mapping({"components": ["bolt", "nut"], "defects": ["rust"]})


def _model() -> SimpleNamespace:
    torch.manual_seed(0)
    preprocess = PreprocessConfig(image_size=32)
    manifest = manifest_for(
        version="v1-20240101T000000",
        backbone="resnet18",
        dropout=0.0,
        label_space=SPACE,
        preprocess=preprocess,
    )
    model = build_model("resnet18", len(SPACE), dropout=0.0).eval()
    bundle = ModelBundle(model, SPACE, [0.5] * len(SPACE), preprocess, manifest, Path("."))
    return SimpleNamespace(bundle=bundle)


def _png(seed: int) -> bytes:
    # Smooth random fields: unlike white noise, they differ after the backbone's pooling.
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((48, 48), Image.BILINEAR).save(buffer, "PNG")
    return buffer.getvalue()


class Fetcher:
    """Images by URL; an unknown URL cannot be had, as a task whose upload was deleted."""

    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = images
        self.fetched: list[str] = []

    def bytes_or_none(self, url: str, *, task_id: int, left_out_of: str) -> bytes | None:
        self.fetched.append(url)
        return self.images.get(url)


# Eight distinct images and five copies of one more, all equally uncertain: margin order cannot
# tell them apart, so only the embeddings can keep the copies from filling the queue's front.
# The copies come first in the pool, so that ties in margin put all of them in front.
IMAGES = {f"copy{i}": _png(99) for i in range(5)} | {f"img{i}": _png(i) for i in range(8)}
POOL = [PoolTask(i + 1, url, margin=0.2) for i, url in enumerate(IMAGES)]


def test_margin_order_is_the_margins_and_fetches_nothing() -> None:
    fetcher = Fetcher(IMAGES)
    scores = LabellingOrder(strategy="margin").scores(_model(), fetcher, POOL, [])  # type: ignore[arg-type]
    assert scores.tolist() == [0.2] * len(POOL)
    assert fetcher.fetched == []


@pytest.mark.parametrize("strategy", ["margin-diversity", "margin-density-diversity"])
def test_copies_wait_until_the_rest_of_the_pool_had_its_turn(strategy, tmp_path) -> None:
    order = LabellingOrder(
        strategy=strategy, horizon=9, embeddings=EmbeddingCache(tmp_path / "e.sqlite3")
    )
    scores = order.scores(_model(), Fetcher(IMAGES), POOL, [])  # type: ignore[arg-type]
    first = [POOL[i].url for i in np.argsort(scores, kind="stable")[:9]]
    by_margin = [POOL[i].url for i in np.argsort([t.margin for t in POOL], kind="stable")[:9]]
    assert sum(url.startswith("copy") for url in by_margin) == 5  # the premise
    # The nine planned places: the eight distinct images and one copy, each once.
    assert sum(url.startswith("copy") for url in first) == 1, first
    assert len(set(first)) == 9
    assert ((scores >= 0) & (scores <= 1)).all()


def test_a_labelled_copy_keeps_its_twins_out_of_the_planned_places(tmp_path) -> None:
    order = LabellingOrder(strategy="margin-diversity", horizon=8)
    labelled = [PoolTask(100, "labelled-copy")]
    images = IMAGES | {"labelled-copy": _png(99)}
    scores = order.scores(_model(), Fetcher(images), POOL, labelled)  # type: ignore[arg-type]
    first = [POOL[i].url for i in np.argsort(scores, kind="stable")[:8]]
    assert sorted(first) == sorted(f"img{i}" for i in range(8))


def test_a_task_without_its_image_keeps_its_margin_after_the_planned_places() -> None:
    pool = [*POOL, PoolTask(50, "gone", margin=0.0)]  # the most uncertain, but unreadable
    order = LabellingOrder(strategy="margin-diversity", horizon=4)
    scores = order.scores(_model(), Fetcher(IMAGES), pool, [])  # type: ignore[arg-type]
    embedded = len(POOL)
    h = 4 / embedded
    assert scores[-1] == pytest.approx(h)  # h + (1 - h) * margin, margin 0
    assert np.sort(scores)[:4].max() < scores[-1]  # after every planned place


def test_the_planned_places_sort_before_every_margin_in_the_order_of_the_scores() -> None:
    pool = [*POOL, PoolTask(50, "gone", margin=0.0)]  # unreadable: never planned
    order = LabellingOrder(strategy="margin-diversity", horizon=4)
    scores = order.scores(_model(), Fetcher(IMAGES), pool, [])  # type: ignore[arg-type]
    planned = order.planned(_model(), Fetcher(IMAGES), pool, [])  # type: ignore[arg-type]
    # The four tasks the scores put first, in that order, at -1, -0.75, -0.5, -0.25: below
    # every margin (>= 0, the unreadable task's 0 included), which the other tasks keep.
    first = [pool[i].id for i in np.argsort(scores, kind="stable")[:4]]
    assert list(planned) == first and 50 not in planned
    assert list(planned.values()) == [-1.0, -0.75, -0.5, -0.25]
    assert LabellingOrder(strategy="margin").planned(_model(), Fetcher(IMAGES), pool, []) == {}  # type: ignore[arg-type]


def test_embeddings_the_forward_pass_gave_are_used_and_the_rest_embedded() -> None:
    # The copies' vectors come from the run's forward passes (as ONNX Runtime gives them):
    # their images are not fetched again; the distinct images are.
    model = _model()
    fetcher = Fetcher(IMAGES)
    copy = embed_images(model.bundle, [("copy", IMAGES["copy0"])], None)[0][0]
    given = {t.id: copy for t in POOL if t.url.startswith("copy")}
    order = LabellingOrder(strategy="margin-diversity", horizon=9)
    planned = order.planned(model, fetcher, POOL, [], features=given)  # type: ignore[arg-type]
    assert sorted(fetcher.fetched) == sorted(f"img{i}" for i in range(8))
    urls = {t.id: t.url for t in POOL}
    # The same plan as with every image embedded: one copy among the nine planned places.
    assert sum(urls[task].startswith("copy") for task in planned) == 1
    assert planned == order.planned(model, Fetcher(IMAGES), POOL, [])  # type: ignore[arg-type]


def test_the_pool_is_embedded_once_per_backbone(tmp_path, monkeypatch) -> None:
    from labelloop.ml import embeddings

    passes: list[int] = []
    real = embeddings.extract_features

    def counting(model, batch, **kwargs):
        passes.append(len(batch))
        return real(model, batch, **kwargs)

    monkeypatch.setattr(embeddings, "extract_features", counting)
    order = LabellingOrder(horizon=5, embeddings=EmbeddingCache(tmp_path / "e.sqlite3"))
    model = _model()
    first = order.scores(model, Fetcher(IMAGES), POOL, [])  # type: ignore[arg-type]
    assert sum(passes) == 9  # eight images and the copies' one content
    again = order.scores(model, Fetcher(IMAGES), POOL, [])  # type: ignore[arg-type]
    assert sum(passes) == 9  # all from the cache
    assert again.tolist() == first.tolist()


def test_the_order_is_chosen_by_the_env_names_users_set(tmp_path) -> None:
    from labelloop.config import ConfigError
    from labelloop.serve.app import labelling_order
    from labelloop.serve.settings import settings_from

    default = settings_from({"model_dir": tmp_path}, {})
    assert (default.priority, default.priority_horizon) == ("margin-density-diversity", 100)
    chosen = settings_from(
        {"model_dir": tmp_path}, {"LABELLOOP_PRIORITY": "margin", "LABELLOOP_PRIORITY_HORIZON": "7"}
    )
    order = labelling_order(chosen, EmbeddingCache(tmp_path / "e.sqlite3"))
    assert (order.strategy, order.horizon, order.needs_pool) == ("margin", 7, False)
    with pytest.raises(ConfigError, match="LABELLOOP_PRIORITY: .*margin-density-diversity"):
        settings_from({"model_dir": tmp_path}, {"LABELLOOP_PRIORITY": "random"})
