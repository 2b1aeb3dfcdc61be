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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from _common import REPO, append_section, machine, publish_random_model
from PIL import Image

from labelloop.dev.demo import generate_demo_dataset
from labelloop.dev.demo_stack import backend_in_thread
from labelloop.dev.launcher import (
    LabelStudioServer,
    LabelStudioSettings,
    ensure_label_studio,
    free_port,
)
from labelloop.labelstudio.client import LabelStudioClient

READS = {"disk": "from disk", "http": "downloaded"}


@dataclass
class Row:
    backbone: str
    reads: str
    retrieve_s: float
    stored: int
    summary: dict
    runtime: str
    command_s: float  # the command, start to exit
    fixed_s: float  # command start -> first predictions stored in Label Studio

    @property
    def ratio(self) -> float:
        return self.retrieve_s / self.command_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--photo-px", type=int, default=800, help="JPEG width (4:3)")
    parser.add_argument("--input-px", type=int, default=112)
    parser.add_argument("--backbones", default="resnet18,mobilenet_v2")
    parser.add_argument("--reads", default="disk,http", help="disk, http or both")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_demo_dataset(root / "data", n=args.tasks, size=128)
        ls = LabelStudioSettings(
            data_dir=root / "ls", document_root=root / "files", port=free_port()
        )
        ls.document_root.mkdir()
        executable = ensure_label_studio(REPO / ".venv-ls")
        images = photos(sorted(data.images_dir.glob("*.png")), root / "photos", args.photo_px)
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
                    print(row.backbone, row.reads, row.summary)
                    print(
                        f"{backbone}, {reads}: Retrieve Predictions {row.retrieve_s:.1f} s "
                        f"({row.stored} stored); preannotate {row.command_s:.1f} s "
                        f"({row.summary['predicted']} stored, first after {row.fixed_s:.2f} s); "
                        f"{row.ratio:.1f}x"
                    )
    if not args.no_record:
        append_section(report(rows, args))


def photos(pngs: list[Path], folder: Path, width: int) -> list[Path]:
    """The demo images as photo-sized JPEGs (what inspection cameras upload)."""
    folder.mkdir()
    out = []
    for png in pngs:
        path = folder / f"{png.stem}.jpg"
        Image.open(png).convert("RGB").resize((width, width * 3 // 4)).save(path, quality=90)
        out.append(path)
    return out


def compare(
    client: LabelStudioClient,
    ls: LabelStudioSettings,
    model_dir: Path,
    backbone: str,
    reads: str,
    images: list[Path],
    config: str,
) -> Row:
    """Two fresh projects of the same images, both connected to one running backend (model
    loaded): *Retrieve Predictions* on one, `labelloop preannotate --backend` (a new process,
    as a user runs it) on the other."""
    projects = []
    for title in ("retrieve", "preannotate"):
        pid = client.create_project(f"bench {backbone} {reads} {title}", config)["id"]
        client.import_files(pid, images)
        projects.append(pid)
    from_disk = reads == "disk"
    with backend_in_thread(model_dir, ls, port=free_port(), uploads_from_disk=from_disk) as url:
        for pid in projects:
            client.connect_ml_backend(pid, url, title="bench", timeout_s=100)
        started = time.perf_counter()
        client.retrieve_predictions(projects[0])
        retrieve_s = time.perf_counter() - started
        stored = len(client.predictions(project_id=projects[0]))

        launched = time.time()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "labelloop",
                "preannotate",
                "--project",
                str(projects[1]),
                "--backend",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        command_s = time.time() - launched
        if done.returncode != 0:
            raise RuntimeError(done.stdout + done.stderr)
        run = httpx.get(f"{url}/preannotate/1", timeout=10).json()
        runtime = httpx.get(f"{url}/status", timeout=10).json().get("runtime", "?")
    summary = run["summary"]
    first = summary["first_stored_at"]
    return Row(
        backbone,
        reads,
        retrieve_s,
        stored,
        summary,
        runtime,
        command_s=command_s,
        fixed_s=(first - launched) if first else float("nan"),
    )


def report(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"\n## Retrieve Predictions vs `labelloop preannotate` through the running backend, "
        f"{dt.date.today()}\n\n"
        f"Machine: {machine()}. {args.tasks} uploaded photo-sized JPEGs ({args.photo_px} px "
        f"wide), models at {args.input_px} px, Label Studio 1.23.2 (SQLite) on the same "
        "machine; each row uses two fresh projects of the same images, both connected to the "
        "same running backend (model loaded). *preannotate* is the command as a user runs it "
        "(`labelloop preannotate --backend URL`, a new process), start to exit; *first "
        "stored* is command start to the first predictions stored in Label Studio; "
        "*labelling order*: the scores the run set and the seconds it took to set the planned "
        "places once every prediction was stored (part of the command's time).\n\n"
        "| backbone (runtime) | uploads read | *Retrieve Predictions* | `labelloop preannotate` "
        "| speed-up | first stored | listing / forward passes | labelling order |\n"
        "|---|---|---|---|---|---|---|---|\n"
    ]
    for row in rows:
        s = row.summary
        lines.append(
            f"| {row.backbone} ({row.runtime}) | {READS[row.reads]} | "
            f"{row.retrieve_s:.1f} s ({row.stored} stored) | "
            f"{row.command_s:.1f} s ({s['predicted']} stored) | **{row.ratio:.1f}x** | "
            f"{row.fixed_s:.2f} s | {s['list_seconds']:.1f} s / {s['forward_seconds']:.1f} s | "
            f"{s.get('scores', 'margin')}: {s.get('order_seconds', 0.0):.1f} s |\n"
        )
    lines.append(
        "\nTargets: ≥ 5x with uploads read from disk, ≥ 3x downloaded, first stored ≤ 1.5 s. "
        "*Retrieve Predictions* pays Label Studio's own per-task cost whatever the backend "
        "does; preannotate's floor is listing plus the forward passes. *From disk*: the backend "
        "runs on Label Studio's machine with LABEL_STUDIO_BASE_DATA_DIR set; *downloaded*: it "
        "fetches every upload from Label Studio, which costs Label Studio CPU on the same "
        "cores.\n"
    )
    return "".join(lines)


if __name__ == "__main__":
    main()
