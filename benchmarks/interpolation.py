"""The probability-flow ODE on real sprites: how closely encode -> decode returns them, and the
interpolation picture of the README.

    python benchmarks/interpolation.py                       # models/, 16 test sprites
    python benchmarks/interpolation.py --steps 16 32 --pairs test:0,test:40 test:7,test:90

For each step count: encode test sprites to z_1 and decode them back (DPM-Solver++(2M), the
`vdm interpolate` default), then the mean and 99th percentile of |difference| in levels (0..255)
and the fraction of pixels within 8 levels. Writes reports/interpolation.json and
docs/interpolation.png (one strip per pair: A | frames | B).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdm.app.api import load  # noqa: E402
from vdm.app.cli import read_sprite  # noqa: E402
from vdm.core.images import image_grid, png_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models")
    ap.add_argument("--processed", default="data/processed")
    ap.add_argument("--count", type=int, default=16, help="test sprites for the round trip")
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--pairs", nargs="+", default=["test:0,test:40", "test:7,test:90", "test:120,test:200"])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--picture-steps", type=int, default=64)
    ap.add_argument("--out", default="reports/interpolation.json")
    ap.add_argument("--picture", default="docs/interpolation.png")
    args = ap.parse_args()
    model = load(args.model, "cpu")
    test = np.load(Path(args.processed) / "test.npy", mmap_mode="r")
    step = max(1, len(test) // args.count)
    x = np.array(test[::step][: args.count])
    rows = []
    for steps in args.steps:
        t0 = time.perf_counter()
        back = model.decode(model.encode(x, steps=steps), steps=steps)
        d = np.abs(back.astype(int) - x)
        rows.append(
            dict(
                steps=steps,
                mean_abs_levels=round(float(d.mean()), 2),
                p99_abs_levels=float(np.percentile(d, 99)),
                within_8_levels=round(float((d <= 8).mean()), 4),
                seconds=round(time.perf_counter() - t0, 1),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    strips = []
    for pair in args.pairs:
        a, b = (read_sprite(s, args.processed, model.image_size) for s in pair.split(","))
        frames = model.interpolate(a, b, args.frames, args.picture_steps)
        strips.append(np.concatenate([a[None], frames, b[None]]))
    Path(args.picture).write_bytes(png_bytes(image_grid(np.concatenate(strips), ncol=args.frames + 2)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"count": len(x), "sampler": model.ode_options().sampler, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
