"""Benchmark: images/s of labelloop's training loop versus a raw train step on random tensors.

Both sides use the same model (random init: speed does not depend on the weights), optimizer,
loss, batch size and torch threads. The loop side is `train.train_one_epoch` (the epoch `fit`
runs) over demo images on disk, read through labelloop's Dataset, train transform and
DataLoader settings; the raw side feeds pre-made tensors (timed just before and just after the
loop, averaged). The gap is what data loading costs; the time the loop waits for its next batch
is measured separately. Appends a dated section to
docs/benchmarks.md unless --no-record.

    .venv/bin/python bench/train_throughput.py --images 256 --batch-size 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import append_section, machine
from torch import nn
from torch.utils.data import DataLoader

from labelloop.config import DataConfig, PreprocessConfig
from labelloop.dev.demo import LABEL_GROUPS, generate_demo_dataset
from labelloop.ml.data import load_metadata
from labelloop.ml.dataset import ImageDataset, collate_skip_none
from labelloop.ml.images import decode_image
from labelloop.ml.model import build_model
from labelloop.ml.train import train_one_epoch
from labelloop.ml.transforms import train_transform


class TimedLoader:
    """Wraps a DataLoader and adds up the time the training loop waits for each batch."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.wait_s = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.wait_s += time.perf_counter() - started
                return
            self.wait_s += time.perf_counter() - started
            yield batch


@dataclass(frozen=True)
class Row:
    backbone: str
    num_workers: int
    raw_ips: float
    loop_ips: float
    wait_s: float
    loop_s: float

    @property
    def ratio(self) -> float:
        return self.loop_ips / self.raw_ips


def fresh(backbone: str, n_classes: int) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    torch.manual_seed(0)
    model = build_model(backbone, n_classes, weights="none")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, optimizer, nn.BCEWithLogitsLoss()


def raw_throughput(
    backbone: str, n_classes: int, batch_size: int, image_px: int, steps: int
) -> float:
    model, optimizer, criterion = fresh(backbone, n_classes)
    model.train()
    images = torch.randn(batch_size, 3, image_px, image_px)
    targets = (torch.rand(batch_size, n_classes) > 0.7).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        loss.item()  # the loop reads the loss every step too

    for _ in range(2):  # allocator and kernel warm-up, as the loop below gets
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - started)


def loop_throughput(
    backbone: str,
    dataset: ImageDataset,
    n_classes: int,
    batch_size: int,
    num_workers: int,
) -> tuple[float, float, float]:
    """images/s of one epoch, the seconds spent waiting for batches, the epoch's seconds."""
    model, optimizer, criterion = fresh(backbone, n_classes)
    # The same DataLoader settings the offline pipeline uses (pipeline._loader).
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        persistent_workers=num_workers > 0,
        drop_last=True,
    )
    image_px = dataset[0][0].shape[-1]
    warm = torch.randn(batch_size, 3, image_px, image_px)  # the warm-up the raw side gets
    model.train()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        criterion(model(warm), torch.zeros(batch_size, n_classes)).backward()
    timed = TimedLoader(loader)
    started = time.perf_counter()
    train_one_epoch(model, timed, criterion, optimizer, torch.device("cpu"), show_progress=False)
    seconds = time.perf_counter() - started
    return len(loader) * batch_size / seconds, timed.wait_s, seconds


def stage_costs(dataset: ImageDataset, sample: int) -> tuple[float, float]:
    """ms per image of decoding and of the train transform, one image at a time."""
    items = dataset.paths[:sample]
    started = time.perf_counter()
    images = [decode_image(item) for item in items]
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    for image in images:
        dataset.transform(image)
    transform_s = time.perf_counter() - started
    return decode_s / len(items) * 1000, transform_s / len(items) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images in the epoch")
    parser.add_argument("--image-px", type=int, default=224, help="stored demo image side")
    parser.add_argument("--input-px", type=int, default=224, help="model input side")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbones", nargs="+", default=["resnet18"])
    parser.add_argument(
        "--num-workers",
        type=int,
        nargs="+",
        default=[0, 1],
        help="DataLoader workers to compare (labelloop's default is 0)",
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/")
    args = parser.parse_args()
    n_classes = sum(len(c) for c in LABEL_GROUPS.values())
    preprocess = PreprocessConfig(image_size=args.input_px)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_demo_dataset(Path(tmp) / "data", n=args.images, size=args.image_px)
        labelled = load_metadata(
            data.metadata_csv,
            data.images_dir,
            DataConfig(classes={g: tuple(c) for g, c in LABEL_GROUPS.items()}),
        )
        dataset = ImageDataset(
            [s.path for s in labelled.samples], labelled.targets(), train_transform(preprocess)
        )
        assert isinstance(dataset, Sized)
        steps = len(dataset) // args.batch_size
        decode_ms, transform_ms = stage_costs(dataset, min(64, len(dataset)))
        print(f"per image: decode {decode_ms:.1f} ms, train transform {transform_ms:.1f} ms")
        for backbone in args.backbones:
            for workers in args.num_workers:
                # Raw steps just before and just after the loop, averaged, so a load change
                # on a shared machine shifts both sides alike.
                before = raw_throughput(backbone, n_classes, args.batch_size, args.input_px, steps)
                ips, wait_s, loop_s = loop_throughput(
                    backbone, dataset, n_classes, args.batch_size, workers
                )
                after = raw_throughput(backbone, n_classes, args.batch_size, args.input_px, steps)
                raw = (before + after) / 2
                row = Row(backbone, workers, raw, ips, wait_s, loop_s)
                rows.append(row)
                print(
                    f"{backbone:>14} workers={workers}: raw step {raw:6.1f} img/s, "
                    f"training loop {ips:6.1f} img/s ({row.ratio:.2f}); "
                    f"waiting for batches {wait_s:.1f} s of {loop_s:.1f} s"
                )
    if not args.no_record:
        record(rows, args, decode_ms, transform_ms)


def record(
    rows: list[Row], args: argparse.Namespace, decode_ms: float, transform_ms: float
) -> None:
    append_section(
        "\n".join(
            [
                f"\n## Training throughput, {dt.date.today()}\n",
                f"Machine: {machine()}. One epoch of `train_one_epoch` (the loop `fit` runs) "
                f"over {args.images} demo images ({args.image_px} px PNG on disk) at "
                f"{args.input_px} px, batch {args.batch_size}, Adam, labelloop's Dataset, train "
                "transform and DataLoader settings, versus the same train step on random "
                "tensors. *Waiting* is the time the loop spent waiting for the next batch "
                "(decode, augmentation, collation). Target: loop/raw ≥ 0.9.\n",
                "| backbone | DataLoader workers | raw step | training loop | loop/raw | "
                "waiting for batches |",
                "|---|---|---|---|---|---|",
                *[
                    f"| {r.backbone} | {r.num_workers} | {r.raw_ips:.1f} img/s | "
                    f"{r.loop_ips:.1f} img/s | **{r.ratio:.2f}** | "
                    f"{r.wait_s:.1f} s of {r.loop_s:.1f} s |"
                    for r in rows
                ],
                "",
                f"Alone, one image at a time: decode {decode_ms:.1f} ms, train transform "
                f"{transform_ms:.1f} ms per image, against "
                f"{1000 / rows[0].raw_ips:.0f} ms of raw train step per image.",
                "",
            ]
        )
    )


if __name__ == "__main__":
    main()
