"""A sprite's colour class: the label a colour-conditioned net (model.colour_classes > 0) trains on.

A Pokémon sprite is mostly one hue (the test sprites' most common hue bin of 12 holds 71% of their
coloured pixels); an unconditioned net at the default's budget paints washes of several (44%) and
draws the hues in other shares than the data (yellow-green where the data has blue and violet).
The class is read from the image itself, so no labels are needed: with K classes, K - 1 bins of
hue (each 360 / (K - 1) degrees, from red) and one for sprites that are mostly grey, black or white.

    foreground   a pixel whose darkest channel is below FOREGROUND_BELOW (the background is white)
    coloured     a foreground pixel with HSV saturation above SATURATED and value above LIT
    class        the hue bin holding the most coloured pixels; K - 1 (grey) where the coloured
                 pixels are under GREY_BELOW of the foreground, or there is no foreground

The net sees class K (none) for a share model.colour_drop of its training images, so it learns the
unconditioned denoiser as well, which the bound and the fits use. A walk draws each sprite's class
from the shares the net was trained on (VDM.colour_counts) and may guide with weight w:
x_hat = x_none + w (x_class - x_none) (classifier-free guidance, Ho & Salimans 2022; w = 1: the
conditioned denoiser alone, one network call a step; vdm/sampling/samplers.py).
"""

from __future__ import annotations

import torch

from vdm.core.images import FOREGROUND_BELOW

SATURATED = 0.25  # HSV saturation (max - min) / max above which a pixel counts as coloured
LIT = 0.2  # HSV value (max channel / 255) above which it does: near-black outlines have no hue
GREY_BELOW = 0.3  # a sprite whose coloured pixels are under this share of its foreground is grey


@torch.no_grad()
def hue_counts(images: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, bins) counts of each image's coloured pixels per hue bin (360 / bins degrees each, from
    red), and (B,) counts of its foreground pixels, of (B, 3, H, W) uint8 images."""
    x = images.float()
    mx, mn = x.amax(1), x.amin(1)
    fg = mn < FOREGROUND_BELOW
    coloured = fg & (mx - mn > SATURATED * mx) & (mx > LIT * 255)
    r, g, b = x.unbind(1)
    d = (mx - mn).clamp(min=1e-6)
    hue = torch.where(  # in sixths of the circle, [0, 6)
        mx == r, torch.remainder((g - b) / d, 6.0), torch.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0)
    )
    idx = (hue * (bins / 6.0)).long().clamp(0, bins - 1)
    counts = torch.zeros(x.shape[0], bins, device=x.device)
    counts.scatter_add_(1, idx.flatten(1), coloured.flatten(1).float())
    return counts, fg.flatten(1).sum(1)


@torch.no_grad()
def colour_class(images: torch.Tensor, classes: int) -> torch.Tensor:
    """(B,) int64 colour classes in [0, classes) of (B, 3, H, W) uint8 images (see the module docstring)."""
    if classes < 2:
        raise ValueError(f"classes = {classes}: at least 2 (one hue bin and grey)")
    bins = classes - 1
    counts, n_fg = hue_counts(images, bins)
    grey = (n_fg == 0) | (counts.sum(1) < GREY_BELOW * n_fg)
    return torch.where(grey, torch.full_like(n_fg, bins), counts.argmax(1))


@torch.no_grad()
def followed(drawn: torch.Tensor, images: torch.Tensor, classes: int) -> dict[str, float | None]:
    """How far sprites drawn with classes `drawn` (B,) show them, read back from the (B, 3, H, W)
    uint8 images: the share whose class reads as drawn (`class_followed`), as drawn or a
    neighbouring hue bin (`class_near`), and among those drawn grey the share that read grey
    (`grey_followed`; None where none was drawn grey)."""
    bins, read = classes - 1, colour_class(images, classes).to(drawn.device)
    apart = torch.remainder(read - drawn, bins)
    hue = (drawn < bins) & (read < bins)
    near = (read == drawn) | (hue & ((apart == 1) | (apart == bins - 1)))
    grey = drawn == bins
    return {
        "class_followed": float((read == drawn).float().mean()),
        "class_near": float(near.float().mean()),
        "grey_followed": float((read[grey] == bins).float().mean()) if grey.any() else None,
    }
