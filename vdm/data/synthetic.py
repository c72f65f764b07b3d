"""Procedurally drawn sprite-like images, deterministic from a seed.

Each "species" is a left-right symmetric coloured blob with a dark outline, a lighter
belly, eyes, and ears or feet, on a transparent background, like a Pokémon sprite.
Each species comes in a `standard` and a `shiny` (hue-shifted) variant, stored in the
per-species folder layout of the Kaggle dataset. Image k depends only on (seed, k),
never on how many images are drawn.

For tests and smoke runs only: never a silent substitute for real data.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vdm.core.images import png_bytes

SIZE = 96
VARIANTS = ("standard", "shiny")


def _colour(h: float, s: float, v: float) -> tuple[int, int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))
    return int(r * 255), int(g * 255), int(b * 255), 255


def _blob(cx: float, cy: float, radius: float, coeffs, phases, n: int = 48) -> list[tuple[float, float]]:
    """A closed outline symmetric about the vertical axis through cx."""
    pts = []
    for i in range(n):
        th = 2 * math.pi * i / n  # angle from straight up; cos terms keep x-symmetry
        r = radius * (
            1 + sum(a * math.cos((j + 2) * th + ph) for j, (a, ph) in enumerate(zip(coeffs, phases, strict=False)))
        )
        pts.append((cx + r * math.sin(th), cy - r * math.cos(th)))
    return pts


def draw_sprite(seed: int, species: int, variant: str = "standard") -> Image.Image:
    """One RGBA sprite of `species` (deterministic in seed and species)."""
    rng = np.random.default_rng([seed, species])
    hue, sat, val = rng.random(), 0.45 + 0.5 * rng.random(), 0.6 + 0.4 * rng.random()
    if variant == "shiny":
        hue += 0.25 + 0.5 * rng.random()
    else:
        rng.random()  # keep the stream aligned between variants
    body = _colour(hue, sat, val)
    belly = _colour(hue + 0.05, sat * 0.4, min(1.0, val + 0.3))
    outline = _colour(hue, 0.6, 0.18)
    accent = _colour(hue + 0.5, 0.7, 0.9)

    img = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    cx = SIZE / 2 + rng.integers(-4, 5)
    cy = SIZE / 2 + 6 + rng.integers(-4, 5)
    radius = 18 + 12 * rng.random()
    coeffs = rng.normal(0, 0.08, size=4)
    phases = rng.choice([0.0, math.pi], size=4)  # 0 or pi keeps the shape symmetric

    # ears (triangles) or antennae, drawn first so the body overlaps their base
    ear_dx, ear_len = radius * (0.35 + 0.3 * rng.random()), radius * (0.5 + 0.6 * rng.random())
    top = cy - radius * 0.8
    for sgn in (-1, 1):
        tip = (cx + sgn * (ear_dx + ear_len * 0.4), top - ear_len)
        d.polygon(
            [(cx + sgn * (ear_dx - 6), top + 4), (cx + sgn * (ear_dx + 6), top + 6), tip],
            fill=accent if rng.random() < 0.5 else body,
            outline=outline,
        )
    # feet
    foot_r = 4 + 4 * rng.random()
    for sgn in (-1, 1):
        fx, fy = cx + sgn * radius * 0.55, cy + radius * 0.9
        d.ellipse([fx - foot_r * 1.4, fy - foot_r, fx + foot_r * 1.4, fy + foot_r], fill=body, outline=outline)
    # body, belly, outline
    d.polygon(_blob(cx, cy, radius, coeffs, phases), fill=body, outline=outline, width=2)
    br = radius * (0.45 + 0.2 * rng.random())
    d.ellipse([cx - br * 0.8, cy - br * 0.3, cx + br * 0.8, cy + br * 1.1], fill=belly)
    # eyes
    ex, ey, er = radius * (0.25 + 0.15 * rng.random()), cy - radius * 0.35, 2.5 + 2.5 * rng.random()
    for sgn in (-1, 1):
        x = cx + sgn * ex
        d.ellipse([x - er, ey - er, x + er, ey + er], fill=(255, 255, 255, 255), outline=outline)
        d.ellipse([x - er / 2, ey - er / 3, x + er / 2, ey + er * 2 / 3], fill=(10, 10, 10, 255))
    return img


def layout(count: int) -> list[tuple[int, str, str]]:
    """(species, variant, relative path) of the first `count` synthetic images."""
    out = []
    for k in range(count):
        species, variant = divmod(k, len(VARIANTS))
        out.append((species, VARIANTS[variant], f"species-{species:05d}/{VARIANTS[variant]}.png"))
    return out


def write_synthetic(dest: str | Path, count: int, seed: int) -> int:
    """Draw `count` sprites as PNG files under `dest` (species folders). Returns bytes written."""
    dest = Path(dest)
    total = 0
    for species, variant, rel in layout(count):
        data = png_bytes(draw_sprite(seed, species, variant), compress_level=1)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
        total += len(data)
    return total
