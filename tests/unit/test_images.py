"""Image URL resolution, image decoding and the disk cache's bookkeeping, in-process (the
fetcher against a local stand-in for Label Studio: tests/integration/test_image_fetcher.py)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from labelloop.labelstudio.fetcher import ImageFetcher
from labelloop.labelstudio.urls import FetchSettings, ImageFetchError, ResolvedSource, resolve_url
from labelloop.ml.images import ImageError, decode_image

TOKEN = "1abe11009de0c0ffee5eed5ca1ab1e0123456789"
LS = "http://ls.example:8080"


def _settings(**kwargs: Any) -> FetchSettings:
    return FetchSettings(label_studio_url=kwargs.pop("label_studio_url", LS + "/"), **kwargs)


def test_relative_upload_url_joins_label_studio_with_auth() -> None:
    assert resolve_url("/data/upload/3/a.png", _settings()) == ResolvedSource(
        "http", f"{LS}/data/upload/3/a.png", True
    )


def test_relative_url_without_label_studio_url_says_to_set_it() -> None:
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        resolve_url("/data/upload/3/a.png", _settings(label_studio_url=None))


@pytest.mark.parametrize(
    ("url", "send_auth"),
    [
        (f"{LS}/data/upload/1/a.png", True),
        ("HTTP://LS.EXAMPLE:8080/data/upload/1/a.png", True),
        ("http://ls.example:8081/data/upload/1/a.png", False),  # other port
        ("https://ls.example:8080/data/upload/1/a.png", False),  # other scheme
        ("http://elsewhere.example:8080/a.png", False),
        ("https://cdn.example/a.png?sig=1", False),
    ],
)
def test_auth_only_for_label_studio_origin(url: str, send_auth: bool) -> None:
    source = resolve_url(url, _settings())
    assert (source.kind, source.location, source.send_auth) == ("http", url, send_auth)


def test_default_ports_are_the_same_origin() -> None:
    settings = _settings(label_studio_url="https://ls.example")
    assert resolve_url("https://ls.example:443/data/upload/1/a.png", settings).send_auth


@pytest.mark.parametrize("prefix", ["", LS])
def test_local_files_read_from_document_root(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a b.png").write_bytes(b"x")
    source = resolve_url(
        f"{prefix}/data/local-files/?d=dir/a%20b.png", _settings(document_root=tmp_path)
    )
    assert source == ResolvedSource(
        "local_file", str(tmp_path.resolve() / "dir" / "a b.png"), False
    )


def test_local_files_without_document_root_go_through_label_studio() -> None:
    source = resolve_url("/data/local-files/?d=dir/a.png", _settings())
    assert source == ResolvedSource("http", f"{LS}/data/local-files/?d=dir/a.png", True)


def test_local_files_on_another_host_are_not_read_from_disk(tmp_path: Path) -> None:
    url = "http://elsewhere.example/data/local-files/?d=a.png"
    source = resolve_url(url, _settings(document_root=tmp_path))
    assert source == ResolvedSource("http", url, False)


def _upload_on_disk(data_dir: Path, name: str = "a1b2c3d4-a b.jpg") -> Path:
    path = data_dir / "media" / "upload" / "3" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"uploaded")
    return path


@pytest.mark.parametrize("prefix", ["", LS])
def test_uploads_read_from_label_studio_data_dir(tmp_path: Path, prefix: str) -> None:
    path = _upload_on_disk(tmp_path)
    source = resolve_url(
        f"{prefix}/data/upload/3/a1b2c3d4-a%20b.jpg", _settings(label_studio_data_dir=tmp_path)
    )
    assert source == ResolvedSource("local_file", str(path.resolve()), False)


def test_upload_missing_from_data_dir_is_downloaded(tmp_path: Path) -> None:
    _upload_on_disk(tmp_path)
    source = resolve_url("/data/upload/3/other.jpg", _settings(label_studio_data_dir=tmp_path))
    assert source == ResolvedSource("http", f"{LS}/data/upload/3/other.jpg", True)


@pytest.mark.parametrize(
    "url",
    [
        "http://elsewhere.example/data/upload/3/a1b2c3d4-a%20b.jpg",  # another Label Studio
        "/data/avatars/3/a1b2c3d4-a%20b.jpg",  # media, but not an upload
        "/static/upload/3/a1b2c3d4-a%20b.jpg",
    ],
)
def test_only_label_studio_uploads_are_read_from_data_dir(tmp_path: Path, url: str) -> None:
    _upload_on_disk(tmp_path)
    assert resolve_url(url, _settings(label_studio_data_dir=tmp_path)).kind == "http"


def test_upload_path_under_a_label_studio_sub_path(tmp_path: Path) -> None:
    path = _upload_on_disk(tmp_path)
    settings = _settings(label_studio_url=f"{LS}/ls/", label_studio_data_dir=tmp_path)
    assert resolve_url("/ls/data/upload/3/a1b2c3d4-a%20b.jpg", settings).kind == "http"
    assert resolve_url(f"{LS}/ls/data/upload/3/a1b2c3d4-a%20b.jpg", settings).location == str(
        path.resolve()
    )


def test_upload_escaping_the_media_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_bytes(b"secret")
    with pytest.raises(ImageFetchError, match="refusing local file"):
        resolve_url(
            "/data/upload/%2E%2E/%2E%2E/secret.txt", _settings(label_studio_data_dir=tmp_path)
        )


@pytest.mark.parametrize("d", ["../secret.png", "dir/../../secret.png", "/etc/passwd", ""])
def test_local_files_outside_the_root_are_refused(tmp_path: Path, d: str) -> None:
    with pytest.raises(ImageFetchError, match="refusing local file"):
        resolve_url(f"/data/local-files/?d={d}", _settings(document_root=tmp_path))


def test_symlink_escaping_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"secret")
    (root / "inside.png").write_bytes(b"ok")
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "alias.png").symlink_to(root / "inside.png")
    settings = _settings(document_root=root)
    with pytest.raises(
        ImageFetchError, match="resolves outside .*LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
    ):
        resolve_url("/data/local-files/?d=escape.png", settings)
    # A link that stays inside the root is fine.
    assert resolve_url("/data/local-files/?d=alias.png", settings).location == str(
        root.resolve() / "inside.png"
    )


@pytest.mark.parametrize(
    "uri", ["s3://bucket/dir/a.png", "gs://bucket/a b.png", "azure-blob://container/a.png"]
)
def test_cloud_uris_go_through_the_presign_endpoint(uri: str) -> None:
    source = resolve_url(uri, _settings(), task_id=42)
    assert source.kind == "presign" and source.send_auth
    prefix = f"{LS}/tasks/42/presign/?fileuri="
    assert source.location.startswith(prefix)
    assert base64.urlsafe_b64decode(source.location.removeprefix(prefix)).decode() == uri


def test_cloud_uri_needs_a_task_id_and_label_studio() -> None:
    with pytest.raises(ImageFetchError, match="task id"):
        resolve_url("s3://bucket/a.png", _settings())
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        resolve_url("s3://bucket/a.png", _settings(label_studio_url=None), task_id=1)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://host/a.png", "data:image/png;base64,iVBORw0KGgo="]
)
def test_unsupported_schemes_are_refused(url: str) -> None:
    with pytest.raises(ImageFetchError, match="unsupported URL scheme"):
        resolve_url(url, _settings())


def test_relative_path_without_slash_is_refused() -> None:
    with pytest.raises(ImageFetchError, match="unsupported image URL"):
        resolve_url("images/a.png", _settings())


def test_label_studio_url_without_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL"):
        ImageFetcher(FetchSettings(label_studio_url="localhost:8080"), None)


# --------------------------------------------------------------------------- decode_image


def _encode(image: Image.Image, fmt: str, path: Path | None = None, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _png() -> bytes:
    return _encode(Image.new("RGB", (32, 32), (200, 100, 50)), "PNG")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"just some text, not an image\n", "not an image"),
        (_png()[:60], "corrupt or truncated"),
        (_png()[:20] + b"\x00" * 200, "corrupt or truncated|not an image"),
    ],
    ids=["zero-bytes", "text", "truncated", "corrupt"],
)
def test_bad_data_raises_image_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_truncated_jpeg_is_refused() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _encode(noisy, "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused() -> None:
    data = _encode(Image.new("L", (100, 100)), "PNG")
    with pytest.raises(ImageError, match="exceeds the limit of 5000 pixels"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.arange(0, 65536, 4096, dtype=np.uint16), (4, 1))  # 0 .. 61440
    image = decode_image(_encode(Image.fromarray(ramp), "PNG"))
    assert image.mode == "RGB"
    assert list(np.asarray(image)[0, :, 0]) == list(range(0, 256, 16))


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        (Image.new("RGB", (8, 8), (0, 0, 255)).convert("P"), "PNG", (0, 0, 255)),
        (Image.new("RGBA", (8, 8), (0, 255, 0, 128)), "PNG", (0, 255, 0)),
        (Image.new("LA", (8, 8), (77, 0)), "PNG", (77, 77, 77)),
        (Image.new("1", (8, 8), 1), "PNG", (255, 255, 255)),
    ],
    ids=["cmyk-jpeg", "palette-png", "rgba-png", "la-png", "bilevel-png"],
)
def test_valid_modes_come_back_as_rgb(
    image: Image.Image, fmt: str, expected: tuple[int, int, int]
) -> None:
    decoded = decode_image(_encode(image, fmt))
    assert decoded.mode == "RGB"
    assert decoded.size == (8, 8)
    assert all(abs(a - b) <= 3 for a, b in zip(decoded.getpixel((4, 4)), expected, strict=True))


def test_exif_rotated_jpeg_comes_back_upright() -> None:
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 means "rotate
    # 90 degrees clockwise to display", so upright it is 20 x 40 with red on top.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(_encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (20, 40)
    top, bottom = decoded.getpixel((10, 5)), decoded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def _photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 255, (height // 32, width // 32, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def test_jpeg_is_decoded_at_a_reduced_scale_no_smaller_than_asked() -> None:
    data = _encode(_photo(1024, 768), "JPEG", quality=90)
    full = decode_image(data)
    reduced = decode_image(data, min_side=256)
    # 1/2 would be 512x384 and 1/4 is 256x192 (too small): DCT scaling stops at 1/2.
    assert reduced.size == (512, 384) and reduced.mode == "RGB"
    # The same picture: the reduced decode matches a downscaled full decode closely.
    expected = np.asarray(full.resize(reduced.size, Image.BOX), dtype=np.int16)
    assert np.abs(np.asarray(reduced, dtype=np.int16) - expected).mean() < 4


def test_reduced_decode_keeps_exif_orientation_and_leaves_png_alone() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = _encode(_photo(800, 400), "JPEG", exif=exif.tobytes())
    assert decode_image(jpeg, min_side=100).size == (100, 200)  # 1/4 scale, then upright
    png = _encode(_photo(800, 400), "PNG")
    assert decode_image(png, min_side=100).size == (800, 400)


def test_first_frame_of_an_animated_gif() -> None:
    frames = [Image.new("P", (6, 6), i) for i in range(3)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data).mode == "RGB"


def test_cache_scans_its_folder_only_when_the_cap_may_be_exceeded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labelloop.labelstudio import disk_cache as images

    scans = []
    real_scandir = os.scandir

    def counting_scandir(path):  # noqa: ANN001, ANN202
        scans.append(path)
        return real_scandir(path)

    monkeypatch.setattr(images.os, "scandir", counting_scandir)
    cache = images.DiskCache(tmp_path, max_bytes=10_000)
    for i in range(50):
        cache.put(f"http://h/{i}", b"x" * 100)  # 5,000 bytes: under the cap
    assert len(scans) == 1  # the first put counts what is there; later puts add to it
    (tmp_path / ("f" * 64)).write_bytes(b"y" * 4_000)  # another writer, unseen until a scan
    for i in range(50, 80):
        cache.put(f"http://h/{i}", b"x" * 100)  # 8,000 by our count: still no scan
    assert len(scans) == 1
    for i in range(80, 110):
        cache.put(f"http://h/{i}", b"x" * 100)  # passes the cap by our count: scan and evict
    assert len(scans) >= 2
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 10_000
    assert cache.get("http://h/0") is None  # least recently used went first
    assert cache.get("http://h/109") == b"x" * 100
