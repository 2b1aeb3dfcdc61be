"""training/ddp.py on its own: DDP over two gloo ranks on CPU, launched by torchrun's launcher
from inside a process, and what happens to the ranks when that process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import wait_until

from labelloop.config import OptimConfig, PreprocessConfig
from labelloop.ml.model import build_model
from labelloop.training.ddp import fine_tune_distributed, state_digest

pytestmark = pytest.mark.slow


def demo_items(demo_dataset, n: int) -> tuple[list[Path], np.ndarray]:
    images = sorted(demo_dataset.images_dir.glob("*.png"))[:n]
    rng = np.random.default_rng(0)
    return images, (rng.random((n, 3)) < 0.4).astype(np.float32)


def test_ranks_share_the_images_and_agree_on_the_weights(demo_dataset, tmp_path: Path) -> None:
    items, targets = demo_items(demo_dataset, 24)
    model = build_model("resnet18", 3)
    before = state_digest(model)
    epochs: list[int] = []
    fitted = fine_tune_distributed(
        2,
        model,
        items[:17],
        targets[:17],
        items[17:],
        targets[17:],
        PreprocessConfig(image_size=32),
        classes=["a", "b", "c"],
        optim=OptimConfig(epochs=2, batch_size=4, patience=5, amp=False),
        work_dir=tmp_path / "work",
        on_epoch=lambda row: epochs.append(int(row["epoch"])),
    )
    assert [r.rank for r in fitted.ranks] == [0, 1]
    assert {r.world_size for r in fitted.ranks} == {2}
    # 17 images over two ranks: DistributedSampler pads to 9 each.
    assert [r.train_samples for r in fitted.ranks] == [9, 9]
    assert fitted.ranks[0].weights_digest == fitted.ranks[1].weights_digest != before
    assert state_digest(model) == fitted.ranks[0].weights_digest  # the caller got them back
    assert [row["epoch"] for row in fitted.result.history] == [1, 2]
    assert 1 <= fitted.result.best_epoch <= 2
    # Progress reached the caller while the ranks trained (the last row may land after the
    # launcher returned, so at least the first).
    assert epochs and epochs == sorted(set(epochs)) and epochs[0] == 1


SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from labelloop.config import OptimConfig, PreprocessConfig
    from labelloop.ml.model import build_model
    from labelloop.training.ddp import fine_tune_distributed

    images = sorted(Path(sys.argv[1]).glob("*.png"))[:16]
    targets = (np.random.default_rng(0).random((16, 3)) < 0.4).astype(np.float32)
    fine_tune_distributed(
        2, build_model("resnet18", 3), images, targets, images[:4], targets[:4],
        PreprocessConfig(image_size=32), classes=["a", "b", "c"],
        optim=OptimConfig(epochs=10_000, batch_size=4, patience=10_000, amp=False),
        work_dir=Path(sys.argv[2]),
    )
    """
)


def children_of(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    for task in tasks.iterdir() if tasks.is_dir() else []:
        children = task / "children"
        if children.is_file():
            found += [int(c) for c in children.read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_end_when_the_process_that_launched_them_is_killed(
    demo_dataset, tmp_path: Path
) -> None:
    """A worker killed mid-update leaves no rank training for nobody. torchrun's launcher can
    not install its signal handlers off the main thread (the trainer's), so this rests on the
    parent-death signal its spawned ranks get."""
    work = tmp_path / "work"
    launcher = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(demo_dataset.images_dir), str(work)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    ranks: list[int] = []
    try:
        # Training has begun on both ranks once rank 0 has written its first epoch.
        wait_until(lambda: (work / "history.csv").is_file(), timeout_s=120, what="epoch 1")
        # The two ranks (and multiprocessing's resource tracker, which ends with them).
        ranks = [p for p in children_of(launcher.pid) if alive(p)]
        assert len(ranks) >= 2, ranks
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        wait_until(
            lambda: not any(alive(p) for p in ranks),
            timeout_s=30,
            what="the ranks to end with their launcher",
        )
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
