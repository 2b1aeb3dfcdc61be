"""Deterministic demo dataset of synthetic industrial inspection images.

Each image shows 0-3 metal parts (the "components" label group) on a textured
surface, with 0-2 kinds of surface defects (the "defects" label group). The
generator is seeded per image, so image ``i`` is identical whatever ``n`` is, and
the whole dataset is byte-identical for the same ``(n, seed, size)``.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from labelloop.progress import tqdm_disable

logger = logging.getLogger(__name__)

COMPONENTS: tuple[str, ...] = ("bolt", "nut", "washer", "gear", "bracket")
DEFECTS: tuple[str, ...] = ("scratch", "crack", "rust", "dent")
LABEL_GROUPS: dict[str, tuple[str, ...]] = {"components": COMPONENTS, "defects": DEFECTS}

MIN_SIZE = 32
_IMAGE_NAME_RE = re.compile(r"^img_(\d{5,})\.png$")

# P(k components) for k = 0..3 and P(k defect kinds) for k = 0..2. With classes
# drawn uniformly without replacement, each component has prevalence
# E[k]/5 = 0.35 and each defect E[k]/4 = 0.26, and ~25% of images are clean.
_N_COMPONENTS_P = (0.05, 0.35, 0.40, 0.20)
_N_DEFECTS_P = (0.25, 0.45, 0.30)

# Shapes are drawn at this multiple of the output size and box-downsampled,
# which is a cheap way to get antialiased edges from PIL's ImageDraw.
_SS = 2

# Part radius as a fraction of the image size; the lower bound keeps a gear's
# teeth and a nut's hole visible at size=64.
_PART_RADIUS = (0.15, 0.24)

FloatImage = np.ndarray  # (H, W, 3) float32, nominally in [0, 1]
FloatMask = np.ndarray  # (H, W) float32 in [0, 1]
Points = list[tuple[float, float]]
Light = tuple[float, float]  # unit vector in the image plane, pointing towards the light


@dataclass(frozen=True)
class DemoDataset:
    root: Path
    images_dir: Path
    metadata_csv: Path
    label_config: Path
    n_images: int

    def labels(self) -> dict[str, dict[str, list[str]]]:
        """The ground truth: image file name -> label group -> the labels it shows."""
        with self.metadata_csv.open(newline="", encoding="utf-8") as handle:
            return {
                row["image_id"]: {
                    group: [x for x in row[group].split(";") if x] for group in LABEL_GROUPS
                }
                for row in csv.DictReader(handle)
            }


@dataclass(frozen=True)
class _Part:
    kind: str
    cx: float  # output-pixel coordinates
    cy: float
    radius: float


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def generate_demo_dataset(
    out: Path,
    *,
    n: int = 600,
    seed: int = 0,
    size: int = 128,
    show_progress: bool = False,
) -> DemoDataset:
    """Write ``n`` labelled inspection images, their metadata and a Label Studio config."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    root = Path(out)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_images(images_dir, n)

    rows: list[tuple[str, str, str]] = []
    for i in tqdm(range(n), desc="demo images", unit="img", disable=tqdm_disable(show_progress)):
        # One generator per image, keyed on (seed, i), so image i never depends on n.
        rng = np.random.default_rng([seed, i])
        components, defects = _sample_labels(rng)
        name = f"img_{i:05d}.png"
        render_image(rng, size, components, defects).save(images_dir / name, format="PNG")
        rows.append((name, ";".join(components), ";".join(defects)))

    metadata_csv = root / "metadata.csv"
    _write_metadata(metadata_csv, rows)
    label_config = root / "label_config.xml"
    label_config.write_text(render_label_config(LABEL_GROUPS), encoding="utf-8")

    logger.info("wrote %d demo images (%dpx, seed=%d) to %s", n, size, seed, root)
    return DemoDataset(
        root=root,
        images_dir=images_dir,
        metadata_csv=metadata_csv,
        label_config=label_config,
        n_images=n,
    )


def render_label_config(
    groups: Mapping[str, Sequence[str]],
    *,
    image_name: str = "image",
    image_value: str = "$image",
) -> str:
    """Label Studio config: one image and one multi-choice block per label group."""
    lines = ["<View>", f"  <Image name={quoteattr(image_name)} value={quoteattr(image_value)}/>"]
    for group, classes in groups.items():
        if not classes:
            raise ValueError(f"label group {group!r} has no classes")
        if len(set(classes)) != len(classes):
            raise ValueError(f"label group {group!r} has duplicate classes: {list(classes)}")
        lines.append(f"  <Header value={quoteattr(group)}/>")
        lines.append(
            f"  <Choices name={quoteattr(group)} toName={quoteattr(image_name)}"
            ' choice="multiple" showInLine="true">'
        )
        lines.extend(f"    <Choice value={quoteattr(c)}/>" for c in classes)
        lines.append("  </Choices>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"


def render_image(
    rng: np.random.Generator,
    size: int,
    components: Sequence[str],
    defects: Sequence[str],
) -> Image.Image:
    """Render one RGB inspection image showing the given parts and defects."""
    unknown = (set(components) - set(COMPONENTS)) | (set(defects) - set(DEFECTS))
    if unknown:
        raise ValueError(f"unknown labels: {sorted(unknown)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")

    # Each stage gets its own stream, so e.g. adding a defect leaves the
    # background, parts and camera effects of an image unchanged.
    bg_rng, part_rng, defect_rng, camera_rng = (
        np.random.default_rng(s) for s in rng.integers(0, 2**63, size=4)
    )
    light_angle = rng.uniform(0.0, 2.0 * math.pi)
    light = (math.cos(light_angle), math.sin(light_angle))

    img = _render_background(bg_rng, size)
    parts = _place_parts(part_rng, size, components)
    for part in parts:
        img = _draw_part(part_rng, img, part, light)
    for defect in defects:
        img = _DEFECT_RENDERERS[defect](defect_rng, img, parts, light)
    return _apply_camera(camera_rng, img, light)


# --------------------------------------------------------------------------- #
# Dataset files
# --------------------------------------------------------------------------- #


def _sample_labels(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    n_comp = rng.choice(len(_N_COMPONENTS_P), p=_N_COMPONENTS_P)
    n_def = rng.choice(len(_N_DEFECTS_P), p=_N_DEFECTS_P)
    # Sorted indices keep label cells in canonical class order.
    comp_idx = np.sort(rng.choice(len(COMPONENTS), size=n_comp, replace=False))
    def_idx = np.sort(rng.choice(len(DEFECTS), size=n_def, replace=False))
    return [COMPONENTS[i] for i in comp_idx], [DEFECTS[i] for i in def_idx]


def _remove_stale_images(images_dir: Path, n: int) -> None:
    # A previous, larger run would otherwise leave images that metadata.csv no
    # longer lists; only files following our own naming scheme are touched.
    for path in images_dir.iterdir():
        match = _IMAGE_NAME_RE.match(path.name)
        if match and int(match.group(1)) >= n and path.is_file():
            path.unlink()
            logger.debug("removed stale demo image %s", path)


def _write_metadata(path: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    # Fixed "\n" line endings keep the file byte-identical across platforms.
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("image_id", "components", "defects"))
        writer.writerows(rows)


# --------------------------------------------------------------------------- #
# Low-level helpers
# --------------------------------------------------------------------------- #


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx); cached because every stage needs them."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Roughly unit-variance value noise with about ``cells`` blobs per side."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    up = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32)


def _blur(mask: FloatMask, radius: float) -> FloatMask:
    # PIL only blurs 8-bit images; 1/255 steps are plenty for masks in [0, 1].
    layer = Image.fromarray(_to_uint8(mask)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(layer, dtype=np.float32) / 255.0


def _shift(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Translate a 2-D array by whole pixels, filling with zeros (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _new_layer(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    layer = Image.new("L", (size * _SS, size * _SS), 0)
    return layer, ImageDraw.Draw(layer)


def _downsample(layer: Image.Image) -> FloatMask:
    return np.asarray(layer.reduce(_SS), dtype=np.float32) / 255.0


def _transform(local: np.ndarray, cx: float, cy: float, theta: float, scale: float) -> Points:
    """Rotate local (x, y) points by theta and move them to (cx, cy), in canvas pixels."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]], dtype=np.float64)
    pts = (np.asarray(local, dtype=np.float64) @ rot.T + (cx, cy)) * scale
    return [(float(x), float(y)) for x, y in pts]


def _circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, **kw: object) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), **kw)  # type: ignore[arg-type]


def _lerp_colour(a: Sequence[float], b: Sequence[float], t: np.ndarray) -> FloatImage:
    a_arr = np.asarray(a, dtype=np.float32)
    b_arr = np.asarray(b, dtype=np.float32)
    return a_arr + (b_arr - a_arr) * t[..., None]


# --------------------------------------------------------------------------- #
# Backgrounds
# --------------------------------------------------------------------------- #


def _brushed_metal(rng: np.random.Generator, size: int) -> FloatImage:
    yy, xx = _grid(size)
    angle = rng.uniform(0.0, math.pi)
    across = -xx * math.sin(angle) + yy * math.cos(angle)  # perpendicular to brushing
    along = xx * math.cos(angle) + yy * math.sin(angle)
    # Brushing marks are 1-D: a random profile across the grain, constant along it.
    idx = (across - across.min()).astype(np.int64)
    fine = rng.standard_normal(idx.max() + 1).astype(np.float32)
    coarse = np.convolve(rng.standard_normal(idx.max() + 9), np.ones(9) / 3.0, mode="valid")
    streaks = 0.035 * fine[idx] + 0.03 * coarse.astype(np.float32)[idx]
    streaks *= 1.0 + 0.5 * _smooth_noise(rng, size, 3)  # marks fade in and out
    # Anisotropic sheen: a soft bright band running across the grain.
    band_pos = rng.uniform(0.2, 0.8) * size
    sheen = rng.uniform(0.05, 0.18) * np.exp(-(((along - band_pos) / (0.3 * size)) ** 2))
    base = rng.uniform(0.42, 0.72)
    tint = 1.0 + rng.normal(0.0, 0.015, 3).astype(np.float32)
    lum = base + streaks + sheen + 0.03 * _smooth_noise(rng, size, 2)
    return lum[..., None] * tint


def _concrete(rng: np.random.Generator, size: int) -> FloatImage:
    base = rng.uniform(0.45, 0.68)
    warm = rng.uniform(0.0, 0.04)
    colour = np.array([base + warm, base + warm / 2, base - warm], dtype=np.float32)
    lum = (
        0.06 * _smooth_noise(rng, size, 3)
        + 0.04 * _smooth_noise(rng, size, max(4, size // 10))
        + 0.035 * rng.standard_normal((size, size)).astype(np.float32)
    )
    # Aggregate speckle: sparse single-pixel pits and light grains.
    speckle = rng.random((size, size), dtype=np.float32)
    lum -= 0.18 * (speckle < 0.015)
    lum += 0.10 * (speckle > 0.99)
    return colour + lum[..., None]


# Industrial paint colours; oranges and browns are left out so paint can't pass for rust.
_PAINTS: tuple[tuple[float, float, float], ...] = (
    (0.16, 0.30, 0.55),  # machine blue
    (0.20, 0.42, 0.30),  # machine green
    (0.55, 0.57, 0.60),  # light grey
    (0.30, 0.32, 0.35),  # dark grey
    (0.85, 0.72, 0.18),  # safety yellow
    (0.82, 0.82, 0.78),  # off-white
)


def _painted(rng: np.random.Generator, size: int) -> FloatImage:
    colour = np.asarray(_PAINTS[rng.integers(len(_PAINTS))], dtype=np.float32)
    colour = colour * rng.uniform(0.85, 1.1)
    # Low-frequency unevenness plus fine "orange peel" texture of sprayed paint.
    lum = 0.05 * _smooth_noise(rng, size, 2) + 0.02 * _smooth_noise(rng, size, max(4, size // 5))
    lum += 0.01 * rng.standard_normal((size, size)).astype(np.float32)
    return colour * (1.0 + lum[..., None])


_BACKGROUNDS: tuple[Callable[[np.random.Generator, int], FloatImage], ...] = (
    _brushed_metal,
    _concrete,
    _painted,
)


def _render_background(rng: np.random.Generator, size: int) -> FloatImage:
    return _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))](rng, size).astype(np.float32)


# --------------------------------------------------------------------------- #
# Parts
# --------------------------------------------------------------------------- #


def _place_parts(rng: np.random.Generator, size: int, kinds: Sequence[str]) -> list[_Part]:
    """Random positions with a few rejection tries so parts rarely hide each other."""
    parts: list[_Part] = []
    for kind in kinds:
        radius = rng.uniform(*_PART_RADIUS) * size
        candidates = rng.uniform(radius * 0.8, size - radius * 0.8, size=(12, 2))
        gaps = np.array([_clearance(x, y, radius, parts) for x, y in candidates])
        free = np.flatnonzero(gaps >= 0)
        cx, cy = candidates[free[0] if free.size else gaps.argmax()]
        parts.append(_Part(kind, float(cx), float(cy), radius))
    return parts


def _clearance(x: float, y: float, radius: float, parts: Sequence[_Part]) -> float:
    """Gap between a new part's bounding circle and the nearest placed one (< 0: overlap)."""
    return min((math.hypot(x - p.cx, y - p.cy) - radius - p.radius for p in parts), default=0.0)


def _bolt(draw: ImageDraw.ImageDraw, detail: ImageDraw.ImageDraw, p: _Part, theta: float) -> None:
    # Side view: hexagonal head (three visible faces) and a threaded shank.
    r = p.radius
    half, head, head_w, shank_w = r, 0.4 * r, 0.8 * r, 0.42 * r
    x0, x1 = -half, -half + head
    tip = half - 0.12 * r
    head_poly = [(x0, -head_w / 2), (x1, -head_w / 2), (x1, head_w / 2), (x0, head_w / 2)]
    shank = [(x1, -shank_w / 2), (tip, -shank_w / 2), (half, -shank_w / 4)]
    shank += [(half, shank_w / 4), (tip, shank_w / 2), (x1, shank_w / 2)]
    draw.polygon(_transform(np.array(head_poly), p.cx, p.cy, theta, _SS), fill=255)
    draw.polygon(_transform(np.array(shank), p.cx, p.cy, theta, _SS), fill=255)

    width = max(1, round(_SS * r / 14))
    for y in (-head_w / 4, head_w / 4):
        detail.line(_transform(np.array([(x0, y), (x1, y)]), p.cx, p.cy, theta, _SS), 200, width)
    pitch = max(0.16 * r, 2.0)
    for x in np.arange(x1 + 0.35 * r, tip, pitch):
        thread = np.array([(x, -shank_w / 2), (x + pitch * 0.6, shank_w / 2)])
        detail.line(_transform(thread, p.cx, p.cy, theta, _SS), 255, width)


def _nut(draw: ImageDraw.ImageDraw, detail: ImageDraw.ImageDraw, p: _Part, theta: float) -> None:
    r = 0.85 * p.radius
    hexagon = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    draw.polygon(_transform(np.array(hexagon), p.cx, p.cy, theta, _SS), fill=255)
    cx, cy, hole = p.cx * _SS, p.cy * _SS, 0.42 * r * _SS
    _circle(draw, cx, cy, hole, fill=0)
    width = max(1, round(_SS * r / 12))
    # Chamfer circle on the face and the thread root just outside the hole.
    _circle(detail, cx, cy, 0.86 * r * _SS, outline=140, width=width)
    _circle(detail, cx, cy, hole * 1.2, outline=255, width=width)


def _washer(draw: ImageDraw.ImageDraw, detail: ImageDraw.ImageDraw, p: _Part, theta: float) -> None:
    del detail, theta  # a plain washer is rotationally symmetric and featureless
    cx, cy, r = p.cx * _SS, p.cy * _SS, 0.8 * p.radius * _SS
    _circle(draw, cx, cy, r, fill=255)
    _circle(draw, cx, cy, 0.5 * r, fill=0)


def _gear(draw: ImageDraw.ImageDraw, detail: ImageDraw.ImageDraw, p: _Part, theta: float) -> None:
    r = p.radius
    # Fewer, deeper teeth on small gears so the teeth survive downsampling.
    n_teeth = int(np.clip(round(r / 2.2), 8, 14))
    root = 0.76 * r
    pitch = 2 * math.pi / n_teeth
    outline: list[tuple[float, float]] = []
    for k in range(n_teeth):
        a = k * pitch
        for frac, rad in ((0.0, root), (0.15, r), (0.45, r), (0.6, root)):
            outline.append((rad * math.cos(a + frac * pitch), rad * math.sin(a + frac * pitch)))
    draw.polygon(_transform(np.array(outline), p.cx, p.cy, theta, _SS), fill=255)
    cx, cy = p.cx * _SS, p.cy * _SS
    _circle(draw, cx, cy, 0.2 * r * _SS, fill=0)
    width = max(1, round(_SS * r / 14))
    _circle(detail, cx, cy, 0.38 * r * _SS, outline=220, width=width)  # hub
    _circle(detail, cx, cy, 0.68 * r * _SS, outline=120, width=width)  # rim


def _bracket(
    draw: ImageDraw.ImageDraw, detail: ImageDraw.ImageDraw, p: _Part, theta: float
) -> None:
    del detail  # holes are cut from the mask; a flat plate has no other features
    r = p.radius
    arm, w = 1.7 * r, 0.55 * r
    shape = np.array([(0, 0), (arm, 0), (arm, w), (w, w), (w, arm), (0, arm)], dtype=np.float64)
    shape -= (arm * 0.4, arm * 0.4)  # roughly centre the L on the part position
    draw.polygon(_transform(shape, p.cx, p.cy, theta, _SS), fill=255)
    centres = np.array([(arm * 0.72, w / 2), (w / 2, arm * 0.72), (w / 2, w / 2)]) - arm * 0.4
    for hx, hy in _transform(centres, p.cx, p.cy, theta, _SS):
        _circle(draw, hx, hy, 0.14 * r * _SS, fill=0)


_PartDrawer = Callable[[ImageDraw.ImageDraw, ImageDraw.ImageDraw, _Part, float], None]
_PART_DRAWERS: dict[str, _PartDrawer] = {
    "bolt": _bolt,
    "nut": _nut,
    "washer": _washer,
    "gear": _gear,
    "bracket": _bracket,
}

# (colour, probability): bright zinc, plain steel, black oxide, brass.
_MATERIALS: tuple[tuple[tuple[float, float, float], float], ...] = (
    ((0.80, 0.82, 0.85), 0.3),
    ((0.62, 0.63, 0.65), 0.35),
    ((0.24, 0.24, 0.26), 0.2),
    ((0.75, 0.60, 0.32), 0.15),
)


def _part_colour(rng: np.random.Generator) -> np.ndarray:
    probs = np.array([p for _, p in _MATERIALS])
    colour = np.asarray(_MATERIALS[rng.choice(len(_MATERIALS), p=probs)][0], dtype=np.float32)
    return colour * rng.uniform(0.85, 1.12)


def _draw_part(rng: np.random.Generator, img: FloatImage, part: _Part, light: Light) -> FloatImage:
    size = img.shape[0]
    mask_img, draw = _new_layer(size)
    detail_img, detail = _new_layer(size)
    _PART_DRAWERS[part.kind](draw, detail, part, rng.uniform(0.0, 2.0 * math.pi))
    mask = _downsample(mask_img)
    lines = _downsample(detail_img) * mask

    # Drop shadow away from the light, under the part.
    offset = max(1.0, 0.12 * part.radius)
    shadow = _blur(_shift(mask, round(-light[0] * offset), round(-light[1] * offset)), offset)
    img = img * (1.0 - rng.uniform(0.3, 0.55) * shadow[..., None])

    # Bevel: the gradient of a blurred mask, lit from `light`, brightens edges that
    # face the light and darkens the others, which reads as a raised metal part.
    gy, gx = np.gradient(_blur(mask, max(0.8, part.radius / 10)))
    bevel = -(gx * light[0] + gy * light[1]) * part.radius * 0.9
    yy, xx = _grid(size)
    ramp = ((xx - part.cx) * light[0] + (yy - part.cy) * light[1]) / part.radius
    shade = 0.9 + 0.15 * ramp + np.clip(bevel, -0.5, 0.5) - 0.4 * lines
    grain = 0.025 * rng.standard_normal((size, size)).astype(np.float32)
    colour = _part_colour(rng) * (shade + grain)[..., None]
    return img * (1.0 - mask[..., None]) + colour * mask[..., None]


# --------------------------------------------------------------------------- #
# Defects
# --------------------------------------------------------------------------- #


def _defect_centre(rng: np.random.Generator, size: int, parts: Sequence[_Part]) -> np.ndarray:
    # Half of the defects sit on a part, where an inspector would look for them.
    if parts and rng.random() < 0.5:
        part = parts[int(rng.integers(len(parts)))]
        return np.array([part.cx, part.cy]) + rng.uniform(-0.6, 0.6, 2) * part.radius
    return rng.uniform(0.15, 0.85, 2) * size


def _scratch(
    rng: np.random.Generator, img: FloatImage, parts: Sequence[_Part], light: Light
) -> FloatImage:
    size = img.shape[0]
    layer, draw = _new_layer(size)
    centre = _defect_centre(rng, size, parts)
    angle = rng.uniform(0.0, math.pi)
    length = rng.uniform(0.45, 0.85) * size
    # A few near-parallel, nearly straight lines: what a dragged tool leaves behind.
    for _ in range(rng.integers(2, 5)):
        a = angle + rng.normal(0.0, 0.06)
        half = 0.5 * length * rng.uniform(0.6, 1.0)
        t = np.linspace(-half, half, 5)
        bow = rng.normal(0.0, 0.015 * size) * (1.0 - (t / half) ** 2)
        off = centre + rng.normal(0.0, 0.03 * size, 2)
        local = np.stack([t, bow + rng.normal(0.0, 0.004 * size, t.size)], axis=1)
        # At least one output pixel wide, or small images would blur it away.
        width = max(_SS, round(_SS * size / 128 * rng.uniform(1.2, 2.0)))
        draw.line(_transform(local, off[0], off[1], a, _SS), fill=255, width=width, joint="curve")
    mark = _downsample(layer)
    strength = rng.uniform(0.55, 0.9)
    # The groove wall turned away from the light casts a thin dark edge.
    edge = np.clip(_shift(mark, -round(light[0]), -round(light[1])) - mark, 0.0, 1.0)
    img = img * (1.0 - 0.6 * strength * edge[..., None])
    # A scratch catches the light on dark surfaces and reads as a dark groove on
    # bright ones; either way it contrasts with what it crosses.
    under = float((img.mean(axis=2) * mark).sum() / max(mark.sum(), 1e-6))
    if under < 0.55:
        return img + strength * mark[..., None] * (1.0 - img)
    return img * (1.0 - strength * mark[..., None])


def _crack_path(
    rng: np.random.Generator, start: np.ndarray, heading: float, steps: int, step: float
) -> np.ndarray:
    """A jagged random walk: small straight segments with sharp heading changes."""
    turns = np.cumsum(rng.normal(0.0, 0.55, steps)) * 0.5 + rng.normal(0.0, 0.5, steps)
    headings = heading + turns
    lengths = step * rng.uniform(0.6, 1.4, steps)
    deltas = np.stack([np.cos(headings), np.sin(headings)], axis=1) * lengths[:, None]
    return np.vstack([start, start + np.cumsum(deltas, axis=0)])


def _crack(
    rng: np.random.Generator, img: FloatImage, parts: Sequence[_Part], light: Light
) -> FloatImage:
    del light
    size = img.shape[0]
    layer, draw = _new_layer(size)
    step = rng.uniform(0.035, 0.055) * size
    heading = rng.uniform(0.0, 2.0 * math.pi)
    main = _crack_path(rng, np.zeros(2), heading, int(rng.integers(14, 24)), step)
    # Centre the walk's bounding box on the defect so it can't wander off-image.
    main += _defect_centre(rng, size, parts) - (main.min(axis=0) + main.max(axis=0)) / 2
    base_w = max(2, round(_SS * size / 128 * rng.uniform(2.5, 4.0)))
    # Cracks narrow as they run out from where they started.
    for k in range(len(main) - 1):
        w = max(1, round(base_w * (1.0 - 0.6 * k / len(main))))
        draw.line([tuple(main[k] * _SS), tuple(main[k + 1] * _SS)], fill=255, width=w)
    for _ in range(rng.integers(2, 5)):
        k = int(rng.integers(1, len(main) - 1))
        branch_heading = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2)
        branch = _crack_path(rng, main[k], branch_heading, int(rng.integers(3, 8)), step * 0.8)
        draw.line([tuple(q) for q in branch * _SS], fill=255, width=max(1, base_w // 2))
    mark = _downsample(layer)[..., None]
    return img * (1.0 - rng.uniform(0.7, 0.92) * mark)


def _rust(
    rng: np.random.Generator, img: FloatImage, parts: Sequence[_Part], light: Light
) -> FloatImage:
    del light
    size = img.shape[0]
    yy, xx = _grid(size)
    for _ in range(rng.integers(1, 3)):
        cx, cy = _defect_centre(rng, size, parts)
        radius = rng.uniform(0.09, 0.17) * size
        dist2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / radius**2
        # Noise-perturbed radial falloff gives a ragged, blotchy outline; the
        # noise fades towards the centre so every patch keeps a solid core.
        ragged = np.sqrt(np.minimum(dist2, 2.0)) * _smooth_noise(rng, size, max(6, size // 12))
        field = (1.0 - dist2) + 0.6 * ragged
        coverage = np.clip(field / 0.35, 0.0, 1.0)
        tone = np.clip(0.5 + 0.35 * _smooth_noise(rng, size, max(8, size // 6)), 0.0, 1.0)
        rust = _lerp_colour((0.32, 0.13, 0.05), (0.78, 0.40, 0.13), tone)
        rust *= (1.0 + 0.12 * rng.standard_normal((size, size)).astype(np.float32))[..., None]
        alpha = (rng.uniform(0.75, 0.95) * coverage)[..., None]
        img = img * (1.0 - alpha) + rust * alpha
    return img


def _dent(
    rng: np.random.Generator, img: FloatImage, parts: Sequence[_Part], light: Light
) -> FloatImage:
    size = img.shape[0]
    yy, xx = _grid(size)
    for _ in range(rng.integers(1, 3)):
        cx, cy = _defect_centre(rng, size, parts)
        radius = rng.uniform(0.1, 0.16) * size
        squash = rng.uniform(0.65, 1.0)
        a = rng.uniform(0.0, math.pi)
        u = ((xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)) / radius
        v = (-(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)) / (radius * squash)
        d2 = np.minimum(u**2 + v**2, 1.0)
        # Smooth bowl; its slope lit from `light` shades the near wall and
        # highlights the far wall, the signature of a depression.
        depth = -((1.0 - d2) ** 2) * radius
        gy, gx = np.gradient(depth)
        # 1.54 is the bowl's steepest slope, so `lit` stays within [-1, 1].
        lit = -(gx * light[0] + gy * light[1]) / 1.54
        strength = rng.uniform(0.6, 0.9)
        # Partly additive so a dent still shows on dark, black-oxide parts.
        img = img * (1.0 + 0.6 * strength * lit - 0.1 * (1.0 - d2))[..., None]
        img = img + (0.2 * strength * lit)[..., None]
    return img


_DefectRenderer = Callable[[np.random.Generator, FloatImage, Sequence[_Part], Light], FloatImage]
_DEFECT_RENDERERS: dict[str, _DefectRenderer] = {
    "scratch": _scratch,
    "crack": _crack,
    "rust": _rust,
    "dent": _dent,
}


# --------------------------------------------------------------------------- #
# Camera
# --------------------------------------------------------------------------- #


def _apply_camera(rng: np.random.Generator, img: FloatImage, light: Light) -> Image.Image:
    """Global lighting, exposure, white balance, slight defocus and sensor noise."""
    size = img.shape[0]
    yy, xx = _grid(size)
    nx, ny = xx / size - 0.5, yy / size - 0.5
    gradient = 1.0 + rng.uniform(0.0, 0.5) * (nx * light[0] + ny * light[1])
    vignette = 1.0 - rng.uniform(0.0, 0.5) * (nx**2 + ny**2)
    white_balance = 1.0 + rng.normal(0.0, 0.03, 3).astype(np.float32)
    exposure = rng.uniform(0.8, 1.15)
    contrast = rng.uniform(0.8, 1.2)
    img = img * (gradient * vignette * exposure)[..., None] * white_balance
    # Contrast pivots on a fixed grey, not the image mean, so local changes stay local.
    img = (img - 0.5) * contrast + 0.5

    out = Image.fromarray(_to_uint8(img))
    blur = rng.uniform(0.0, 0.6) * size / 128
    out = out.filter(ImageFilter.GaussianBlur(blur))
    noise = rng.normal(0.0, rng.uniform(0.004, 0.025), (size, size, 3)).astype(np.float32)
    noisy = np.asarray(out, dtype=np.float32) / 255.0 + noise
    return Image.fromarray(_to_uint8(noisy))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
