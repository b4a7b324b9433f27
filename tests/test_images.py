"""common.images: every file form HPA images come in, written as real files, and the real HPA files."""
from __future__ import annotations

import gzip
import os

import cv2
import numpy as np
import pytest
import tifffile

from common import images
from common.images import CHANNELS, ImageLoadError


def _grey(h: int, w: int, seed: int, dtype=np.uint8) -> np.ndarray:
    """A smooth image with structure (JPEG-friendly), full range of `dtype`."""
    rng = np.random.default_rng(seed)
    small = rng.random((max(2, h // 8), max(2, w // 8))).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    big = (big - big.min()) / (big.max() - big.min())
    return np.rint(big * np.iinfo(dtype).max).astype(dtype)


def _write_png(path, arr) -> None:
    assert cv2.imwrite(str(path), arr)


def _write_tif(path, arr, gz: bool = False) -> None:
    if gz:
        import io

        buf = io.BytesIO()
        tifffile.imwrite(buf, arr)
        with open(path, "wb") as fh:
            fh.write(gzip.compress(buf.getvalue()))
    else:
        tifffile.imwrite(str(path), arr)


def _write_jpeg(path, arr, quality: int = 95) -> None:
    ok, buf = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    with open(path, "wb") as fh:
        fh.write(buf.tobytes())


def _four(tmp_path, image_id="img1", h=40, w=56, writer=_write_png, ext=".png", dtype=np.uint8):
    """Write four distinct channels; return them as {channel: array}."""
    planes = {}
    for k, ch in enumerate(CHANNELS):
        arr = _grey(h, w, seed=k, dtype=dtype)
        writer(tmp_path / f"{image_id}_{ch}{ext}", arr)
        planes[ch] = arr
    return planes


# ------------------------------------------------------------------------------ formats
def test_png_8bit_round_trip_non_square(tmp_path):
    planes = _four(tmp_path, h=37, w=61)
    img = images.load_image(str(tmp_path), "img1")
    assert img.shape == (37, 61, 4) and img.dtype == np.uint8
    for k, ch in enumerate(CHANNELS):
        np.testing.assert_array_equal(img[..., k], planes[ch])


def test_channel_order_follows_argument(tmp_path):
    planes = _four(tmp_path)
    img = images.load_image(str(tmp_path), "img1", channels=("yellow", "blue"))
    assert img.shape[-1] == 2
    np.testing.assert_array_equal(img[..., 0], planes["yellow"])
    np.testing.assert_array_equal(img[..., 1], planes["blue"])


def test_to_uint8_rule_anchors():
    v = np.array([0, 1, 256, 257, 258, 514, 32768, 65278, 65279, 65535], dtype=np.uint16)
    out = images.to_uint8(v)
    assert out.dtype == np.uint8
    # ceil(v / 257), computed independently in float
    np.testing.assert_array_equal(out, np.ceil(v.astype(np.float64) / 257.0).astype(np.uint8))
    assert out[0] == 0 and out[-1] == 255
    every = np.arange(65536, dtype=np.uint16)  # the whole range, against the float definition
    np.testing.assert_array_equal(images.to_uint8(every), np.ceil(every / 257.0).astype(np.uint8))
    np.testing.assert_array_equal(images.to_uint8(every.reshape(256, 256)), images.to_uint8(every).reshape(256, 256))
    u8 = np.arange(256, dtype=np.uint8)
    assert images.to_uint8(u8) is u8
    # 8-bit values written as 16-bit the usual way (v * 257) come back exactly
    np.testing.assert_array_equal(images.to_uint8(u8.astype(np.uint16) * 257), u8)


def test_to_uint8_floats_bool_and_bad_types():
    np.testing.assert_array_equal(images.to_uint8(np.array([0.0, 0.5, 1.0], np.float32)), [0, 128, 255])
    np.testing.assert_array_equal(images.to_uint8(np.array([True, False])), [255, 0])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        images.to_uint8(np.array([0.0, 1.5]))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        images.to_uint8(np.array([np.nan, 0.5]))
    with pytest.raises(ValueError, match="int32"):
        images.to_uint8(np.zeros(3, np.int32))


def test_png_16bit_uses_the_rule(tmp_path):
    planes = _four(tmp_path, dtype=np.uint16)
    assert cv2.imread(str(tmp_path / "img1_red.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    img = images.load_image(str(tmp_path), "img1")
    for k, ch in enumerate(CHANNELS):
        np.testing.assert_array_equal(img[..., k], images.to_uint8(planes[ch]))
    raw = images.read_channel_raw(str(tmp_path / "img1_red.png"))
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, planes["red"])


@pytest.mark.parametrize("ext,gz", [(".tif", False), (".tiff", False), (".tif.gz", True)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_and_gzipped_tiff(tmp_path, ext, gz, dtype):
    planes = _four(tmp_path, writer=lambda p, a: _write_tif(p, a, gz=gz), ext=ext, dtype=dtype)
    img = images.load_image(str(tmp_path), "img1")
    for k, ch in enumerate(CHANNELS):
        np.testing.assert_array_equal(img[..., k], images.to_uint8(planes[ch]))
    assert images.channel_path(str(tmp_path), "img1", "green").endswith("img1_green" + ext)


def test_big_endian_tiff_and_array(tmp_path):
    arr = _grey(20, 30, 4, np.uint16)
    tifffile.imwrite(str(tmp_path / "x_red.tif"), arr, byteorder=">")
    with open(tmp_path / "x_red.tif", "rb") as fh:
        assert fh.read(2) == b"MM"
    np.testing.assert_array_equal(images.load_channel(str(tmp_path / "x_red.tif")), images.to_uint8(arr))
    np.testing.assert_array_equal(images.to_uint8(arr.astype(">u2")), images.to_uint8(arr))


def test_tiff_with_a_page_axis(tmp_path):
    arr = _grey(20, 30, 0, np.uint16)
    tifffile.imwrite(str(tmp_path / "x_blue.tif"), arr[None])  # (1, H, W)
    np.testing.assert_array_equal(images.load_channel(str(tmp_path / "x_blue.tif")), images.to_uint8(arr))


@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".png"])  # .png: JPEG data behind a PNG name
def test_greyscale_jpeg_any_name(tmp_path, ext):
    planes = _four(tmp_path, h=64, w=96, writer=_write_jpeg, ext=ext)
    with open(tmp_path / f"img1_red{ext}", "rb") as fh:
        assert fh.read(3) == b"\xff\xd8\xff"
    img = images.load_image(str(tmp_path), "img1")
    assert img.shape == (64, 96, 4)
    for k, ch in enumerate(CHANNELS):
        # lossy: quality 95 on a smooth image stays within ~1 grey level on average
        assert np.abs(img[..., k].astype(int) - planes[ch]).mean() < 1.5


def _rgb_planes(h=64, w=80):
    """Three clearly different planes (R, G, B) so a wrong plane choice is obvious."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = (xx * 255 // (w - 1)).astype(np.uint8)  # horizontal ramp
    g = (yy * 255 // (h - 1)).astype(np.uint8)  # vertical ramp
    b = (((yy // 8 + xx // 8) % 2) * 200 + 20).astype(np.uint8)  # checkerboard
    return r, g, b


def _which_plane(got: np.ndarray, planes) -> int:
    err = [np.abs(got.astype(int) - p.astype(int)).mean() for p in planes]
    return int(np.argmin(err))


@pytest.mark.parametrize("fmt", ["png", "jpeg_named_png", "tif"])
def test_colour_file_gives_the_plane_of_its_channel(tmp_path, fmt):
    r, g, b = _rgb_planes()
    rgb = np.dstack([r, g, b])
    expected = {"red": 0, "green": 1, "blue": 2, "yellow": 0}  # yellow = R, documented
    for ch in CHANNELS:
        path = tmp_path / f"img1_{ch}.{'tif' if fmt == 'tif' else 'png'}"
        if fmt == "png":
            _write_png(path, rgb[..., ::-1])  # OpenCV writes BGR
        elif fmt == "jpeg_named_png":
            _write_jpeg(path, rgb[..., ::-1], quality=98)
        else:
            tifffile.imwrite(str(path), rgb)  # TIFF stores RGB
    img = images.load_image(str(tmp_path), "img1")
    for k, ch in enumerate(CHANNELS):
        assert _which_plane(img[..., k], (r, g, b)) == expected[ch], ch
        if fmt != "jpeg_named_png":
            np.testing.assert_array_equal(img[..., k], (r, g, b)[expected[ch]])


def test_rgba_png_and_grey_saved_as_rgb(tmp_path):
    r, g, b = _rgb_planes(20, 24)
    alpha = np.full_like(r, 255)
    _write_png(tmp_path / "a_green.png", np.dstack([b, g, r, alpha]))  # BGRA
    np.testing.assert_array_equal(images.load_channel(str(tmp_path / "a_green.png")), g)
    # equal planes: the channel does not matter, not even an unknown one
    _write_png(tmp_path / "plain.png", np.dstack([g, g, g]))
    np.testing.assert_array_equal(images.load_channel(str(tmp_path / "plain.png")), g)


def test_colour_file_without_a_channel_is_an_error(tmp_path):
    r, g, b = _rgb_planes(16, 16)
    _write_png(tmp_path / "picture.png", np.dstack([b, g, r]))
    with pytest.raises(ImageLoadError, match="picture.png.*colour"):
        images.load_channel(str(tmp_path / "picture.png"))
    np.testing.assert_array_equal(images.load_channel(str(tmp_path / "picture.png"), channel="green"), g)


def test_extension_order(tmp_path):
    a = _grey(10, 12, 1)
    _write_tif(tmp_path / "i_red.tif.gz", a, gz=True)
    assert images.channel_path(str(tmp_path), "i", "red").endswith("i_red.tif.gz")
    _write_jpeg(tmp_path / "i_red.jpg", a)
    assert images.channel_path(str(tmp_path), "i", "red").endswith("i_red.tif.gz")  # .tif.gz before .jpg
    _write_png(tmp_path / "i_red.png", a)
    assert images.channel_path(str(tmp_path), "i", "red") == os.path.join(str(tmp_path), "i_red.png")
    assert images.EXTENSIONS == (".png", ".tif", ".tiff", ".tif.gz", ".jpg", ".jpeg")


# ------------------------------------------------------------------------------ errors
def test_missing_channel_names_id_and_file(tmp_path):
    _four(tmp_path, image_id="abc")
    os.remove(tmp_path / "abc_yellow.png")
    with pytest.raises(ImageLoadError) as err:
        images.load_image(str(tmp_path), "abc")
    msg = str(err.value)
    assert "abc" in msg and "abc_yellow.png" in msg and "yellow" in msg
    assert err.value.image_id == "abc"
    with pytest.raises(ImageLoadError, match="abc_yellow"):
        images.channel_path(str(tmp_path), "abc", "yellow")


def test_missing_folder(tmp_path):
    with pytest.raises(ImageLoadError, match="abc_red.png"):
        images.load_image(str(tmp_path / "nope"), "abc")


@pytest.mark.parametrize(
    "content,what",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not a PNG, JPEG or TIFF"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt or truncated PNG"),
        (gzip.compress(b"hello", mtime=0), "gzip file does not hold"),
        (b"\x1f\x8b\x08\x00broken", "corrupt gzip"),
        (b"II*\x00" + b"\x00" * 20, "unreadable TIFF"),
    ],
    # ids from the expected message: the bytes' repr is unreadable and, for a
    # gzip header, would carry a timestamp that differs between xdist workers
    ids=lambda v: v.replace(" ", "-") if isinstance(v, str) else "bytes",
)
def test_corrupt_file_names_id_and_file(tmp_path, content, what):
    _four(tmp_path, image_id="xyz")
    with open(tmp_path / "xyz_green.png", "wb") as fh:
        fh.write(content)
    with pytest.raises(ImageLoadError) as err:
        images.load_image(str(tmp_path), "xyz")
    msg = str(err.value)
    assert "xyz" in msg and "xyz_green.png" in msg and what in msg, msg
    assert err.value.path.endswith("xyz_green.png")


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_truncated_file(tmp_path, kind):
    _four(tmp_path, image_id="t1", h=64, w=64)
    path = tmp_path / "t1_blue.png"
    if kind == "jpeg":
        _write_jpeg(path, _grey(64, 64, 3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=f"t1.*t1_blue.png.*truncated {kind.upper()}"):
        images.load_image(str(tmp_path), "t1")


def test_channels_of_different_sizes(tmp_path):
    _four(tmp_path, image_id="s1", h=40, w=56)
    _write_png(tmp_path / "s1_blue.png", _grey(40, 57, 9))
    with pytest.raises(ImageLoadError) as err:
        images.load_image(str(tmp_path), "s1")
    msg = str(err.value)
    assert "s1" in msg and "s1_blue.png" in msg and "40x57" in msg and "40x56" in msg


@pytest.mark.parametrize("bad", ["../img1", "a/b", "a\\b", "..", "", " ", "/etc/passwd", "img\x00", "x..y"])
def test_ids_that_leave_the_folder_are_rejected(tmp_path, bad):
    # a real image one level up, which a traversing ID would reach
    inner = tmp_path / "data"
    inner.mkdir()
    _four(tmp_path, image_id="img1")
    with pytest.raises(ImageLoadError, match="invalid image ID"):
        images.load_image(str(inner), bad)
    with pytest.raises(ImageLoadError, match="invalid image ID"):
        images.channel_path(str(inner), bad, "red")


def test_unknown_channel(tmp_path):
    _four(tmp_path)
    with pytest.raises(ValueError, match="unknown channel 'purple'"):
        images.load_image(str(tmp_path), "img1", channels=("red", "purple"))


# ------------------------------------------------------------------------------ composite
def test_composite_rgb():
    img = np.zeros((2, 3, 4), np.uint8)
    img[0, 0] = (100, 50, 30, 200)  # R + Y/2, G + Y/2, B
    img[0, 1] = (250, 240, 7, 255)  # clipped at 255
    img[1, 2] = (0, 0, 0, 1)  # Y/2 rounds down
    out = images.composite_rgb(img)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (200, 150, 30)
    assert tuple(out[0, 1]) == (255, 255, 7)
    assert tuple(out[1, 2]) == (0, 0, 0)
    assert tuple(out[1, 0]) == (0, 0, 0)
    with pytest.raises(ValueError, match="HxWx4"):
        images.composite_rgb(np.zeros((4, 4, 3), np.uint8))


# ------------------------------------------------------------------------------ real HPA files
def test_real_hpa_image_loads(shared_data):
    src = str(shared_data / "hpa_images")
    img = images.load_image(src, "57_F11_1")
    assert img.shape == (1728, 1728, 4) and img.dtype == np.uint8
    for k, ch in enumerate(CHANNELS):
        ref = cv2.imread(os.path.join(src, f"57_F11_1_{ch}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(img[..., k], ref)
    rgb = images.composite_rgb(img)
    assert rgb.shape == (1728, 1728, 3) and rgb.max() == 255


def test_real_jpeg_named_png_matches_the_pngs(shared_data):
    src = str(shared_data / "hpa_images")
    png = images.load_image(src, "57_F11_1").astype(np.float64)
    jpg = images.load_image(os.path.join(src, "jpeg_named_png"), "57_F11_1").astype(np.float64)
    assert jpg.shape == png.shape
    for k, ch in enumerate(CHANNELS):
        diff = np.abs(jpg[..., k] - png[..., k]).mean()
        corr = np.corrcoef(jpg[..., k].ravel(), png[..., k].ravel())[0, 1]
        # measured: mean |diff| 0.59 / 0.42 / 0.28 / 0.11 grey levels, correlation >= 0.9994;
        # any other plane gives a mean |diff| of 19-30 and a correlation below 0.75
        assert diff < 1.0 and corr > 0.999, (ch, diff, corr)


def test_real_16bit_forms_agree(shared_data):
    src = shared_data / "hpa_images"
    tif = images.read_channel_raw(str(src / "383_D2_1_blue.tif.gz"))
    png16 = images.read_channel_raw(str(src / "383_D2_1_blue_uint16.png"))
    assert tif.dtype == np.uint16 and tif.shape == (2048, 2048)
    np.testing.assert_array_equal(tif, png16)
    a = images.load_channel(str(src / "383_D2_1_blue.tif.gz"))
    b = images.load_channel(str(src / "383_D2_1_blue_uint16.png"))
    c = images.load_channel(str(src / "383_D2_1_blue.png"))  # HPA's own 8-bit export
    np.testing.assert_array_equal(a, b)
    assert a.max() == 255 and tif.max() == 65535
    # measured: the rule reproduces HPA's 8-bit export exactly (0 of 4,194,304 pixels differ);
    # `v >> 8` would differ in 9 % of pixels
    assert np.count_nonzero(a != c) == 0
    assert np.count_nonzero((tif >> 8).astype(np.uint8) != c) > 0


def test_real_16bit_green(shared_data):
    path = str(shared_data / "hpa_images" / "1000_A12_2_green.png")
    raw = images.read_channel_raw(path)
    assert raw.dtype == np.uint16 and raw.max() == 65089
    out = images.load_channel(path)
    assert out.dtype == np.uint8 and out.shape == (2048, 2048)
    np.testing.assert_array_equal(out, np.ceil(raw / 257.0).astype(np.uint8))
    assert out.max() == 254  # ceil(65089 / 257)


# ------------------------------------------------------------------------------ gs:// (real emulator)
def test_load_from_gcs_matches_local(tmp_path, gcs_bucket):
    from common import storage

    planes = {
        "red": _grey(30, 44, 0),
        "green": _grey(30, 44, 1, np.uint16),
        "blue": _grey(30, 44, 2, np.uint16),
        "yellow": _grey(30, 44, 3),
    }
    _write_png(tmp_path / "g1_red.png", planes["red"])
    _write_png(tmp_path / "g1_green.png", planes["green"])
    _write_tif(tmp_path / "g1_blue.tif.gz", planes["blue"], gz=True)
    _write_jpeg(tmp_path / "g1_yellow.png", planes["yellow"])
    _write_png(tmp_path / "g1_blue_old.png", planes["red"])  # shares the prefix, must not be picked
    prefix = f"gs://{gcs_bucket}/data/imgs"
    for p in sorted(tmp_path.iterdir()):
        storage.put_file(str(p), storage.join(prefix, p.name))
    assert images.channel_path(prefix, "g1", "blue") == f"{prefix}/g1_blue.tif.gz"
    remote = images.load_image(prefix, "g1")
    local = images.load_image(str(tmp_path), "g1")
    np.testing.assert_array_equal(remote, local)
    np.testing.assert_array_equal(remote[..., 2], images.to_uint8(planes["blue"]))
    with pytest.raises(ImageLoadError, match="g2.*g2_red.png"):
        images.load_image(prefix, "g2")
    with pytest.raises(ImageLoadError, match="invalid image ID"):
        images.load_image(prefix, "../imgs/g1")


@pytest.mark.parametrize("writer,ext", [(_write_png, ".png"), (lambda p, a: _write_tif(p, a, gz=True), ".tif.gz")])
def test_image_size_from_a_header_or_one_channel(tmp_path, writer, ext):
    _four(tmp_path, "img1", h=40, w=56, writer=writer, ext=ext)
    assert images.image_size(str(tmp_path), "img1") == (56, 40)  # (width, height)
    if ext == ".png":  # a PNG's header is enough: its pixels are not decoded
        red = tmp_path / "img1_red.png"
        red.write_bytes(red.read_bytes()[:24])
        assert images.image_size(str(tmp_path), "img1") == (56, 40)
    # a missing or corrupt first channel: the next one that reads gives the size
    os.remove(tmp_path / f"img1_red{ext}")
    (tmp_path / f"img1_green{ext}").write_bytes(b"\x00not an image")
    assert images.image_size(str(tmp_path), "img1") == (56, 40)
    with pytest.raises(ImageLoadError, match="no channel file gives its size"):
        images.image_size(str(tmp_path), "absent")
