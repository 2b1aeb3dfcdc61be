"""Benchmark: what ranking the unlabelled pool adds to a refresh, as a ratio to the refresh's
own prediction of that pool.

A refresh after a promotion predicts every unlabelled task (the served ONNX graph) and, with the
default `LABELLOOP_PRIORITY`, ranks them (loop.ordering): the served backbone's embeddings of
the pool and of the labelled tasks, computed once per backbone into the embedding cache (a fast
update keeps the backbone), then typicality and the greedy pass. This times, in one process on
images from a local-files root: the prediction of N unlabelled tasks (the reference), the order
with an empty cache (the first refresh after a full update) and with a warm one (every refresh
after a fast update).

    .venv/bin/python bench/labelling_order_cost.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

from _common import append_section, machine, publish_random_model

from labelloop.dev.demo import generate_demo_dataset
from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.protocol import Task, TaskPrediction
from labelloop.labelstudio.urls import FetchSettings
from labelloop.loop.ordering import LabellingOrder, PoolTask
from labelloop.ml.embeddings import EmbeddingCache
from labelloop.runtime.predictor import LoadedModel, Predictor
from labelloop.store import ModelStore, load_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="mobilenet_v2,resnet18")
    parser.add_argument("--unlabelled", type=int, default=1000)
    parser.add_argument("--labelled", type=int, default=200)
    parser.add_argument("--input-px", type=int, default=224)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = args.unlabelled + args.labelled
        data = generate_demo_dataset(root / "data", n=n, size=128, seed=4)
        config = data.label_config.read_text()
        images = sorted(data.images_dir.glob("*.png"))
        urls = [f"/data/local-files/?d=images/{p.name}" for p in images]
        fetcher = ImageFetcher(
            FetchSettings(label_studio_url="http://127.0.0.1:1", document_root=data.root), None
        )
        for backbone in args.backbones.split(","):
            model_dir = root / backbone
            publish_random_model(model_dir, args.input_px, backbone)
            store = ModelStore(model_dir)
            model = LoadedModel.from_bundle(
                load_bundle(store.version_dir(store.current_version() or ""))
            )
            predictor = Predictor()
            tasks = [Task(id=i + 1, data={"image": u}) for i, u in enumerate(urls)]
            unlabelled_tasks = tasks[: args.unlabelled]
            t0 = time.perf_counter()
            results, _ = predictor.predict(unlabelled_tasks, config, fetcher, model=model)
            predict_s = time.perf_counter() - t0
            predictor.close()
            pool = [
                PoolTask(t.id, str(t.data["image"]), r.score)
                for t, r in zip(unlabelled_tasks, results, strict=True)
                if isinstance(r, TaskPrediction)
            ]
            labelled = [PoolTask(t.id, str(t.data["image"])) for t in tasks[args.unlabelled :]]
            order = LabellingOrder(embeddings=EmbeddingCache(root / f"{backbone}.sqlite3"))
            t0 = time.perf_counter()
            order.scores(model, fetcher, pool, labelled)
            cold_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            order.scores(model, fetcher, pool, labelled)
            warm_s = time.perf_counter() - t0
            rows.append((backbone, predict_s, cold_s, warm_s))
            print(rows[-1], flush=True)
    if not args.no_record:
        append_section(report(rows, args))


def report(rows: list[tuple[str, float, float, float]], args: argparse.Namespace) -> str:
    lines = [
        f"### Labelling order: its cost in a refresh, {dt.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. `bench/labelling_order_cost.py`: {args.unlabelled} unlabelled "
        f"and {args.labelled} labelled tasks (128 px PNGs from a local-files root), models at "
        f"{args.input_px} px. *Predict*: the refresh's prediction of the unlabelled tasks "
        "(ONNX Runtime, batches of 16), the ratio's reference. *Order, cold*: ranking them "
        "(`margin-density-diversity`, horizon 100) with an empty embedding cache, as the first "
        "refresh after a full update does (both sets embedded at nice +10); *warm*: with the "
        "vectors cached, as every refresh after a fast update.",
        "",
        "| backbone | predict | order, cold | ratio | order, warm | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for backbone, predict_s, cold_s, warm_s in rows:
        lines.append(
            f"| {backbone} | {predict_s:.1f} s | {cold_s:.1f} s | {cold_s / predict_s:.2f}x | "
            f"{warm_s:.2f} s | {warm_s / predict_s:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
