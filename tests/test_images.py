import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.helpers import image_bytes, solid
from vdm.core import images
from vdm.core.images import decode, image_grid

WHITE = (255, 255, 255)


def centre(pixels):
    return tuple(int(v) for v in pixels[48, 48])


def ok(data, size=96):
    d = decode(data, size)
    assert d.reason is None, d.detail
    assert d.pixels.shape == (size, size, 3) and d.pixels.dtype == np.uint8
    return d.pixels


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "JPEG", "WEBP", "BMP"])
def test_each_accepted_format_decodes(fmt):
    img = solid((200, 30, 30), (96, 96), "RGB")
    px = ok(image_bytes(img, fmt, **({"quality": 100} if fmt in ("JPEG", "WEBP") else {})))
    assert np.abs(px.astype(int) - [200, 30, 30]).max() <= 8  # lossy formats are close


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    img.putpixel((48, 48), (0, 0, 255, 255))
    img.putpixel((10, 10), (255, 0, 0, 128))  # half-transparent red over white -> pink
    px = ok(image_bytes(img))
    assert tuple(px[0, 0]) == WHITE and centre(px) == (0, 0, 255)
    assert tuple(int(v) for v in px[10, 10]) == (255, 127, 127)


def test_palette_with_transparent_index():
    img = Image.new("P", (96, 96), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((48, 48), 1)
    px = ok(image_bytes(img, "PNG", transparency=0))
    assert tuple(px[0, 0]) == WHITE and centre(px) == (255, 0, 0)


@pytest.mark.parametrize(
    "mode,colour,expected",
    [
        ("L", 100, (100, 100, 100)),
        ("LA", (100, 255), (100, 100, 100)),
        ("1", 1, WHITE),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_other_modes(mode, colour, expected):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    px = ok(image_bytes(Image.new(mode, (96, 96), colour), fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    assert np.abs(np.array(centre(px)) - expected).max() <= 3


def test_16_bit_grayscale_is_scaled_not_clipped():
    arr = np.full((96, 96), 65535, dtype=np.uint16)
    arr[48, 48] = 257 * 100
    img = Image.fromarray(arr)  # uint16 -> a 16-bit grayscale image
    data = image_bytes(img)
    assert decode(data, 96).orig_mode.startswith("I")  # really stored as 16-bit
    px = ok(data)
    assert tuple(px[0, 0]) == WHITE and centre(px) == (100, 100, 100)


def test_animated_gif_uses_the_first_frame():
    frames = [solid(c, (96, 96), "RGB") for c in [(255, 0, 0), (0, 0, 255)]]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    d = decode(data, 96)
    assert d.frames == 2 and centre(d.pixels) == (255, 0, 0)


def test_larger_image_is_downscaled_keeping_aspect_and_centred():
    px = ok(image_bytes(solid((0, 128, 0, 255), (192, 96))))  # 2:1 -> 96x48 band
    column = px[:, 48]
    green_rows = np.flatnonzero((column == [0, 128, 0]).all(axis=1))
    assert green_rows.min() == 24 and green_rows.max() == 71
    assert tuple(px[0, 48]) == WHITE and tuple(px[95, 48]) == WHITE


def test_smaller_image_is_centred_on_white():
    px = ok(image_bytes(solid((0, 0, 0, 255), (20, 10))))
    ys, xs = np.nonzero((px == 0).all(axis=2))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (43, 52, 38, 57)
    assert (px == 255).all(axis=2).sum() == 96 * 96 - 200


def test_other_target_size():
    assert decode(image_bytes(solid((1, 2, 3, 255), (96, 96))), 32).pixels.shape == (32, 32, 3)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", images.EMPTY),
        (b"this is a text file named sprite.png\n", images.NOT_IMAGE),
        (image_bytes(solid((0, 0, 0, 255), (96, 96)))[:60], images.CORRUPT),  # truncated PNG
        (_png_header(100_000, 100_000), images.TOO_LARGE),  # huge declared size: no allocation
        (_png_header(5000, 5000), images.TOO_LARGE),  # over our sprite cap, under Pillow's bomb limit
        (image_bytes(solid((0, 0, 0), (8, 8), "RGB"), "TIFF"), images.NOT_IMAGE),  # format not accepted
    ],
)
def test_bad_files_are_skipped_with_a_reason(data, reason):
    d = decode(data, 96)
    assert d.pixels is None and d.reason == reason, d.detail


def test_corrupt_bytes_inside_a_png_are_caught():
    data = bytearray(image_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), np.uint8))))
    data[200:260] = bytes(60)  # smash compressed data
    assert decode(bytes(data), 96).reason == images.CORRUPT


def test_image_grid_tiles_in_order():
    ims = np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(5)])
    g = image_grid(ims, ncol=3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert g[1, 1, 0] == 0 and g[1, 6, 0] == 1 and g[6, 1, 0] == 3 and g[6, 6, 0] == 4 and g[6, 11, 0] == 255


@pytest.mark.parametrize("side", [1025, 4096])
def test_a_small_file_declaring_a_large_canvas_is_refused_before_decoding(side, monkeypatch):
    buf = io.BytesIO()
    Image.new("P", (side, side)).save(buf, "PNG")  # a few KB that would decode to side^2 pixels
    assert len(buf.getvalue()) < 10_000

    def never(*a, **k):
        raise AssertionError("decoded a file over the pixel cap")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)  # what decoding the pixels would call
    monkeypatch.setattr(images, "to_canvas", never)
    d = decode(buf.getvalue(), 96)
    assert d.reason == images.TOO_LARGE and f"{side}x{side}" in d.detail


def test_the_largest_allowed_canvas_still_decodes():
    buf = io.BytesIO()
    Image.new("RGBA", (1024, 1024), (0, 0, 0, 255)).save(buf, "PNG")
    d = decode(buf.getvalue(), 96)
    assert d.reason is None and d.pixels.shape == (96, 96, 3) and d.pixels.max() == 0
