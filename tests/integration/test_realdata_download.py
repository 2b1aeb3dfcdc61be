"""Fashion-MNIST, the real-image benchmark's components, downloaded from Debian with apt-get.

Needs Debian's package mirror (apt-get download); everything else of labelloop.realdata is
tested in-process in tests/unit/test_realdata.py."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from labelloop.realdata import (
    FASHION_MNIST_COMPONENTS,
    build_realdata,
    fetch_fashion_mnist,
    load_fashion_mnist,
)

SIZE = 64


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
    reason="Fashion-MNIST is fetched with apt-get download (Debian/Ubuntu only)",
)
def test_fashion_mnist_is_fetched_from_debian_and_split_by_file(tmp_path: Path) -> None:
    folder = fetch_fashion_mnist(tmp_path)
    stamp = (folder / "train-images-idx3-ubyte.gz").stat().st_mtime_ns
    assert fetch_fashion_mnist(tmp_path) == folder  # found, not fetched again
    assert (folder / "train-images-idx3-ubyte.gz").stat().st_mtime_ns == stamp

    fashion = load_fashion_mnist(folder)

    assert fashion.classes == FASHION_MNIST_COMPONENTS
    assert fashion.files == {
        "train": "train-images-idx3-ubyte.gz",
        "test": "t10k-images-idx3-ubyte.gz",
    }
    for name in fashion.classes:
        # Fashion-MNIST is balanced: 6,000 train and 1,000 test photos per class, 28 x 28.
        assert fashion.items["train"][name][1].shape == (6000, 28, 28)
        assert fashion.items["test"][name][1].shape == (1000, 28, 28)
    built = build_realdata(tmp_path / "out", fashion, n_train=4, n_test=2, size=SIZE)
    assert {r["source"] for r in _rows(built.test.root / "sources.csv") if r["item"]} == {
        "t10k-images-idx3-ubyte.gz"
    }
