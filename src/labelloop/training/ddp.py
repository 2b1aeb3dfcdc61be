"""A fine-tune as DDP over several local processes, launched the way torchrun launches them.

A full update of the loop runs inside a long-lived process (`labelloop serve` or `labelloop
worker`), not from a command line, so it cannot be started under `torchrun`. This module runs
torchrun's own launcher (`torch.distributed.launcher.api.elastic_launch`, a standalone c10d
rendezvous on loopback) from inside that process: one rank per GPU (NCCL), or per requested
process on CPU (gloo). Every rank trains on its share of the images (DistributedSampler) and
validates the whole validation set, so all ranks take the same early-stopping decision; rank 0
writes the best weights, which the caller loads into its model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from labelloop.config import OptimConfig, PreprocessConfig
from labelloop.ml.train import (
    FitResult,
    cleanup_distributed,
    init_distributed,
    read_history,
    resolve_device,
)
from labelloop.training.core import fine_tune, image_loader

logger = logging.getLogger(__name__)

SPEC_FILE = "ddp-spec.pt"
RESULT_FILE = "ddp-result.pt"


def processes_for(requested: int) -> int:
    """How many ranks a full update runs: `requested`, or with 0 one per CUDA GPU (1 without
    CUDA, where one process already uses every core)."""
    if requested > 0:
        return requested
    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


@dataclass(frozen=True)
class RankReport:
    """What one rank did: its share of the training images and a digest of its final weights
    (DDP keeps every replica identical, so all digests agree)."""

    rank: int
    world_size: int
    device: str
    train_samples: int
    weights_digest: str
    nice: int


@dataclass(frozen=True)
class DistributedFit:
    result: FitResult
    ranks: list[RankReport]


def state_digest(model: nn.Module) -> str:
    """A digest of the weights: parameters and buffers (BatchNorm's running statistics)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def fine_tune_distributed(
    processes: int,
    model: nn.Module,
    train_items: Sequence[Path | bytes],
    train_targets: np.ndarray,
    val_items: Sequence[Path | bytes],
    val_targets: np.ndarray,
    preprocess: PreprocessConfig,
    *,
    classes: Sequence[str],
    optim: OptimConfig,
    work_dir: Path,
    seed: int = 0,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> DistributedFit:
    """`fine_tune` as DDP over `processes` local ranks; `model` ends with the best weights."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    work_dir.mkdir(parents=True, exist_ok=True)
    # The inputs travel to the ranks through one file, not pickled into every rank's arguments.
    torch.save(
        {
            "model": model,
            "train_items": list(train_items),
            "train_targets": train_targets,
            "val_items": list(val_items),
            "val_targets": val_targets,
            "preprocess": preprocess.model_dump(),
            "optim": optim.model_dump(),
            "classes": list(classes),
            "seed": seed,
        },
        work_dir / SPEC_FILE,
    )
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"labelloop-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        rdzv_configs={"is_host": True},
        local_addr="127.0.0.1",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    logger.info("Fine-tuning as DDP over %d processes", processes)
    watcher = _HistoryWatcher(work_dir / "history.csv", on_epoch)
    watcher.start()
    try:
        reports = elastic_launch(config, _rank_main)(str(work_dir))
    finally:
        watcher.stop()
    ranks = sorted((RankReport(**r) for r in reports.values()), key=lambda r: r.rank)
    saved = torch.load(work_dir / RESULT_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["best_state"])
    result = FitResult(
        saved["best_state"],
        int(saved["best_epoch"]),
        float(saved["best_score"]),
        read_history(work_dir / "history.csv"),
        bool(saved["stopped_early"]),
    )
    return DistributedFit(result, ranks)


def _rank_main(work_dir_name: str) -> dict[str, Any]:
    """One rank, in a process of its own (the launcher sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    work_dir = Path(work_dir_name)
    # The ranks share the machine's cores: one BLAS pool each of all of them would oversubscribe.
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    spec = torch.load(work_dir / SPEC_FILE, map_location="cpu", weights_only=False)
    info = init_distributed("auto")
    try:
        device = resolve_device("auto")
        preprocess = PreprocessConfig(**spec["preprocess"])
        optim = OptimConfig(**spec["optim"])
        model: nn.Module = spec["model"]
        items, targets = spec["train_items"], spec["train_targets"]
        # DistributedSampler only takes len() of its dataset, so the list of items does.
        sampler: DistributedSampler = DistributedSampler(
            items,  # type: ignore[arg-type]
            shuffle=True,
            seed=spec["seed"],
        )
        train_loader = image_loader(
            items, targets, preprocess, train=True, batch_size=optim.batch_size, sampler=sampler
        )
        val_loader = image_loader(
            spec["val_items"],
            spec["val_targets"],
            preprocess,
            train=False,
            batch_size=optim.batch_size,
        )
        result = fine_tune(
            model,
            train_loader,
            val_loader,
            train_targets=targets,
            classes=spec["classes"],
            optim=optim,
            device=device,
            work_dir=work_dir,
            dist_info=info,
            show_progress=False,
        )
        if info.is_main:
            torch.save(
                {
                    "best_state": {k: v.cpu() for k, v in result.best_state.items()},
                    "best_epoch": result.best_epoch,
                    "best_score": result.best_score,
                    "stopped_early": result.stopped_early,
                },
                work_dir / RESULT_FILE,
            )
        return {
            "rank": info.rank,
            "world_size": info.world_size,
            "device": str(device),
            "train_samples": len(sampler),
            "weights_digest": state_digest(model),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
        }
    finally:
        cleanup_distributed(info)


class _HistoryWatcher:
    """Calls `on_epoch` with each row rank 0 appends to history.csv: the job's progress, seen
    from the parent process while the ranks train."""

    def __init__(self, path: Path, on_epoch: Callable[[dict[str, float]], None] | None) -> None:
        self.path, self.on_epoch = path, on_epoch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddp-progress", daemon=True)

    def start(self) -> None:
        if self.on_epoch is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        reported = 0
        while not self._stop.wait(1.0):
            rows = read_history(self.path) if self.path.is_file() else []
            for row in rows[reported:]:
                assert self.on_epoch is not None
                self.on_epoch(row)
            reported = max(reported, len(rows))
