"""How well a trained model denoises, level by level: test sprites noised to each gamma, then
the model's x_hat(z_t, gamma) against the clean sprite and against the identity z_t / alpha_t.

    python benchmarks/denoiser.py models                                  # the train stage's model
    python benchmarks/denoiser.py reports/scaling/lr5e-4/snapshots/step-004800 --count 32

Per gamma: the noise in pixel levels (sigma / alpha x 127.5), the root-mean-square error of
x_hat and of z_t / alpha_t (levels), and the palette and flatness of x_hat (rounded to levels)
beside those of z_t / alpha_t. A denoiser that knows sprites are drawn in flat colours makes
x_hat flatter than its input; one with an error floor adds colours to it. The sample's last
steps pass through the low-noise rows: its flatness is bounded by theirs. Same seed and model
=> the same figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages._cli import run  # noqa: E402
from vdm.evaluation.metrics import sprite_structure  # noqa: E402
from vdm.model.checkpoint import load_model  # noqa: E402
from vdm.model.conversions import alpha_sigma, decode_nearest, encode  # noqa: E402

GAMMAS = (-10.0, -8.0, -6.0, -4.0, -2.0, 0.0, 2.0)


def _looks(images: np.ndarray) -> tuple[float, float]:
    """Mean palette and flatness of (n, H, W, 3) uint8 sprites."""
    m = sprite_structure(images)
    return float(m["palette"].mean()), float(m["flatness"].mean())


def _levels(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) images in [-1, 1] as (n, H, W, 3) uint8, rounded to pixel levels."""
    return decode_nearest(images.clamp(-1, 1)).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def denoiser_rows(model, test: np.ndarray, gammas=GAMMAS, seed: int = 0) -> list[dict]:
    """One row per gamma (see the module docstring) for the uint8 sprites `test` (n, H, W, 3)."""
    x = encode(torch.from_numpy(np.ascontiguousarray(test)).permute(0, 3, 1, 2))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for gamma in gammas:
        g = torch.full((len(x),), float(gamma))
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in alpha_sigma(g))
        z = alpha * x + sigma * eps
        x_hat, identity = model.x_hat(z, g).clamp(-1, 1), (z / alpha).clamp(-1, 1)
        (pal, flat), (pal_id, flat_id) = _looks(_levels(x_hat)), _looks(_levels(identity))
        rows.append(
            {
                "gamma": gamma,
                "noise_levels": float(sigma[0] / alpha[0]) * 127.5,
                "rms_x_hat": float((x_hat - x).square().mean().sqrt()) * 127.5,
                "rms_identity": float((identity - x).square().mean().sqrt()) * 127.5,
                "palette": pal,
                "palette_identity": pal_id,
                "flatness": flat,
                "flatness_identity": flat_id,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", help="a models/ folder (config.json and its weights)")
    ap.add_argument("--weights", default="ema", help="ema | model")
    ap.add_argument("--test", default="data/processed/test.npy", help="the clean sprites (n, H, W, 3) uint8")
    ap.add_argument("--count", type=int, default=32, help="test sprites used")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    model, _ = load_model(args.models, args.weights)
    test = np.array(np.load(args.test, mmap_mode="r")[: args.count])  # a writable copy of the first few
    pal, flat = _looks(test)
    print(f"denoiser: {len(test)} test sprites: palette {pal:.1f}, flatness {flat:.3f}")
    print(f"{'gamma':>6} {'noise':>7} {'rms x_hat':>9} {'rms z/a':>8} {'palette':>14} {'flatness':>14}")
    rows = denoiser_rows(model, test)
    for r in rows:
        print(
            f"{r['gamma']:>6.1f} {r['noise_levels']:>7.2f} {r['rms_x_hat']:>9.2f} {r['rms_identity']:>8.2f} "
            f"{r['palette']:>6.1f} ({r['palette_identity']:>5.1f}) {r['flatness']:>6.3f} ({r['flatness_identity']:.3f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    run(main)  # a UserError or a full disk: one line, exit 2
