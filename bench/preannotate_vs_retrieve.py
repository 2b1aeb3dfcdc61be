"""Benchmark: Label Studio's *Retrieve Predictions* versus `labelloop preannotate`, same tasks.

Boots a real Label Studio (the test tooling's venv), makes two projects holding the same N
uploaded demo images per backbone and way of reading them, serves that backbone (random init:
speed does not depend on the weights), then times *Retrieve Predictions* over every task of
project A and a pre-annotation run over project B. Both paths read the uploads the same way:
from Label Studio's data directory (`disk`, LABEL_STUDIO_BASE_DATA_DIR, as when the backend runs
on Label Studio's machine) or downloaded from Label Studio (`http`). Appends a dated section to
docs/benchmarks.md.

    .venv/bin/python bench/preannotate_vs_retrieve.py --tasks 2000
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import REPO, append_section, machine, publish_random_model

from labelloop.dev.demo import generate_demo_dataset
from labelloop.dev.demo_stack import backend_in_thread, colocated_settings
from labelloop.dev.launcher import (
    LabelStudioServer,
    LabelStudioSettings,
    ensure_label_studio,
    free_port,
)
from labelloop.labelstudio.client import LabelStudioClient
from labelloop.loop.preannotate import PreannotateSummary, preannotate
from labelloop.runtime.predictor import LoadedModel, Predictor
from labelloop.serve.app import FetcherRegistry
from labelloop.store import load_bundle

READS = {"disk": "from disk", "http": "downloaded"}


@dataclass
class Row:
    backbone: str
    reads: str
    retrieve_s: float
    stored: int
    summary: PreannotateSummary
    runtime: str

    @property
    def ratio(self) -> float:
        return self.retrieve_s / self.summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--image-px", type=int, default=128)
    parser.add_argument("--input-px", type=int, default=112)
    parser.add_argument("--backbones", default="resnet18,mobilenet_v2")
    parser.add_argument("--reads", default="disk,http", help="disk, http or both")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_demo_dataset(root / "data", n=args.tasks, size=args.image_px)
        ls = LabelStudioSettings(
            data_dir=root / "ls", document_root=root / "files", port=free_port()
        )
        ls.document_root.mkdir()
        executable = ensure_label_studio(REPO / ".venv-ls")
        images = sorted(data.images_dir.glob("*.png"))
        config = data.label_config.read_text()
        # Retrieve Predictions is one synchronous request: over 2,000 tasks on a slow machine it
        # outlasts the client's default 120 s timeout.
        with (
            LabelStudioServer(executable, ls),
            LabelStudioClient(ls.url, ls.token, timeout_s=900) as client,
        ):
            for backbone in args.backbones.split(","):
                model_dir = root / f"model-{backbone}"
                publish_random_model(model_dir, args.input_px, backbone)
                for reads in args.reads.split(","):
                    row = compare(client, ls, model_dir, backbone, reads, images, config)
                    rows.append(row)
                    print(row.backbone, row.reads, row.summary.to_dict())
                    print(
                        f"{backbone}, {reads}: Retrieve Predictions {row.retrieve_s:.1f} s "
                        f"({row.stored} stored); preannotate {row.summary.seconds:.1f} s "
                        f"({row.summary.predicted} stored); {row.ratio:.1f}x"
                    )
    if not args.no_record:
        append_section(report(rows, args))


def compare(
    client: LabelStudioClient,
    ls: LabelStudioSettings,
    model_dir: Path,
    backbone: str,
    reads: str,
    images: list[Path],
    config: str,
) -> Row:
    """Two fresh projects of the same images: Retrieve Predictions on one, preannotate on the
    other, both served by the same model folder and reading the uploads the same way."""
    projects = []
    for title in ("retrieve", "preannotate"):
        pid = client.create_project(f"bench {backbone} {reads} {title}", config)["id"]
        client.import_files(pid, images)
        projects.append(pid)
    from_disk = reads == "disk"
    with backend_in_thread(model_dir, ls, port=free_port(), uploads_from_disk=from_disk) as url:
        client.connect_ml_backend(projects[0], url, title="bench", timeout_s=100)
        started = time.perf_counter()
        client.retrieve_predictions(projects[0])
        retrieve_s = time.perf_counter() - started
        stored = len(client.predictions(project_id=projects[0]))

    settings = colocated_settings(model_dir, ls, uploads_from_disk=from_disk)
    fetchers = FetcherRegistry(settings)
    model = LoadedModel.from_bundle(load_bundle(model_dir), runtime=settings.runtime)
    predictor = Predictor(batch_size=settings.batch_size, workers=settings.fetch_workers)
    try:
        summary = preannotate(client, projects[1], predictor, fetchers.current(), model=model)
    finally:
        predictor.close()
        fetchers.close()
    runtime = model.runner.name
    return Row(backbone, reads, retrieve_s, stored, summary, runtime)


def report(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"\n## Retrieve Predictions vs `labelloop preannotate`, {dt.date.today()}\n\n"
        f"Machine: {machine()}. {args.tasks} uploaded demo images ({args.image_px} px PNG), "
        f"models at {args.input_px} px, Label Studio 1.23.2 (SQLite) on the same machine; each "
        "row uses two fresh projects of the same images.\n\n"
        "| backbone (runtime) | uploads read | *Retrieve Predictions* | `labelloop preannotate` "
        "| speed-up | preannotate: listing / forward passes |\n|---|---|---|---|---|---|\n"
    ]
    for row in rows:
        s = row.summary
        lines.append(
            f"| {row.backbone} ({row.runtime}) | {READS[row.reads]} | "
            f"{row.retrieve_s:.1f} s ({row.stored} stored) | "
            f"{s.seconds:.1f} s ({s.predicted} stored) | **{row.ratio:.1f}x** | "
            f"{s.list_seconds:.1f} s / {s.forward_seconds:.1f} s |\n"
        )
    lines.append(
        "\nTarget: preannotate ≥ 5x faster end to end. *Retrieve Predictions* pays Label "
        "Studio's own per-task cost whatever the backend does; preannotate's floor is listing "
        "plus the forward passes. *From disk*: the backend runs on Label Studio's machine with "
        "LABEL_STUDIO_BASE_DATA_DIR set; *downloaded*: it fetches every upload from Label "
        "Studio, which costs Label Studio CPU on the same cores.\n"
    )
    return "".join(lines)


if __name__ == "__main__":
    main()
