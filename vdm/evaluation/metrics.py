"""The metrics of samples: multi-scale sliced Wasserstein distance, graininess, whole-sprite
structure (parts, palette, flatness), FID/KID/IS (torch-fidelity), memorisation distances. The
evaluate stage's orchestration is vdm/evaluation/evaluate.py; the lossless-codec yardstick for
bits/dim, a figure of the data, is vdm/data/codecs.py.

The metrics of a sample set are a registry, SAMPLE_METRICS: name -> fn(SampleSets) -> {key:
value}, every key a field of metrics/eval.json. A new one is a function here with
`@sample_metric("name")` (or, for a figure of each image reported as its mean beside the test
split's, `@per_image_metric("name")`) and its test; evaluation iterates over the registry.

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

Inception weights: torch-fidelity downloads them from GitHub on first use, which fails
offline. They are taken from `evaluate.inception_weights` (a local .pth) or torch hub's
cache; when neither exists the metrics are null with the reason and a hint. The file is
first loaded with torch.load(weights_only=True): torch-fidelity itself loads it with
weights_only=False, so only a file that provably holds no pickled code is handed over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vdm.core.images import FOREGROUND_BELOW
from vdm.core.registry import Registry

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


MIN_PART = 4  # pixels: smaller 8-connected specks are not parts
PALETTE_SHARE = 0.9  # the palette: the fewest colours (4 bits per channel) covering this share
HUE_BINS = 12  # the hue figure's bins, 30 degrees each


def flat_share(colours: np.ndarray, fg: np.ndarray) -> float:
    """The share of foreground pixels whose four neighbours (up, down, left, right) all carry the
    same colour code as the pixel; `colours` is (H, W) int codes, `fg` (H, W) bool. A pixel on the
    image's edge lacks a neighbour and is never flat. 0 for an image without foreground."""
    if not fg.any():
        return 0.0
    c = colours[1:-1, 1:-1]
    same = (c == colours[:-2, 1:-1]) & (c == colours[2:, 1:-1]) & (c == colours[1:-1, :-2]) & (c == colours[1:-1, 2:])
    return float((same & fg[1:-1, 1:-1]).sum() / fg.sum())


def _foreground(im: np.ndarray) -> np.ndarray:
    return im.min(axis=2) < FOREGROUND_BELOW


def _colour_codes(im: np.ndarray) -> np.ndarray:
    """(H, W) int codes of the colours at 4 bits per channel."""
    return (im.astype(np.int32) >> 4) @ np.array([256, 16, 1], dtype=np.int32)


@dataclass(frozen=True)
class SampleSets:
    """What a sample metric sees: the samples, the training and test splits, each (N, H, W, 3)
    uint8, and the bootstrap settings (evaluate.swd_repeats, evaluate.seed). per_repeat: also
    report each bootstrap repeat (for paired comparisons)."""

    samples: np.ndarray
    train: np.ndarray
    test: np.ndarray
    repeats: int
    seed: int
    per_repeat: bool = False
    c2st_repeats: int = 3  # seeds the classifier two-sample test averages (evaluate.c2st_repeats; 0 = off)


SampleMetric = Callable[[SampleSets], dict]
# name -> metric of a sample set, in the order evaluation computes them
SAMPLE_METRICS: Registry[SampleMetric] = Registry("sample metric")
# name -> figure of one (H, W, 3) uint8 image; each is also a sample metric (see per_image_metric)
PER_IMAGE_METRICS: Registry[Callable[[np.ndarray], float]] = Registry("per-image metric")


def sample_metric(name: str) -> Callable[[SampleMetric], SampleMetric]:
    """Register fn(SampleSets) -> {key: value} under `name`: its keys land in metrics/eval.json."""
    return SAMPLE_METRICS.register(name)


def per_image_metric(name: str) -> Callable[[Callable[[np.ndarray], float]], Callable[[np.ndarray], float]]:
    """Register fn(image) -> float as a sample metric: its mean and standard error over the samples
    (`name`, `name_se`) and over the test split (`name_test`, `name_test_se`)."""

    def register(fn: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], float]:
        PER_IMAGE_METRICS.add(name, fn)
        SAMPLE_METRICS.add(name, lambda s: _summary(name, fn, s.samples, s.test))
        return fn

    return register


def _per_image(fn: Callable[[np.ndarray], float], images: np.ndarray) -> np.ndarray:
    return np.array([fn(im) for im in np.asarray(images)], dtype=np.float64)


def _summary(name: str, fn: Callable[[np.ndarray], float], samples: np.ndarray, test: np.ndarray) -> dict[str, float]:
    out = {}
    for suffix, images in (("", samples), ("_test", test)):
        v = _per_image(fn, images)
        out[f"{name}{suffix}"] = float(v.mean())
        out[f"{name}{suffix}_se"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return out


@sample_metric("swd")
def swd_metric(s: SampleSets) -> dict:
    """SWD (x 1000, mean over pyramid levels and per level, each +- bootstrap s.e.) of the samples
    against the test split, beside the floor: as many training images as samples (a fresh seeded
    subset in every repeat) against the test split, and the ratio of the two."""
    n, out = len(s.samples), {}
    for name, images, subsets in (("swd", s.samples, False), ("swd_floor", s.train, True)):
        r = swd(images, s.test, n, s.repeats, s.seed, subsets=subsets)
        out[name], out[f"{name}_se"] = r["avg"], r["avg_se"]
        if s.per_repeat and name == "swd":
            out["swd_per_repeat"] = r["per_repeat"]
        for side, m, se in zip(r["levels"], r["mean"], r["se"], strict=True):
            out[f"{name}_{side}"], out[f"{name}_{side}_se"] = m, se
    out["swd_ratio"] = out["swd"] / out["swd_floor"]
    return out


@sample_metric("graininess")
def graininess_metric(s: SampleSets) -> dict[str, float]:
    """Graininess of the samples and of the test split."""
    return {"graininess": graininess(s.samples), "graininess_test": graininess(s.test)}


# What the eye sees first in a sprite, which 7x7 patches cannot:


@per_image_metric("parts")
def parts(im: np.ndarray) -> float:
    """The 8-connected pieces of the foreground of at least MIN_PART pixels (a sprite is one or a
    few; salt-and-pepper colour is many)."""
    from scipy import ndimage

    labels, _ = ndimage.label(_foreground(im), structure=np.ones((3, 3)))
    return int((np.bincount(labels.ravel())[1:] >= MIN_PART).sum())


@per_image_metric("palette")
def palette(im: np.ndarray) -> float:
    """The fewest colours, at 4 bits per channel, that cover PALETTE_SHARE of the foreground (a
    sprite's flat regions use a handful); 0 without foreground."""
    fg = _foreground(im)
    counts = np.sort(np.bincount(_colour_codes(im)[fg]))[::-1]
    return int(np.searchsorted(np.cumsum(counts), PALETTE_SHARE * counts.sum()) + 1) if fg.any() else 0


@per_image_metric("flatness")
def flatness(im: np.ndarray) -> float:
    """The share of foreground pixels whose four neighbours carry the same colour at 4 bits per
    channel (flat fills are most of a sprite; speckle leaves almost no pixel flat)."""
    return flat_share(_colour_codes(im), _foreground(im))


@per_image_metric("hue")
def hue(im: np.ndarray) -> float:
    """The share of the coloured foreground pixels in its most common hue bin of HUE_BINS (a
    Pokémon is mostly one hue: a wash of several scores low); 1 without coloured pixels
    (vdm/model/colour.py says which pixels count as coloured)."""
    from vdm.model.colour import hue_counts

    pixels = torch.tensor(np.asarray(im))  # a copy: a split is memory-mapped read-only
    counts, _ = hue_counts(pixels.permute(2, 0, 1)[None], HUE_BINS)
    total = float(counts.sum())
    return float(counts.max()) / total if total > 0 else 1.0


def sprite_structure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, every per-image metric (parts, palette, flatness, ...): {name: (N,) values}."""
    return {name: _per_image(fn, images) for name, fn in PER_IMAGE_METRICS.items()}


def structure_summary(samples: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Mean and standard error of each per-image metric, for the samples and the test split."""
    out = {}
    for name, fn in PER_IMAGE_METRICS.items():
        out.update(_summary(name, fn, samples, test))
    return out


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def inception_weights(param: str) -> tuple[Path | None, str, str]:
    """(path, "", "") of usable Inception weights, or (None, a short code, why not and how to get
    them). The code goes into metrics/eval.json (short enough for `dvc exp show`), the hint is printed."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    # shown with ~ for the home folder: the reason lands in committed metrics
    shown = f"~/{cache.relative_to(Path.home())}" if cache.is_relative_to(Path.home()) else str(cache)
    how = (
        f"download {INCEPTION_URL} on a machine with internet access and set evaluate.inception_weights "
        f"to the file's path (or copy it to {shown})"
    )
    if param:
        path = Path(param).expanduser()
        if not path.is_file():
            return None, "weights_file_missing", f"evaluate.inception_weights = {param!r}: no such file; {how}"
    elif cache.is_file():
        path = cache
    else:
        why = f"no Inception weights (evaluate.inception_weights is empty and {shown} does not exist); {how}"
        return None, "no_inception_weights", why
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = f"{path} is not a plain tensor file ({type(e).__name__}); refusing to load it: {how}"
        return None, "weights_file_refused", why
    return path, "", ""


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1).contiguous()


def fidelity(samples: np.ndarray, reference: np.ndarray, weights: Path, device: torch.device) -> dict:
    """FID and KID against `reference`, Inception Score of `samples` (torch-fidelity)."""
    import torch_fidelity

    n = min(len(samples), len(reference))
    m = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(samples),
        input2=_Uint8Images(reference),
        cuda=device.type == "cuda",
        fid=True,
        kid=True,
        isc=True,
        kid_subset_size=min(1000, n),
        isc_splits=min(10, len(samples)),
        feature_extractor_weights_path=str(weights),
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    return {
        "fid": float(m["frechet_inception_distance"]),
        "kid": float(m["kernel_inception_distance_mean"]),
        "kid_std": float(m["kernel_inception_distance_std"]),
        "inception_score": float(m["inception_score_mean"]),
        "inception_score_std": float(m["inception_score_std"]),
    }


def nearest(samples: np.ndarray, reference: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """For each sample, the L2 distance (pixels in [0, 1]) to its nearest reference image, and its index."""
    a = torch.from_numpy(samples.reshape(len(samples), -1).astype(np.float32) / 255.0)
    best_d = torch.full((len(a),), float("inf"))
    best_i = torch.zeros(len(a), dtype=torch.long)
    for start in range(0, len(reference), chunk):
        b = torch.from_numpy(np.asarray(reference[start : start + chunk]).reshape(-1, a.shape[1]).astype(np.float32))
        d = torch.cdist(a, b / 255.0)
        m, i = d.min(dim=1)
        better = m < best_d
        best_d[better], best_i[better] = m[better], i[better] + start
    return best_d.numpy(), best_i.numpy()


# a sample nearer than this share of its distance to the test split's nearest sprite is a copy of a
# training sprite: the long preset's copies of one Pokémon's forms sit at 0.23-0.28 and its next
# sample at 0.62; the default's lowest two are 0.50 and 0.61
COPY_RATIO = 0.5


def memorisation(samples: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict:
    """Nearest-train distance over nearest-test distance per sample: about 1 or above means
    the samples are no closer to the training set than to unseen Pokémon (no copying); `copies`,
    the share of samples below COPY_RATIO."""
    d_train, i_train = nearest(samples, train)
    d_test, _ = nearest(samples, test)
    ratio = d_train / np.maximum(d_test, 1e-12)
    copies = float((ratio < COPY_RATIO).mean())
    return {"ratio": ratio, "d_train": d_train, "i_train": i_train, "d_test": d_test, "copies": copies}
