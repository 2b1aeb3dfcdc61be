"""Benchmark: the first /predict of a project whose model is not loaded, against a loaded one.

Many projects on one backend keep at most LABELLOOP_MAX_LOADED_MODELS models in memory, so a
project that was quiet for a while pays a load on its next request. This times, in one process
through the real app (FastAPI TestClient, images from a local-files root): a /predict of 16
tasks of a project whose model is loaded (the ratio's reference), the same for a project whose
model was evicted (its ONNX graph stored at publish time: the load reads it), and the very
first load of a version that has no stored graph yet (export + check against PyTorch, once).

    .venv/bin/python bench/project_first_predict.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import append_section, machine, publish_random_model
from fastapi.testclient import TestClient

from labelloop.dev.demo import generate_demo_dataset
from labelloop.lineages import project_root
from labelloop.runtime.projects import ProjectModels
from labelloop.serve.app import create_app
from labelloop.serve.settings import settings_from
from labelloop.store import ONNX_FILE, ModelStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,mobilenet_v2")
    parser.add_argument("--input-px", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_demo_dataset(root / "data", n=16, size=128)
        config = data.label_config.read_text()
        tasks = [
            {"id": i + 1, "data": {"image": f"/data/local-files/?d=images/{p.name}"}}
            for i, p in enumerate(sorted(data.images_dir.glob("*.png")))
        ]
        for backbone in args.backbones.split(","):
            model_dir = root / backbone
            # Projects 1 and 2 each have a lineage of their own (copies of one version).
            publish_random_model(project_root(model_dir, 1), args.input_px, backbone)
            shutil.copytree(project_root(model_dir, 1), project_root(model_dir, 2))
            rows.append((backbone, *measure(model_dir, data.root, config, tasks, args.repeat)))
            print(rows[-1], flush=True)
    if not args.no_record:
        append_section(report(rows, args))


def measure(model_dir: Path, files: Path, config: str, tasks: list, repeat: int):
    settings = settings_from(
        {"model_dir": model_dir},
        {
            "LABEL_STUDIO_URL": "http://127.0.0.1:9",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files),
        },
    )
    models = ProjectModels(model_dir, runtime="auto", max_loaded=1)
    with TestClient(create_app(settings, models)) as client:

        def predict(project: int) -> float:
            started = time.perf_counter()
            body = {"tasks": tasks, "label_config": config, "project": f"{project}.0"}
            reply = client.post("/predict", json=body)
            assert reply.status_code == 200 and all(reply.json()["results"]), reply.text
            return time.perf_counter() - started

        first_ever = predict(1)  # no stored ONNX graph yet: export and check, then keep it
        version = ModelStore(project_root(model_dir, 1)).current_version()
        stored = (project_root(model_dir, 1) / "versions" / str(version) / ONNX_FILE).is_file()
        # Project 2's copy has no graph either: load it once so both have one.
        predict(2)
        warm, cold = [], []
        for _ in range(repeat):
            predict(1)  # loaded now (project 2 evicted: one model at a time)
            warm.append(predict(1))
            cold.append(predict(2))  # evicted: load from its lineage, stored graph
        runtime = models.serving(1).runner.name  # type: ignore[union-attr]
    return statistics.median(warm), statistics.median(cold), first_ever, stored, runtime


def report(rows, args: argparse.Namespace) -> str:
    lines = [
        f"\n## First /predict of a project whose model is not loaded, {dt.date.today()}\n\n"
        f"Machine: {machine()}. One /predict of 16 tasks (128 px PNGs from a local-files root) "
        f"through the app, models at {args.input_px} px, `LABELLOOP_MAX_LOADED_MODELS=1`; "
        f"medians of {args.repeat}. *Loaded*: the project's model is in memory. *Not loaded*: "
        "it was evicted, the request loads it from its lineage (stored ONNX graph). *First "
        "load ever*: the version has no stored graph yet (export + check against PyTorch, "
        "then stored).\n\n"
        "| backbone (runtime) | loaded | not loaded | ratio | first load ever |\n"
        "|---|---|---|---|---|\n"
    ]
    for backbone, warm, cold, first, stored, runtime in rows:
        lines.append(
            f"| {backbone} ({runtime}) | {warm:.3f} s | {cold:.3f} s | {cold / warm:.1f}x | "
            f"{first:.2f} s{'' if stored else ' (graph not stored)'} |\n"
        )
    return "".join(lines)


if __name__ == "__main__":
    main()
