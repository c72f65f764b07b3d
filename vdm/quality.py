"""Sample quality without network weights: multi-scale sliced Wasserstein distance, graininess,
whole-sprite structure (parts and palette), and the lossless-codec yardstick for bits/dim.

Sliced Wasserstein distance (SWD), as defined for Progressive GAN (Karras et al. 2018, sec. 5):

1. Each image (float, NCHW) becomes a Laplacian pyramid built with the 5x5 binomial kernel
   ([1, 4, 6, 4, 1] / 16, outer product, mirrored edges): level i is G_i - up(G_{i+1}) where
   G_{i+1} = down(G_i); the coarsest level is the Gaussian itself. Levels run from the full
   size down while the side is at least 16 (96, 48, 24 for 96x96 sprites).
2. From every image, at every level, 128 random 7x7x3 patches (centres at least 3 pixels from
   the edge) are flattened into 147-d descriptors. Both sets use the same patch positions
   (image k of one set and image k of the other): common random numbers, so identical sets
   are exactly 0 apart and less of the figure's noise comes from the patch draw.
3. Each set of descriptors (one level, one image set) is normalised by its own per-channel
   mean and standard deviation, so the distance compares local structure, not global colour.
4. The distance between two equal-sized sets: for 4 repeats of 128 random unit directions, sort
   both sets' projections and take the mean absolute difference; averaged and times 1000.

Lower is better; 0 for identical sets. Its scale depends on the sample count and the data, so
it is always reported beside the real-vs-real floor: as many training images as samples
against the test split. The uncertainty is a bootstrap: every repeat resamples both image sets
with replacement (the floor: a fresh subset of the training split) and draws fresh patches and
directions, and the spread of the repeats is the figure's standard error.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PATCH = 7
PATCHES_PER_IMAGE = 128
DIR_REPEATS = 4
DIRS_PER_REPEAT = 128
MIN_SIDE = 16

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16.0
KERNEL = torch.outer(_BINOMIAL, _BINOMIAL)  # 5x5, sums to 1 (float64; cast to the images' dtype)


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """5x5 binomial filter of each channel, mirrored edges (d c b | a b c d | c b a)."""
    c = x.shape[1]
    k = (KERNEL * gain).to(x.dtype).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=c)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _blur(up, gain=4.0)  # zeros carry no mass: x4 keeps the mean


def pyramid_sides(size: int) -> list[int]:
    """Sides of the pyramid's levels: from `size`, halving while at least 16 (an image smaller
    than that: one level, the image itself)."""
    sides = []
    while size >= MIN_SIDE:
        sides.append(size)
        if size % 2:
            break
        size //= 2
    return sides or [size]


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[L_0, ..., L_{levels-2}, G_{levels-1}] for (N, C, H, W) float images."""
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(pyr_down(gauss[-1]))
    return [g - pyr_up(nxt) for g, nxt in zip(gauss, gauss[1:], strict=False)] + [gauss[-1]]


def patch_positions(n: int, side: int, per_image: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (ys, xs), each (n, per_image), of random 7x7 patches inside a side x side level."""
    half = PATCH // 2
    ys = torch.randint(half, side - half, (n, per_image), generator=gen)
    xs = torch.randint(half, side - half, (n, per_image), generator=gen)
    return ys, xs


def patch_descriptors(level: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """(N * P, C, 7, 7) patches of a pyramid level (N, C, H, W) centred at (ys, xs), each (N, P)."""
    n, c = level.shape[:2]
    off = torch.arange(-(PATCH // 2), PATCH // 2 + 1)
    rows = (ys[..., None] + off)[..., :, None]  # (n, p, 7, 1)
    cols = (xs[..., None] + off)[..., None, :]  # (n, p, 1, 7)
    img = torch.arange(n)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[img, rows, cols]  # (n, p, 7, 7, c)
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, c, PATCH, PATCH)


def normalise(desc: torch.Tensor) -> torch.Tensor:
    """Per-channel zero mean and unit std over the whole set, then flattened to (M, 147)."""
    mean = desc.mean(dim=(0, 2, 3), keepdim=True)
    std = desc.std(dim=(0, 2, 3), keepdim=True, correction=0).clamp_min(1e-12)
    return ((desc - mean) / std).flatten(1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, gen: torch.Generator) -> float:
    """Mean |sorted projection difference| of two (M, D) sets over DIR_REPEATS x DIRS_PER_REPEAT
    random unit directions."""
    if a.shape != b.shape:
        raise ValueError(f"descriptor sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    # all repeats at once: every repeat has the same number of directions, so the mean over
    # repeats of the per-repeat means is the mean over all of them
    dirs = torch.randn(a.shape[1], DIR_REPEATS * DIRS_PER_REPEAT, generator=gen, dtype=a.dtype)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    # numpy's sort along contiguous rows is ~20x faster than torch.sort along dim 0 on a CPU
    pa = np.sort((a @ dirs).T.contiguous().numpy(), axis=1)
    pb = np.sort((b @ dirs).T.contiguous().numpy(), axis=1)
    return float(np.abs(pa - pb).mean(dtype=np.float64))


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def swd_once(a: np.ndarray, b: np.ndarray, gen: torch.Generator) -> list[float]:
    """SWD x 1000 per pyramid level between two equal-sized (N, H, W, 3) uint8 image sets."""
    if len(a) != len(b):
        raise ValueError(f"image sets differ in size: {len(a)} vs {len(b)}")
    levels = len(pyramid_sides(a.shape[1]))
    pa, pb = laplacian_pyramid(_nchw(a), levels), laplacian_pyramid(_nchw(b), levels)
    out = []
    for la, lb in zip(pa, pb, strict=True):
        ys, xs = patch_positions(len(a), la.shape[-1], PATCHES_PER_IMAGE, gen)  # the same for both sets
        da, db = normalise(patch_descriptors(la, ys, xs)), normalise(patch_descriptors(lb, ys, xs))
        out.append(1000.0 * sliced_wasserstein(da, db, gen))
    return out


def swd(images: np.ndarray, reference: np.ndarray, n: int, repeats: int, seed: int, subsets: bool = False) -> dict:
    """Bootstrap SWD: `repeats` times, n images drawn with replacement from each set (with
    subsets, n distinct images of `images`, a new subset each repeat: for a large set such as
    the training split, whose figure should not hang on one lucky or unlucky subset).

    Returns per-level and mean-over-levels figures: {"levels": [side, ...], "mean": [...],
    "se": [...], "avg": mean of the level average, "avg_se": its standard error, "per_repeat":
    the level average of each repeat}. With repeats = 1 there is no resampling (the first n
    images of each set) and se is 0. The same seed and n draw the same bootstrap indices, so
    two image sets scored with the same seed can be compared repeat by repeat (paired).
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(repeats):
        if repeats == 1:
            ia, ib = np.arange(min(n, len(images))), np.arange(min(n, len(reference)))
        else:
            if subsets:
                ia = torch.randperm(len(images), generator=gen)[:n].numpy()
            else:
                ia = torch.randint(len(images), (n,), generator=gen).numpy()
            ib = torch.randint(len(reference), (n,), generator=gen).numpy()
        rows.append(swd_once(np.asarray(images[np.sort(ia)]), np.asarray(reference[np.sort(ib)]), gen))
    r = np.asarray(rows)  # (repeats, levels)
    avg = r.mean(axis=1)
    spread = (lambda v: float(np.std(v, ddof=1))) if repeats > 1 else (lambda v: 0.0)
    return {
        "levels": pyramid_sides(images.shape[1]),
        "mean": [float(v) for v in r.mean(axis=0)],
        "se": [spread(r[:, i]) for i in range(r.shape[1])],
        "avg": float(avg.mean()),
        "avg_se": spread(avg),
        "per_repeat": [float(v) for v in avg],
    }


def graininess(images: np.ndarray) -> float:
    """Mean absolute difference between horizontally and vertically neighbouring pixels, in levels."""
    x = np.asarray(images, dtype=np.int16)
    dx = np.abs(np.diff(x, axis=2))
    dy = np.abs(np.diff(x, axis=1))
    return float((dx.sum(dtype=np.int64) + dy.sum(dtype=np.int64)) / (dx.size + dy.size))


# A pixel is the sprite's (foreground) where its darkest channel is below this: the background is
# white (255) and noise a sampler leaves near white stays above it.
FOREGROUND_BELOW = 240
MIN_PART = 4  # pixels: smaller 8-connected specks are not parts
PALETTE_SHARE = 0.9  # the palette: the fewest colours (4 bits per channel) covering this share


def flat_share(colours: np.ndarray, fg: np.ndarray) -> float:
    """The share of foreground pixels whose four neighbours (up, down, left, right) all carry the
    same colour code as the pixel; `colours` is (H, W) int codes, `fg` (H, W) bool. A pixel on the
    image's edge lacks a neighbour and is never flat. 0 for an image without foreground."""
    if not fg.any():
        return 0.0
    c = colours[1:-1, 1:-1]
    same = (c == colours[:-2, 1:-1]) & (c == colours[2:, 1:-1]) & (c == colours[1:-1, :-2]) & (c == colours[1:-1, 2:])
    return float((same & fg[1:-1, 1:-1]).sum() / fg.sum())


def sprite_structure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, what the eye sees first in a sprite, which 7x7 patches cannot: `parts`, the
    8-connected pieces of the foreground of at least MIN_PART pixels (a sprite is one or a few;
    salt-and-pepper colour is many); `palette`, the fewest colours, at 4 bits per channel,
    that cover PALETTE_SHARE of its foreground (a sprite's flat regions use a handful); and
    `flatness`, the share of foreground pixels whose four neighbours carry the same colour at 4
    bits per channel (flat fills are most of a sprite; speckle leaves almost no pixel flat)."""
    from scipy import ndimage

    parts, palette, flatness = (np.zeros(len(images)) for _ in range(3))
    for k, im in enumerate(np.asarray(images)):
        fg = im.min(axis=2) < FOREGROUND_BELOW
        labels, _ = ndimage.label(fg, structure=np.ones((3, 3)))
        parts[k] = int((np.bincount(labels.ravel())[1:] >= MIN_PART).sum())
        codes = (im.astype(np.int32) >> 4) @ np.array([256, 16, 1], dtype=np.int32)  # (H, W) colour codes
        counts = np.sort(np.bincount(codes[fg]))[::-1]
        palette[k] = int(np.searchsorted(np.cumsum(counts), PALETTE_SHARE * counts.sum()) + 1) if fg.any() else 0
        flatness[k] = flat_share(codes, fg)
    return {"parts": parts, "palette": palette, "flatness": flatness}


def structure_summary(samples: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Mean and standard error of each sprite_structure figure, for the samples and the test split."""
    out = {}
    for suffix, images in (("", samples), ("_test", test)):
        for name, v in sprite_structure(images).items():
            out[f"{name}{suffix}"] = float(v.mean())
            out[f"{name}{suffix}_se"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return out


def codec_bits_per_subpixel(images: np.ndarray) -> dict[str, float]:
    """Size of each (H, W, 3) uint8 image under lossless codecs, in bits per subpixel (the
    unit of bits/dim): PNG (Pillow, optimize) and WebP lossless (Pillow, method 6, quality 100)."""
    total = {"png": 0, "webp_lossless": 0}
    for img in images:
        im = Image.fromarray(np.asarray(img), "RGB")
        for fmt, kwargs, key in (
            ("PNG", {"optimize": True}, "png"),
            ("WEBP", {"lossless": True, "method": 6, "quality": 100}, "webp_lossless"),
        ):
            buf = io.BytesIO()
            im.save(buf, format=fmt, **kwargs)
            total[key] += buf.tell()
    subpixels = max(1, int(np.prod(images.shape)))
    return {k: 8.0 * v / subpixels for k, v in total.items()}
