"""The classifier two-sample test on sprites from any run: a samples.npy file, or a grid PNG as
the project draws them (`vdm.core.images.image_grid`: cells of the sprite size, 2-pixel gaps, so
docs/samples-*.png), each scored by the evaluate stage's own metric against the test split,
beside the real-against-real floor at the same count.

    python benchmarks/classifier.py docs/samples-long.png samples/samples.npy --n 64

Each set gives its first n sprites (a grid's are the first of its run; blank cells are skipped),
so sets of different runs compare at one n; at n = 128 a samples.npy scores as the evaluate
stage's `c2st`. Same sprites and seed => the same figures on the same CPU type. `--nudge 0.01`
first moves 1% of each set's subpixels by one level (seeded; invisible), to show how far the
figure moves when nothing a person or the other figures can see does:

    python benchmarks/classifier.py samples/samples.npy --n 128 --nudge 0.01
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages._cli import run  # noqa: E402
from vdm.core.errors import UserError  # noqa: E402
from vdm.data.splits import load_split  # noqa: E402
from vdm.evaluation.c2st import c2st_metric  # noqa: E402
from vdm.evaluation.metrics import SampleSets  # noqa: E402

PAD = 2  # image_grid's gap between cells


def grid_cells(grid: np.ndarray, size: int, pad: int = PAD) -> np.ndarray:
    """The (N, size, size, 3) sprites of an image_grid picture, row by row, blank cells dropped."""
    h, w = grid.shape[:2]
    rows, cols = (h - pad) // (size + pad), (w - pad) // (size + pad)
    if rows < 1 or cols < 1 or (rows * (size + pad) + pad, cols * (size + pad) + pad) != (h, w):
        raise UserError(f"a {w}x{h} picture is not a grid of {size}x{size} sprites with {pad}-pixel gaps")
    cells = [
        grid[
            pad + r * (size + pad) : pad + r * (size + pad) + size,
            pad + c * (size + pad) : pad + c * (size + pad) + size,
        ]
        for r in range(rows)
        for c in range(cols)
    ]
    return np.stack([cell for cell in cells if (cell != 255).any()])


def load_sprites(path: str | Path, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 sprites from a .npy file of them or an image_grid PNG."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p} does not exist: give a samples.npy file or a grid PNG")
    if p.suffix == ".npy":
        sprites = np.load(p, mmap_mode="r")
        if sprites.ndim != 4 or sprites.shape[1:] != (size, size, 3) or sprites.dtype != np.uint8:
            raise UserError(f"{p} holds {sprites.dtype} {sprites.shape}, not (N, {size}, {size}, 3) uint8 sprites")
        return np.array(sprites)  # a writable copy: torch reads it without a warning
    with Image.open(p) as im:
        return grid_cells(np.asarray(im.convert("RGB")), size)


def nudge(sprites: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """A copy of uint8 sprites with about `share` of their subpixels moved one level up or down
    (kept in 0-255), the choice seeded."""
    rng = np.random.default_rng(seed)
    moved = sprites.astype(np.int16)
    mask = rng.random(moved.shape) < share
    moved[mask] += rng.choice(np.array([-1, 1], dtype=np.int16), int(mask.sum()))
    return moved.clip(0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", help="samples.npy files or grid PNGs")
    ap.add_argument("--n", type=int, default=64, help="sprites per set (the first n), as many test sprites")
    ap.add_argument("--repeats", type=int, default=3, help="classifier seeds averaged (evaluate.c2st_repeats)")
    ap.add_argument("--seed", type=int, default=0, help="evaluate.seed")
    ap.add_argument("--nudge", type=float, default=0.0, help="share of subpixels moved one level first (0: none)")
    ap.add_argument("--processed", default="data/processed")
    args = ap.parse_args()
    if not 0 <= args.nudge <= 1:
        raise UserError(f"--nudge {args.nudge}: give a share of subpixels from 0 to 1")
    train, test = load_split(args.processed, "train"), load_split(args.processed, "test")
    size = test.shape[1]
    for path in args.sets:
        sprites = load_sprites(path, size)[: args.n]
        if len(sprites) < args.n:
            raise UserError(f"{path} holds {len(sprites)} sprites, fewer than --n {args.n}")
        if args.nudge:
            sprites = nudge(sprites, args.nudge, args.seed)
        q = c2st_metric(SampleSets(sprites, train, test, 1, args.seed, c2st_repeats=args.repeats))
        print(
            f"{path}: classifier {q['c2st']:.3f} +- {q['c2st_se']:.3f} on {q['c2st_images']} a side "
            f"(real against real {q['c2st_floor']:.3f} +- {q['c2st_floor_se']:.3f})",
            flush=True,
        )


if __name__ == "__main__":
    run(main)  # a missing file or a picture that is no grid: one line, exit 2
