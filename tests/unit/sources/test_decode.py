"""decode_image over every format and mode we expect to meet, all generated here."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sam3ray.core.errors import DecodeError
from sam3ray.sources.images import decode_image
from sam3ray.storage.location import Location
from tests.support.images import encode

LIMIT = 178_956_970
RED, BLUE = (255, 0, 0), (0, 0, 255)


def pattern(h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def check(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.shape == (h, w, 3)
    assert arr.dtype == np.uint8
    assert arr.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize(
    "fmt,kw", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})]
)
def test_lossless_formats_roundtrip_exactly(fmt, kw):
    src = pattern()
    out = decode_image(encode(Image.fromarray(src), fmt, **kw), max_pixels=LIMIT)
    check(out, 24, 32)
    np.testing.assert_array_equal(out, src)


def test_jpeg_decodes_close_to_source():
    src = np.zeros((32, 48, 3), np.uint8)
    src[:, :24] = RED
    out = decode_image(encode(Image.fromarray(src), "JPEG", quality=95), max_pixels=LIMIT)
    check(out, 32, 48)
    assert np.abs(out[4:28, 4:20].astype(int) - RED).max() < 8
    assert out[4:28, 30:44].max() < 8


def test_exif_orientation_6_rotates_clockwise():
    # Stored 40 wide x 20 tall, red band on top; orientation 6 = rotate 90° CW to view.
    src = np.zeros((20, 40, 3), np.uint8)
    src[:] = BLUE
    src[:6] = RED
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(src), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, max_pixels=LIMIT)
    check(out, 40, 20)  # width and height swapped
    assert np.abs(out[5:35, -3:].astype(int) - RED).max() < 30  # top band -> right side
    assert np.abs(out[5:35, :8].astype(int) - BLUE).max() < 30
    expected = np.rot90(src, k=-1)
    assert np.abs(out.astype(int) - expected).mean() < 6


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 12), c) for c in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data, max_pixels=LIMIT)
    check(out, 12, 16)
    assert (out == RED).all()


def test_grayscale_becomes_three_equal_channels():
    out = decode_image(encode(Image.new("L", (5, 4), 100), "PNG"), max_pixels=LIMIT)
    check(out, 4, 5)
    assert (out == 100).all()


def test_cmyk_jpeg_converts_to_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, max_pixels=LIMIT)
    check(out, 16, 16)
    assert np.abs(out.astype(int) - RED).max() < 10


def test_16bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, max_pixels=LIMIT)
    check(out, 1, 5)
    assert out[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_float_tiff_in_unit_range_scales_to_255():
    data = encode(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F"), "TIFF")
    assert decode_image(data, max_pixels=LIMIT)[0, :, 1].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-10, 50_000, 200_000]], np.int32), mode="I")
    assert decode_image(encode(wide, "TIFF"), max_pixels=LIMIT)[0, :, 0].tolist() == [0, 64, 255]


def test_palette_png_with_transparency():
    im = Image.new("P", (4, 2), 0)
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putpixel((1, 0), 1)
    im.putpixel((2, 1), 2)
    data = encode(im, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    out = decode_image(data, max_pixels=LIMIT)
    check(out, 2, 4)
    assert tuple(out[0, 1]) == RED and tuple(out[1, 2]) == BLUE
    assert tuple(out[0, 0]) == (0, 0, 0)  # transparent: alpha dropped, stored colour kept


def test_rgba_and_la_drop_alpha():
    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    assert tuple(decode_image(encode(rgba, "PNG"), max_pixels=LIMIT)[1, 1]) == (10, 20, 30)
    la = Image.new("LA", (3, 3), (77, 128))
    assert tuple(decode_image(encode(la, "PNG"), max_pixels=LIMIT)[0, 0]) == (77, 77, 77)


def test_one_by_one_and_extreme_aspect():
    check(decode_image(encode(Image.new("RGB", (1, 1), RED), "PNG"), max_pixels=LIMIT), 1, 1)
    long = decode_image(encode(Image.new("RGB", (20000, 20), BLUE), "PNG"), max_pixels=LIMIT)
    check(long, 20, 20000)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header but has no pixel data (a bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DecodeError) as err:
        decode_image(png_header_only(30000, 30000), max_pixels=LIMIT)
    assert err.value.reason == "too_large"
    assert "30000x30000" in str(err.value)
    assert before == Image.MAX_IMAGE_PIXELS  # Pillow's global limit is restored
    with pytest.raises(DecodeError) as err:
        decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=9999)
    assert err.value.reason == "too_large"


def test_limit_above_pillows_own_is_honoured():
    # 200x200 against a Pillow limit of 1000 (x2): only our max_pixels decides.
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        data = encode(Image.new("RGB", (200, 200), RED), "TIFF")
        check(decode_image(data, max_pixels=LIMIT), 200, 200)
    finally:
        Image.MAX_IMAGE_PIXELS = before


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"<html><body>503 Slow Down</body></html>", "not_an_image"),
        (np.random.default_rng(2).bytes(4096), "not_an_image"),
        (encode(Image.new("RGB", (8, 8)), "ICO"), "unsupported"),
    ],
    ids=["empty", "html", "random", "ico"],
)
def test_bad_inputs_give_reasons(data, reason):
    with pytest.raises(DecodeError) as err:
        decode_image(data, max_pixels=LIMIT)
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError) and err.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files(fmt):
    data = encode(Image.fromarray(pattern(64, 64)), fmt)
    for cut in (len(data) // 2, len(data) - 40):  # a PNG cut only in IEND keeps all pixels
        with pytest.raises(DecodeError) as err:
            decode_image(data[:cut], max_pixels=LIMIT)
        assert err.value.reason == "truncated", (cut, err.value)


def test_misnamed_files_read_from_disk(tmp_path):
    (tmp_path / "random.jpg").write_bytes(np.random.default_rng(3).bytes(2048))
    (tmp_path / "text.png").write_text("just some text\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    expected = {"random.jpg": "not_an_image", "text.png": "not_an_image", "empty.jpg": "empty"}
    for name, reason in expected.items():
        with pytest.raises(DecodeError) as err:
            decode_image(Location(str(tmp_path / name)).read_bytes(), max_pixels=LIMIT)
        assert err.value.reason == reason
