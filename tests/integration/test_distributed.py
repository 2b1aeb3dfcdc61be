"""`labelloop train` under torchrun: two CPU processes (gloo) on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labelloop.dev.launcher import free_port
from labelloop.store import ModelStore


@pytest.mark.slow
def test_two_process_torchrun(demo_dataset, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", LOG_LEVEL="INFO")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--node-rank=0",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "labelloop",
        "train",
        "--model-dir",
        str(model_dir),
        "--images",
        str(demo_dataset.images_dir),
        "--metadata",
        str(demo_dataset.metadata_csv),
        "--epochs",
        "2",
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--weights",
        "none",
        "--device",
        "cpu",
        "--no-progress",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "rank 0 of 2" in output and "rank 1 of 2" in output
    store = ModelStore(model_dir)
    # Only rank 0 publishes: exactly one version.
    assert len(store.versions()) == 1
    version_dir = model_dir / "versions" / store.current_version()
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["metrics"]["test"]["n_samples"] > 0
    assert len((version_dir / "history.csv").read_text().splitlines()) == 3  # header + 2 epochs
