"""Benchmark: Label Studio's *Retrieve Predictions* versus `labelloop preannotate`, same tasks.

Boots a real Label Studio (the test tooling's venv), makes two projects holding the same N
uploaded demo images, serves a ResNet18 (random init: speed does not depend on the weights),
then times *Retrieve Predictions* over every task of project A and a pre-annotation run over
project B. Appends a dated section to docs/benchmarks.md.

    .venv/bin/python bench/preannotate_vs_retrieve.py --tasks 2000
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

from _common import REPO, append_section, machine, publish_random_model

from labelloop.demo import generate_demo_dataset
from labelloop.demo_stack import backend_in_thread
from labelloop.labelstudio.client import LabelStudioClient
from labelloop.labelstudio.launcher import (
    LabelStudioServer,
    LabelStudioSettings,
    ensure_label_studio,
    free_port,
)
from labelloop.preannotate import preannotate
from labelloop.serve.app import FetcherRegistry
from labelloop.serve.predictor import ModelHolder, Predictor
from labelloop.serve.settings import settings_from


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--image-px", type=int, default=128)
    parser.add_argument("--input-px", type=int, default=112)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_demo_dataset(root / "data", n=args.tasks, size=args.image_px)
        model_dir = root / "model"
        publish_random_model(model_dir, args.input_px)
        ls = LabelStudioSettings(
            data_dir=root / "ls", document_root=root / "files", port=free_port()
        )
        ls.document_root.mkdir()
        executable = ensure_label_studio(REPO / ".venv-ls")
        images = sorted(data.images_dir.glob("*.png"))
        config = data.label_config.read_text()
        with LabelStudioServer(executable, ls), LabelStudioClient(ls.url, ls.token) as client:
            projects = []
            for title in ("retrieve", "preannotate"):
                pid = client.create_project(f"bench {title}", config)["id"]
                client.import_files(pid, images)
                projects.append(pid)
            with backend_in_thread(model_dir, ls, port=free_port()) as url:
                client.connect_ml_backend(projects[0], url, title="bench", timeout_s=100)
                started = time.perf_counter()
                client.retrieve_predictions(projects[0])
                retrieve_s = time.perf_counter() - started
                stored = len(client.predictions(project_id=projects[0]))

            settings = settings_from(
                {"model_dir": model_dir},
                {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token},
            )
            fetchers = FetcherRegistry(settings)
            predictor = Predictor(
                ModelHolder.from_path(model_dir),
                batch_size=settings.batch_size,
                workers=settings.fetch_workers,
            )
            summary = preannotate(client, projects[1], predictor, fetchers.current())
            predictor.close()
            fetchers.close()
    ratio = retrieve_s / summary.seconds
    print(summary.to_dict())
    print(
        f"Retrieve Predictions: {retrieve_s:.1f} s ({stored} stored); "
        f"preannotate: {summary.seconds:.1f} s ({summary.predicted} stored); {ratio:.1f}x"
    )
    if not args.no_record:
        section = (
            f"\n## Retrieve Predictions vs `labelloop preannotate`, {dt.date.today()}\n\n"
            f"Machine: {machine()}. "
            f"{args.tasks} uploaded demo images ({args.image_px} px PNG), ResNet18 at "
            f"{args.input_px} px, Label Studio 1.23.2 (SQLite) on the same machine.\n\n"
            "| path | wall time | predictions stored |\n|---|---|---|\n"
            f"| *Retrieve Predictions* (one `/predict`) | {retrieve_s:.1f} s | {stored} |\n"
            f"| `labelloop preannotate` | {summary.seconds:.1f} s | {summary.predicted} |\n\n"
            f"preannotate is **{ratio:.1f}x** faster end to end (target ≥ 5x). Of its "
            f"{summary.seconds:.1f} s, listing took {summary.list_seconds:.1f} s and forward "
            f"passes {summary.forward_seconds:.1f} s; the raw forward cost alone bounds the "
            f"ratio at {retrieve_s / max(summary.forward_seconds, 1e-9):.1f}x.\n"
        )
        append_section(section)


if __name__ == "__main__":
    main()
