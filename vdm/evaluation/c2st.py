"""The classifier two-sample test (Lopez-Paz & Oquab, 2017): how well a small CNN, trained from
scratch, tells the samples from held-out sprites. 0.5 means it cannot tell them apart at all.

For n samples against n test sprites: the 2n images are split into `FOLDS` folds (each fold half
samples, half sprites); for each fold a fresh CNN trains on the other folds and predicts it; the
share of the 2n held-out predictions that are right is one repeat. A CNN trained on a few
hundred images lands differently from one seed to the next (three seeds on one set of filtered
samples: 0.977, 0.875, 0.945, where the binomial s.e. is 0.01-0.02), so the figure is the mean of
`evaluate.c2st_repeats` repeats with other seeds (folds, weights, batches), and its standard error joins the
binomial one of the images with the spread of the repeats. The floor is the same test with n
training sprites in place of the samples: two sets of real sprites of different Pokémon (the
split is by Pokémon), which a small CNN tells apart a little better than chance. Everything is
seeded (weights, shuffles, folds): the same images give the same figure on the same CPU type.

Why a CNN and not the SWD: the SWD compares 7x7 patch statistics, which samples reach long before
they look like sprites; a classifier sees any difference that helps it, colour washes, speckle
and seams included.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import nn

from vdm.evaluation.metrics import SampleSets, sample_metric

FOLDS = 4
STEPS = 300  # Adam steps per fold, whatever the set size: a few hundred images need this many
BATCH = 32
LR = 2e-3
MAX_PER_SIDE = 256  # images per class: enough for a 3-point s.e.; more only costs time


def classifier() -> nn.Module:
    """A small CNN for 96x96 sprites (any side divisible by 16): four strided 3x3 convolutions
    (16 -> 64 channels) with batch norm (which keeps each image's contrast and grain, where a
    per-image norm would divide them away), global average and max pooling, one logit."""
    layers, c_in = [], 3
    for c in (16, 32, 64, 64):
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.SiLU()]
        c_in = c
    return nn.Sequential(*layers, _MeanMaxPool(), nn.Linear(2 * c_in, 1))


class _MeanMaxPool(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)


def _as_input(images: np.ndarray) -> torch.Tensor:
    # a copy: a read-only memory map (a whole split) would hand torch a buffer it may not write
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def held_out_accuracy(a: np.ndarray, b: np.ndarray, seed: int, repeats: int = 1) -> tuple[float, float]:
    """(accuracy, s.e.) of telling images a from images b ((N, H, W, 3) uint8 each, as many of
    each), every prediction made by a CNN that never saw the image (k-fold); with `repeats` > 1
    the mean over that many seeds (seed, seed + 1, ...), its s.e. the images' binomial one and the
    seeds' spread together."""
    if repeats > 1:
        runs = [held_out_accuracy(a, b, seed + r) for r in range(repeats)]
        acc = float(np.mean([r[0] for r in runs]))
        spread = float(np.var([r[0] for r in runs], ddof=1)) / repeats
        return acc, math.sqrt(max(acc * (1 - acc), 1e-12) / (len(a) + len(b)) + spread)
    if len(a) != len(b) or len(a) < FOLDS:
        raise ValueError(f"two sets of equal size, at least {FOLDS} each (got {len(a)} and {len(b)})")
    x = torch.cat([_as_input(a), _as_input(b)])
    y = torch.cat([torch.zeros(len(a)), torch.ones(len(b))])
    gen = torch.Generator().manual_seed(seed)
    # folds: each set shuffled and dealt round-robin, so every fold holds both classes equally
    fold = torch.empty(len(x), dtype=torch.long)
    for start, n in ((0, len(a)), (len(a), len(b))):
        fold[start + torch.randperm(n, generator=gen)] = torch.arange(n) % FOLDS
    right = 0
    for k in range(FOLDS):
        train, held = torch.nonzero(fold != k).flatten(), torch.nonzero(fold == k).flatten()
        net = _fit(x[train], y[train], gen)
        with torch.no_grad():
            right += int(((net(x[held]).flatten() > 0).float() == y[held]).sum())
    acc = right / len(x)
    return acc, math.sqrt(max(acc * (1 - acc), 1e-12) / len(x))


def _fit(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (), generator=gen)))
        net = classifier()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = nn.BCEWithLogitsLoss()
    net.train()
    order, at = torch.randperm(len(x), generator=gen), 0
    for _ in range(STEPS):
        if at + BATCH > len(order):  # a fresh shuffle when the epoch's images run out
            order, at = torch.randperm(len(x), generator=gen), 0
        idx = order[at : at + BATCH]
        at += BATCH
        opt.zero_grad(set_to_none=True)
        loss_fn(net(_augment(x[idx], gen)).flatten(), y[idx]).backward()
        opt.step()
    return net.eval()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image mirrored at random and shifted (wrapping round) by up to 1/8 of its side: on a
    few hundred images the CNN otherwise learns the images, not what tells the two sets apart."""
    side, out = x.shape[-1], []
    reach = side // 8
    shifts = torch.randint(-reach, reach + 1, (len(x), 2), generator=gen).tolist()
    flips = torch.rand(len(x), generator=gen) < 0.5
    for im, (dy, dx), flip in zip(x, shifts, flips.tolist(), strict=True):
        im = torch.roll(im, (dy, dx), dims=(1, 2))
        out.append(im.flip(2) if flip else im)
    return torch.stack(out)


def _subset(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n images of `images`, a seeded choice (all of them, in order, when n is their count)."""
    if n >= len(images):
        return np.asarray(images)
    idx = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    return np.asarray(images[idx])


_FLOORS: dict[str, tuple[float, float]] = {}  # the floor depends on the splits, n and seed only


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@sample_metric("c2st")
def c2st_metric(s: SampleSets) -> dict[str, float]:
    """Held-out accuracy of a CNN telling the samples from test sprites (`c2st`, +- `c2st_se`), and
    the floor: training sprites against the same test sprites (`c2st_floor`, +- s.e.), each the
    mean of `c2st_repeats` seeds; None when that is 0 or there are fewer than FOLDS samples."""
    n = min(len(s.samples), len(s.test), MAX_PER_SIDE)
    if n < FOLDS or s.c2st_repeats == 0:  # off, or too few images for k folds: None in eval.json
        return dict.fromkeys(("c2st", "c2st_se", "c2st_floor", "c2st_floor_se"), None) | {"c2st_images": n}
    test = _subset(s.test, n, s.seed)
    samples = _subset(s.samples, n, s.seed + 1)
    acc, se = held_out_accuracy(samples, test, s.seed, s.c2st_repeats)
    reals = _subset(s.train, n, s.seed + 2)
    key = _digest(reals, test) + f"/{s.seed}/{s.c2st_repeats}"
    if key not in _FLOORS:
        _FLOORS[key] = held_out_accuracy(reals, test, s.seed, s.c2st_repeats)
    floor, floor_se = _FLOORS[key]
    return {"c2st": acc, "c2st_se": se, "c2st_floor": floor, "c2st_floor_se": floor_se, "c2st_images": n}
