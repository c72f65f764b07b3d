"""Decode one sprite file into a square RGB uint8 array on a white canvas.

Accepted formats: PNG, GIF, JPEG, WebP, BMP (decided by content, not extension).
Animations: the first frame. Modes: palette (with transparency), 1, L, LA, RGB, RGBA,
CMYK, 16-bit grayscale (I;16*, I) and the rest Pillow can convert to RGBA. Alpha is
composited on white *before* resizing (no dark fringes). Larger than the target:
downscaled keeping aspect with area averaging (no ringing on hard sprite edges).
Smaller: centred on a white canvas. Pillow's decompression-bomb limit stays on, and a
pixel cap far below it rejects absurd declared dimensions before any decoding.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "GIF", "JPEG", "WEBP", "BMP")
# A sprite is ~96x96 (the canvas at most 512x512). The cap is on the pixels a header declares,
# checked before anything is decoded, so a tiny file that declares a huge canvas costs only its
# header: at 1024x1024 the worst case (a flat RGBA PNG of 4 KB) decodes in about 35 ms.
MAX_PIXELS = 1024 * 1024

# Signatures: a file that starts like an image but cannot be identified is a damaged image
# ("corrupt", e.g. a bad header checksum), not some other kind of file ("not_image").
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"\xff\xd8\xff")

# Why a file was skipped (counted in metrics/data.json).
EMPTY, NOT_IMAGE, CORRUPT, TOO_LARGE, UNSUPPORTED = "empty", "not_image", "corrupt", "too_large", "unsupported_mode"
SKIP_REASONS = (EMPTY, NOT_IMAGE, CORRUPT, TOO_LARGE, UNSUPPORTED)


@dataclass
class Decoded:
    pixels: np.ndarray | None  # (size, size, 3) uint8, or None if skipped
    reason: str | None = None  # one of SKIP_REASONS when skipped
    detail: str = ""
    orig_size: tuple[int, int] = (0, 0)
    orig_mode: str = ""
    frames: int = 1


def _to_rgba(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grayscale
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 16-bit -> 8-bit
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGBA")
    try:
        return img.convert("RGBA")  # palette transparency, LA, CMYK, 1, ... all handled by Pillow
    except ValueError:
        raise ValueError(f"image mode {mode} cannot be converted to RGBA") from None


def to_canvas(img: Image.Image, size: int) -> np.ndarray:
    """RGBA image -> (size, size, 3) uint8: composite on white, fit, centre."""
    rgba = _to_rgba(img)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    w, h = rgb.size
    if w > size or h > size:
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        rgb = rgb.resize((nw, nh), Image.Resampling.BOX)
        w, h = nw, nh
    if (w, h) != (size, size):
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(rgb, ((size - w) // 2, (size - h) // 2))
        rgb = canvas
    return np.asarray(rgb, dtype=np.uint8)


def decode(data: bytes, size: int) -> Decoded:
    """Decode image bytes into a (size, size, 3) uint8 array, or say why not."""
    if not data:
        return Decoded(None, EMPTY, "zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
                return Decoded(None, CORRUPT, "an image signature, but its header cannot be read")
            return Decoded(None, NOT_IMAGE, "not a PNG/GIF/JPEG/WebP/BMP image")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return Decoded(None, TOO_LARGE, str(e))
        except Exception as e:  # broken headers raise all sorts of errors
            return Decoded(None, CORRUPT, f"{type(e).__name__}: {e}")
        w, h = img.size
        info = dict(orig_size=img.size, orig_mode=img.mode)
        if w < 1 or h < 1:
            return Decoded(None, EMPTY, f"{w}x{h} pixels", **info)
        if w * h > MAX_PIXELS:
            return Decoded(None, TOO_LARGE, f"{w}x{h} pixels exceeds {MAX_PIXELS} (not a sprite)", **info)
        try:
            info["frames"] = getattr(img, "n_frames", 1)  # counting frames reads the file: after the cap
        except Exception as e:
            return Decoded(None, CORRUPT, f"{type(e).__name__}: {e}", **info)
        try:
            img.seek(0)
            img.load()
            pixels = to_canvas(img, size)
        except ValueError as e:
            if "image mode" in str(e):
                return Decoded(None, UNSUPPORTED, str(e), **info)
            return Decoded(None, CORRUPT, f"{type(e).__name__}: {e}", **info)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return Decoded(None, TOO_LARGE, str(e), **info)
        except Exception as e:  # truncated data, bad CRC, bad palette, ...
            return Decoded(None, CORRUPT, f"{type(e).__name__}: {e}", **info)
    return Decoded(pixels, None, "", **info)


def image_grid(images: np.ndarray, ncol: int = 8, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one (rows*H', ncol*W', 3) grid image.

    Plain numpy, so data stages need not import torch (torchvision.utils.make_grid takes
    ~4 s to import here for the same result).
    """
    n, h, w, c = images.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = im
    return grid


def png_bytes(pixels: np.ndarray | Image.Image, compress_level: int = 6) -> bytes:
    """(H, W, 3) uint8 pixels, or a PIL image of any mode, -> PNG file bytes (zlib level 6, PIL's
    default; 1 is several times faster for images nobody keeps)."""
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


# A pixel is the sprite's (foreground) where its darkest channel is below this: the background is
# white (255) and noise a sampler leaves near white stays above it.
FOREGROUND_BELOW = 240


def reduce_colours(
    images: np.ndarray, colours: int, iterations: int = 10, vote: bool = True, merge: float = 0.0
) -> np.ndarray:
    """Each (N, H, W, 3) uint8 sprite repainted in at most `colours` flat colours. Per sprite,
    k-means over its foreground pixels' RGB (started from the means of `colours` equal bands of
    brightness, so the result is deterministic); with `merge` > 0, colours closer than `merge`
    levels (RGB distance) are then joined, nearest first, so a sprite keeps as many colours as
    it has; with `vote`, one 3x3 majority vote over the colour labels (a foreground pixel takes
    the colour most of its neighbourhood carries; ties keep its own: it removes specks and also
    one-pixel lines); the background becomes pure white. As a filter after sampling the sprites
    change: figures of filtered samples are not the model's own."""
    if colours < 1:
        raise ValueError(f"colours = {colours}: give at least 1")
    out = np.full_like(images, 255)
    for i, im in enumerate(images):
        fg = im.min(axis=2) < FOREGROUND_BELOW
        if not fg.any():
            continue
        px = im[fg].astype(np.float64)
        order = np.argsort(px @ np.array([0.299, 0.587, 0.114]), kind="stable")
        centres = np.stack([px[band].mean(axis=0) for band in np.array_split(order, min(colours, len(px)))])
        label, centres = _kmeans(px, centres, iterations)
        if merge > 0:
            label, centres = _merge_close(px, label, centres, merge)
        if vote:
            labels = np.full(fg.shape, len(centres))  # the background's label is the last
            labels[fg] = label
            votes = _neighbourhood_votes(labels, len(centres) + 1)
            votes[labels, *np.indices(fg.shape)] += 0.5  # a tie keeps the pixel's own colour
            label = votes[: len(centres)].argmax(axis=0)[fg]  # foreground pixels stay foreground
        out[i][fg] = np.clip(np.rint(centres[label]), 0, 255).astype(np.uint8)
    return out


def _kmeans(px: np.ndarray, centres: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """(label of each pixel, centres) after `iterations` Lloyd steps from `centres`."""
    for _ in range(iterations):
        label = ((px[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        sums = np.zeros_like(centres)
        np.add.at(sums, label, px)
        counts = np.bincount(label, minlength=len(centres))[:, None]
        centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
    return ((px[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1), centres


def _merge_close(px: np.ndarray, label: np.ndarray, centres: np.ndarray, merge: float):
    """Join the two nearest used colours (their pixels' mean) while they are closer than `merge`."""
    used = np.unique(label)
    centres = np.stack([px[label == k].mean(axis=0) for k in used])
    label = np.searchsorted(used, label)
    while len(centres) > 1:
        d = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(axis=2)) + np.diag(np.full(len(centres), np.inf))
        a, b = np.unravel_index(np.argmin(d), d.shape)
        if d[a, b] >= merge:
            break
        a, b = min(a, b), max(a, b)
        label = np.where(label == b, a, label)
        label = np.where(label > b, label - 1, label)
        centres = np.delete(centres, b, axis=0)
        centres[a] = px[label == a].mean(axis=0)
    return label, centres


def _neighbourhood_votes(labels: np.ndarray, n: int) -> np.ndarray:
    """(n, H, W): how many pixels of each 3x3 neighbourhood carry each label (edges padded with
    the nearest pixel)."""
    onehot = (labels[None] == np.arange(n)[:, None, None]).astype(np.float64)
    padded = np.pad(onehot, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = labels.shape
    return sum(padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
