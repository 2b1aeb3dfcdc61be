"""A multi-label benchmark made of real photographs, with train and test from disjoint sources.

The demo dataset (`labelloop.demo`) is drawn, so it says little about how a model does on
photographs. No registry package ships an inspection data set, but some ship real photos: this
module pastes real objects ("components": Fashion-MNIST product photos, or scikit-learn's
handwritten digits for quick tests) and real texture patches ("defects": scikit-image's grass
and gravel photos) onto real surfaces (crops of scikit-image's brick photo), at random position,
scale and contrast. The output has the demo's layout (images/, metadata.csv, label_config.xml
per split), so training, evaluation and serving run on it unchanged.

No pixel is shared between the splits: train pastes items of one source file (Fashion-MNIST's
train file) and crops the left half of every texture photo; test pastes the other file's items
(t10k) and crops the right halves. ``sources.csv`` in each split records where every layer of
every image came from, so this can be checked.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import logging
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from labelloop.dev.demo import DemoDataset, render_label_config
from labelloop.progress import tqdm_disable

logger = logging.getLogger(__name__)

__all__ = [
    "DEFECT_TEXTURES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_COMPONENTS",
    "SPLITS",
    "ComponentPool",
    "RealDataError",
    "RealDataset",
    "build_realdata",
    "fashion_mnist_dir",
    "fetch_fashion_mnist",
    "load_fashion_mnist",
    "load_sklearn_digits",
    "skimage_photo",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
# Five classes whose silhouettes differ: a part detector should tell them apart, while
# look-alikes (shirt / t-shirt / pullover / coat) would make the benchmark about Fashion-MNIST.
FASHION_MNIST_COMPONENTS: tuple[str, ...] = ("trouser", "pullover", "sandal", "bag", "ankle_boot")
DEFECT_TEXTURES: tuple[str, ...] = ("grass", "gravel")
SURFACE_PHOTO = "brick"
SPLITS: tuple[str, ...] = ("train", "test")

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
_FASHION_MNIST_SUBDIR = Path("usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

# P(k components) for k = 0..3 and P(k defect kinds) for k = 0..2, classes drawn uniformly
# without replacement: each component has prevalence 1.65/5 = 0.33, each defect 0.9/2 = 0.45.
_N_COMPONENTS_P = (0.1, 0.35, 0.35, 0.2)
_N_DEFECTS_P = (0.35, 0.4, 0.25)
# Sides as fractions of the image; small enough that three parts and two patches fit.
_COMPONENT_SIDE = (0.28, 0.42)
_DEFECT_SIDE = (0.25, 0.38)
# Source crop sides in photo pixels: the scale of a texture varies by ~3x between images.
_DEFECT_CROP = (64, 200)
_SURFACE_CROP = (128, 256)
# A new layer may cover at most this share of an earlier one (or of itself), so every pasted
# thing stays mostly visible and its label stays true.
_MAX_OVERLAP = 0.1
_PLACEMENT_TRIES = 30

SOURCES_FIELDS = (
    "image_id",
    "layer",
    "class",
    "source",
    "item",
    "src_x0",
    "src_y0",
    "src_x1",
    "src_y1",
    "x0",
    "y0",
    "x1",
    "y1",
    "flipped",
)


class RealDataError(RuntimeError):
    """A real-image source is missing or unreadable; the message says how to get it."""


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ComponentPool:
    """Object photos per split and class: bright object on black, uint8 (n, h, w).

    `items[split][class]` is (ids, images); ids index the source file named by
    `files[split]`, so provenance can name every pasted item.
    """

    name: str
    classes: tuple[str, ...]
    files: Mapping[str, str]
    items: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]

    def __post_init__(self) -> None:
        for split in SPLITS:
            missing = [c for c in self.classes if len(self.items[split].get(c, ((), ()))[0]) == 0]
            if missing:
                raise RealDataError(f"{self.name} has no {split} items of {missing}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    found, count = struct.unpack(">II", data[:8])
    if found != magic:
        raise RealDataError(f"{path} is not an IDX file of the expected kind (magic {found})")
    if magic == _IDX_IMAGES_MAGIC:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(count, rows, cols)
    return np.frombuffer(data, np.uint8, offset=8).reshape(count)


def load_fashion_mnist(
    directory: Path, classes: Sequence[str] = FASHION_MNIST_COMPONENTS
) -> ComponentPool:
    """Fashion-MNIST items of `classes` from the folder holding its four .gz files.

    Train items come from the train file, test items from the t10k file: different photos.
    """
    directory = Path(directory)
    unknown = sorted(set(classes) - set(FASHION_MNIST_CLASSES))
    if unknown:
        raise ValueError(f"not Fashion-MNIST classes: {unknown}; known: {FASHION_MNIST_CLASSES}")
    items: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for split, (images_file, labels_file) in _FASHION_MNIST_FILES.items():
        missing = [f for f in (images_file, labels_file) if not (directory / f).is_file()]
        if missing:
            raise RealDataError(
                f"{directory} lacks {missing}; fetch_fashion_mnist() downloads them"
            )
        images = _read_idx(directory / images_file, _IDX_IMAGES_MAGIC)
        labels = _read_idx(directory / labels_file, _IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise RealDataError(f"{directory}: {len(images)} {split} images, {len(labels)} labels")
        items[split] = {}
        for name in classes:
            ids = np.flatnonzero(labels == FASHION_MNIST_CLASSES.index(name))
            items[split][name] = (ids, images[ids])
    return ComponentPool(
        name="fashion-mnist",
        classes=tuple(classes),
        files={s: f[0] for s, f in _FASHION_MNIST_FILES.items()},
        items=items,
    )


def load_sklearn_digits(classes: Sequence[int] = (0, 1, 2, 3, 4)) -> ComponentPool:
    """Handwritten digits shipped with scikit-learn (8x8 scans), split by row: a quick source
    that needs no download, for tests. Train takes the first half of the rows, test the rest."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    half = len(images) // 2
    ranges = {"train": np.arange(half), "test": np.arange(half, len(images))}
    names = tuple(f"digit_{d}" for d in classes)
    items = {
        split: {
            name: (rows[digits.target[rows] == d], images[rows[digits.target[rows] == d]])
            for name, d in zip(names, classes, strict=True)
        }
        for split, rows in ranges.items()
    }
    return ComponentPool(
        name="sklearn-digits",
        classes=names,
        files={"train": "sklearn digits", "test": "sklearn digits"},
        items=items,
    )


def fashion_mnist_dir(cache_dir: Path | None = None) -> Path:
    """The Fashion-MNIST folder: the system package's if installed, else fetched into a cache.

    The cache defaults to ``$XDG_CACHE_HOME/labelloop`` (``~/.cache/labelloop``).
    """
    system = Path("/") / _FASHION_MNIST_SUBDIR
    if all((system / f).is_file() for pair in _FASHION_MNIST_FILES.values() for f in pair):
        return system
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache_dir = Path(base) / "labelloop"
    return fetch_fashion_mnist(cache_dir)


def fetch_fashion_mnist(cache_dir: Path) -> Path:
    """Download Debian's ``dataset-fashion-mnist`` with apt (no root needed) and unpack it.

    ``apt-get download`` only fetches the .deb into the working folder and ``dpkg-deb -x``
    unpacks it anywhere, so nothing is installed. Returns the folder of the four .gz files;
    a second call finds them and downloads nothing.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / _FASHION_MNIST_SUBDIR
    wanted = [f for pair in _FASHION_MNIST_FILES.values() for f in pair]
    if all((target / f).is_file() for f in wanted):
        return target
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise RealDataError(
            f"fetching Fashion-MNIST needs apt-get and dpkg-deb (Debian or Ubuntu) to download "
            f"the {FASHION_MNIST_PACKAGE} package; elsewhere put {', '.join(wanted)} "
            "(github.com/zalandoresearch/fashion-mnist) in a folder and pass that folder"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        work = Path(tmp)
        _run([apt, "download", FASHION_MNIST_PACKAGE], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise RealDataError(f"apt-get download {FASHION_MNIST_PACKAGE} produced no .deb")
        _run([dpkg, "-x", str(debs[0]), str(work / "root")], cwd=work)
        unpacked = work / "root" / _FASHION_MNIST_SUBDIR
        if not all((unpacked / f).is_file() for f in wanted):
            raise RealDataError(f"{debs[0].name} does not hold {wanted}")
        # Moved into place whole, so an interrupted fetch never looks complete.
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(unpacked), str(target))
    logger.info("Fashion-MNIST unpacked into %s", target)
    return target


def _run(command: list[str], *, cwd: Path) -> None:
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)
    except subprocess.CalledProcessError as exc:
        raise RealDataError(
            f"{' '.join(command)} failed ({exc.returncode}): {exc.stderr.strip()[-500:]}"
        ) from None
    except subprocess.TimeoutExpired:
        raise RealDataError(f"{' '.join(command)} took more than 10 minutes") from None


@lru_cache(maxsize=8)
def skimage_photo(name: str) -> np.ndarray:
    """A photo shipped in scikit-image's data folder, as grey uint8 (h, w), read-only.

    The file is read directly: ``skimage.data`` functions may try to download what a wheel
    does not ship.
    """
    try:
        root = importlib.resources.files("skimage")
    except ModuleNotFoundError:
        raise RealDataError(
            "scikit-image is not installed; `pip install -e '.[bench]'` installs it"
        ) from None
    path = Path(str(root / "data" / f"{name}.png"))
    if not path.is_file():
        raise RealDataError(f"scikit-image does not ship {path.name}")
    with Image.open(path) as image:
        photo = np.asarray(image.convert("L"))
    photo.setflags(write=False)
    return photo


def _photo_half(name: str, split: str) -> tuple[np.ndarray, int]:
    """The split's half of a photo (train: left, test: right) and its column offset."""
    photo = skimage_photo(name)
    middle = photo.shape[1] // 2
    return (photo[:, :middle], 0) if split == "train" else (photo[:, middle:], middle)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RealDataset:
    train: DemoDataset
    test: DemoDataset
    groups: Mapping[str, tuple[str, ...]]
    source: str

    def split(self, name: str) -> DemoDataset:
        return {"train": self.train, "test": self.test}[name]


@dataclass(frozen=True)
class _Layer:
    layer: str
    cls: str
    source: str
    item: str
    src_box: tuple[int, int, int, int]
    box: tuple[int, int, int, int]
    flipped: bool = False

    def row(self, image_id: str) -> list[object]:
        return [
            image_id,
            self.layer,
            self.cls,
            self.source,
            self.item,
            *self.src_box,
            *self.box,
            int(self.flipped),
        ]


def build_realdata(
    out: Path,
    pool: ComponentPool,
    *,
    n_train: int,
    n_test: int,
    seed: int = 0,
    size: int = 128,
    show_progress: bool = False,
) -> RealDataset:
    """Write `out`/train and `out`/test: images/, metadata.csv, label_config.xml, sources.csv.

    Image i of a split depends only on (seed, split, i), so a larger n adds images without
    changing the first ones, and the same arguments give byte-identical files.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    groups = {"components": tuple(pool.classes), "defects": DEFECT_TEXTURES}
    datasets = {}
    for split_code, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        root = Path(out) / split
        images_dir = root / "images"
        if images_dir.exists():
            shutil.rmtree(images_dir)  # stale images of an earlier, larger n would linger
        images_dir.mkdir(parents=True)
        rows: list[tuple[str, str, str]] = []
        layers: list[list[object]] = []
        for i in tqdm(range(n), desc=f"{split} images", disable=tqdm_disable(show_progress)):
            rng = np.random.default_rng([seed, split_code, i])
            components = _sample(rng, pool.classes, _N_COMPONENTS_P)
            defects = _sample(rng, DEFECT_TEXTURES, _N_DEFECTS_P)
            image, placed = _render(rng, pool, split, size, components, defects)
            name = f"img_{i:05d}.png"
            image.save(images_dir / name, format="PNG")
            rows.append((name, ";".join(components), ";".join(defects)))
            layers.extend(layer.row(name) for layer in placed)
        _write_csv(root / "metadata.csv", ("image_id", "components", "defects"), rows)
        _write_csv(root / "sources.csv", SOURCES_FIELDS, layers)
        label_config = root / "label_config.xml"
        label_config.write_text(render_label_config(groups), encoding="utf-8")
        datasets[split] = DemoDataset(root, images_dir, root / "metadata.csv", label_config, n)
    logger.info(
        "Wrote %d train + %d test images (%s, %d px, seed %d) to %s",
        n_train,
        n_test,
        pool.name,
        size,
        seed,
        out,
    )
    return RealDataset(datasets["train"], datasets["test"], groups, pool.name)


def _sample(
    rng: np.random.Generator, classes: Sequence[str], p_count: Sequence[float]
) -> list[str]:
    k = min(int(rng.choice(len(p_count), p=p_count)), len(classes))
    chosen = rng.choice(len(classes), size=k, replace=False)
    return [classes[j] for j in sorted(chosen)]  # declared order, so the CSV is canonical


def _render(
    rng: np.random.Generator,
    pool: ComponentPool,
    split: str,
    size: int,
    components: Sequence[str],
    defects: Sequence[str],
) -> tuple[Image.Image, list[_Layer]]:
    canvas, surface = _surface(rng, split, size)
    placed = [surface]
    boxes: list[tuple[int, int, int, int]] = []
    # Defects first: a part may sit on a stain, not the other way round.
    for name in defects:
        side = int(rng.uniform(*_DEFECT_SIDE) * size)
        box = _place(rng, size, side, boxes)
        layer = _paste_texture(rng, canvas, name, split, box)
        placed.append(layer)
        boxes.append(box)
    for name in components:
        side = int(rng.uniform(*_COMPONENT_SIDE) * size)
        box = _place(rng, size, side, boxes)
        placed.append(_paste_item(rng, canvas, pool, name, split, box))
        boxes.append(box)
    return _camera(rng, canvas), placed


def _surface(rng: np.random.Generator, split: str, size: int) -> tuple[np.ndarray, _Layer]:
    half, offset = _photo_half(SURFACE_PHOTO, split)
    side = int(rng.integers(_SURFACE_CROP[0], min(_SURFACE_CROP[1], *half.shape) + 1))
    y0 = int(rng.integers(0, half.shape[0] - side + 1))
    x0 = int(rng.integers(0, half.shape[1] - side + 1))
    crop = _resize(half[y0 : y0 + side, x0 : x0 + side], size)
    gain, level = rng.uniform(0.7, 1.2), rng.uniform(0.3, 0.6)
    grey = (crop - crop.mean()) * gain + level
    # A per-image white balance: the photos are grey, cameras rarely are.
    tint = 1.0 + rng.normal(0.0, 0.06, 3)
    canvas = np.clip(grey[..., None] * tint, 0.0, 1.0).astype(np.float32)
    src = (x0 + offset, y0, x0 + offset + side, y0 + side)
    return canvas, _Layer(
        "surface", SURFACE_PHOTO, f"{SURFACE_PHOTO}.png", "", src, (0, 0, size, size)
    )


def _paste_texture(
    rng: np.random.Generator,
    canvas: np.ndarray,
    name: str,
    split: str,
    box: tuple[int, int, int, int],
) -> _Layer:
    half, offset = _photo_half(name, split)
    side = box[2] - box[0]
    crop_side = int(rng.integers(_DEFECT_CROP[0], min(_DEFECT_CROP[1], *half.shape) + 1))
    y0 = int(rng.integers(0, half.shape[0] - crop_side + 1))
    x0 = int(rng.integers(0, half.shape[1] - crop_side + 1))
    patch = _resize(half[y0 : y0 + crop_side, x0 : x0 + crop_side], side)
    patch = (patch - patch.mean()) * rng.uniform(0.8, 1.5) + rng.uniform(0.25, 0.75)
    # A ragged, feathered blob rather than a square: stains have no straight edges.
    mask = _blob(rng, side)
    region = canvas[box[1] : box[3], box[0] : box[2]]
    region[:] = region * (1.0 - mask[..., None]) + np.clip(patch, 0, 1)[..., None] * mask[..., None]
    src = (x0 + offset, y0, x0 + offset + crop_side, y0 + crop_side)
    return _Layer("defect", name, f"{name}.png", "", src, (box[0], box[1], box[2], box[3]))


def _paste_item(
    rng: np.random.Generator,
    canvas: np.ndarray,
    pool: ComponentPool,
    name: str,
    split: str,
    box: tuple[int, int, int, int],
) -> _Layer:
    ids, images = pool.items[split][name]
    pick = int(rng.integers(len(ids)))
    item = images[pick]
    side = box[2] - box[0]
    values = _resize(item, side)
    flipped = bool(rng.random() < 0.5)
    if flipped:
        values = values[:, ::-1]
    # The item photos are bright objects on pure black: the brightness is also the matte.
    alpha = np.clip(values * 6.0, 0.0, 1.0)
    region = canvas[box[1] : box[3], box[0] : box[2]]
    # Lighter than a dark background, darker than a light one, by a random margin: an item as
    # grey as the bricks under it would be invisible, and its label a lie.
    background = float(region.mean())
    sign = 1.0 if background < 0.5 else -1.0
    shade = background + sign * (rng.uniform(0.15, 0.3) + rng.uniform(0.3, 0.5) * values)
    colour = np.clip(shade, 0.0, 1.0)[..., None] * (1.0 + rng.normal(0.0, 0.05, 3))
    region[:] = region * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    h, w = item.shape
    return _Layer(
        "component",
        name,
        pool.files[split],
        str(int(ids[pick])),
        (0, 0, w, h),
        (box[0], box[1], box[2], box[3]),
        flipped,
    )


def _place(
    rng: np.random.Generator, size: int, side: int, boxes: Sequence[tuple[int, int, int, int]]
) -> tuple[int, int, int, int]:
    """A square box inside the image overlapping earlier boxes as little as possible."""
    best, best_overlap = (0, 0, side, side), np.inf
    for _ in range(_PLACEMENT_TRIES):
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = (x0, y0, x0 + side, y0 + side)
        overlap = max((_overlap_share(box, other) for other in boxes), default=0.0)
        if overlap < best_overlap:
            best, best_overlap = box, overlap
        if overlap <= _MAX_OVERLAP:
            break
    return best


def _overlap_share(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over the smaller box: how much of either one the other hides."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _blob(rng: np.random.Generator, side: int) -> np.ndarray:
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side * 2.0 - 1.0
    angle = rng.uniform(0.0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    radius = np.sqrt((u / rng.uniform(0.75, 1.0)) ** 2 + (v / rng.uniform(0.55, 1.0)) ** 2)
    theta = np.arctan2(v, u)
    # A few low harmonics on the outline make it irregular but keep it one piece.
    wobble = sum(
        rng.uniform(0.0, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    return np.clip((0.92 + wobble - radius) / 0.12, 0.0, 1.0).astype(np.float32)


def _camera(rng: np.random.Generator, canvas: np.ndarray) -> Image.Image:
    image = Image.fromarray(_to_uint8(canvas * rng.uniform(0.85, 1.15)))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6)))
    noisy = np.asarray(image, np.float32) / 255.0
    noisy = noisy + rng.normal(0.0, rng.uniform(0.005, 0.02), noisy.shape)
    return Image.fromarray(_to_uint8(noisy))


def _resize(grey: np.ndarray, side: int) -> np.ndarray:
    """uint8 (h, w) -> float32 (side, side) in [0, 1], antialiased."""
    image = Image.fromarray(np.ascontiguousarray(grey)).resize(
        (side, side), Image.Resampling.BILINEAR
    )
    return np.asarray(image, np.float32) / 255.0


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    # Fixed "\n" line endings keep the files byte-identical across platforms.
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
