"""The bound against sample quality: test bits/dim (log scale) against SWD for measured runs.

    python benchmarks/frontier.py                  # docs/frontier.csv -> docs/frontier.png

docs/frontier.csv holds one row per measured run: its name, test bits/dim, SWD (x 1e3), the SWD's
standard error and the command that produced it. Lower-left is better on both; the real floor
(training sprites against test sprites) and the codecs mark what is possible.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

W, H, PAD = 900, 560, 70


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default="docs/frontier.csv")
    ap.add_argument("--out", default="docs/frontier.png")
    ap.add_argument("--floor", type=float, default=48.7, help="SWD of real sprites (the floor) at the same count")
    args = ap.parse_args()
    rows = list(csv.DictReader(Path(args.csv).open()))
    xs = [float(r["swd"]) for r in rows] + [args.floor]
    ys = [float(r["test_bpd"]) for r in rows] + [0.196]
    x0, x1 = 0.0, max(xs) * 1.1
    y0, y1 = math.log10(min(ys) / 1.5), math.log10(max(ys) * 1.5)

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD),
            H - PAD - (math.log10(y) - y0) / (y1 - y0) * (H - 2 * PAD),
        )

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([PAD, PAD, W - PAD, H - PAD], outline="black")
    for tick in (0.2, 0.5, 1, 2, 5, 8, 10, 20, 50, 100, 200, 500):
        if 10**y0 <= tick <= 10**y1:
            _, y = px(x0, tick)
            d.line([PAD - 5, y, PAD, y], fill="black")
            d.text((PAD - 40, y - 6), f"{tick:g}", fill="black")
    step = 50 if x1 > 200 else 25
    for tick in range(0, int(x1) + 1, step):
        x, _ = px(tick, 10**y0)
        d.line([x, H - PAD, x, H - PAD + 5], fill="black")
        d.text((x - 8, H - PAD + 8), str(tick), fill="black")
    d.text((W // 2 - 150, H - 30), "SWD x1e3 to the test sprites (lower is better)", fill="black")
    d.text((10, 20), "test bits/dim, log scale (lower is better)", fill="black")
    for level, name in ((8.0, "uniform model: 8"), (0.484, "PNG: 0.48"), (0.196, "WebP lossless: 0.20")):
        if 10**y0 <= level <= 10**y1:
            _, y = px(x0, level)
            d.line([PAD, y, W - PAD, y], fill=(180, 180, 180))
            d.text((PAD + 8, y - 14), name, fill=(120, 120, 120))
    fx, _ = px(args.floor, 10**y0)
    d.line([fx, PAD, fx, H - PAD], fill=(180, 180, 180))
    d.text((fx + 4, PAD + 4), "real floor", fill=(120, 120, 120))
    placed: list[tuple[float, float, float, float]] = []
    for r in rows:
        x, y = px(float(r["swd"]), float(r["test_bpd"]))
        se = float(r["swd_se"]) / (x1 - x0) * (W - 2 * PAD)
        d.line([x - se, y, x + se, y], fill=(60, 60, 200), width=2)
        colour = (200, 30, 30) if r["name"].startswith("default") else (30, 30, 160)
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
        w = d.textlength(r["name"])
        # the first of four spots around the point whose label box overlaps no label drawn so far
        spots = [(x + 8, y - 14), (x + 8, y + 4), (x - 8 - w, y - 14), (x - 8 - w, y + 4)]
        for tx, ty in spots:
            box = (tx, ty, tx + w, ty + 11)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        d.text((tx, ty), r["name"], fill=colour)
    img.save(args.out)
    print(f"frontier: {len(rows)} runs -> {args.out}")


if __name__ == "__main__":
    main()
