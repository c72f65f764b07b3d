"""Sampler sweep on a trained model: each sampler and step count draws the same sprites (same seed)
and is scored by the evaluate stage's metric, with its wall-clock.

    python benchmarks/samplers.py                                 # the default sweep on models/
    python benchmarks/samplers.py --rows ancestral:256:t ddim:32:t dpmpp_2m:32:logsnr
    python benchmarks/samplers.py --rows ancestral:64:t:ema:1 ancestral:64:t:ema:0.85   # temperatures
    python benchmarks/samplers.py --rows ancestral:64:t:model:0.8:1 ancestral:64:t:model:0.8:2   # colour guidance
    python benchmarks/samplers.py --rows ancestral:64:t:ema:0.8:2:0.5,1    # ... acting only where t is 0.5 to 1

Writes reports/samplers/samplers.json, a Markdown table (samplers.md) and samplers.png (the first
8 sprites of each row, one row each). The sample count, batch, seed, clipping, SWD repeats and
evaluation seed come from params.yaml, so the figures are those the sample/evaluate stages give.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdm.core.images import image_grid, png_bytes  # noqa: E402
from vdm.core.params import parse_params  # noqa: E402
from vdm.evaluation.evaluate import sample_quality  # noqa: E402
from vdm.model.checkpoint import load_model  # noqa: E402
from vdm.model.colour import followed  # noqa: E402
from vdm.sampling.samplers import sprite_colours  # noqa: E402
from vdm.sampling.sprites import generate  # noqa: E402

DEFAULT_ROWS = [
    "ancestral:256:t",
    "ancestral:128:t",
    "ancestral:64:t",
    "ddim:16:t",
    "ddim:32:t",
    "ddim:64:t",
    "ddim:128:t",
    "dpmpp_2m:16:t",
    "dpmpp_2m:32:t",
    "dpmpp_2m:64:t",
    "dpmpp_2m:128:t",
    "ddim:32:logsnr",
    "dpmpp_2m:32:logsnr",
    "ancestral:64:logsnr",
]


def share(value: float | None) -> str:
    """A share to two places, "-" where there is none (no colour classes, or none drawn grey)."""
    return "-" if value is None else f"{value:.2f}"


def span(interval) -> str:
    """[a, b] as "a-b": where in the walk's t a row's colour guidance acts."""
    return "{:g}-{:g}".format(*interval)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models")
    ap.add_argument("--processed", default="data/processed")
    ap.add_argument(
        "--rows",
        nargs="+",
        default=DEFAULT_ROWS,
        help="sampler:steps:spacing[:ema|model[:temperature[:colour guidance[:its interval a,b in t]]]] ...",
    )
    ap.add_argument("--count", type=int, default=None, help="sprites per row (default: sample.count)")
    ap.add_argument(
        "--weights", default="ema", choices=("ema", "model"), help="weights of rows that do not name theirs"
    )
    ap.add_argument("--out", default="reports/samplers")
    args = ap.parse_args()

    p = parse_params(yaml.safe_load(Path("params.yaml").read_text()))
    sp, ep = p.sample, p.evaluate
    count = args.count or sp.count
    torch.manual_seed(0)
    models = {}
    train = np.load(Path(args.processed) / "train.npy", mmap_mode="r")
    test = np.load(Path(args.processed) / "test.npy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, strips = [], []
    for spec in args.rows:
        parts = spec.split(":")
        sampler, steps, spacing = parts[:3]
        weights = parts[3] if len(parts) > 3 else args.weights
        temperature = float(parts[4]) if len(parts) > 4 else sp.temperature
        guidance = float(parts[5]) if len(parts) > 5 else sp.colour_guidance
        interval = tuple(map(float, parts[6].split(","))) if len(parts) > 6 else sp.colour_guidance_interval
        if weights not in models:
            models[weights] = load_model(args.models, weights, torch.device("cpu"), sp.precision)[0]
        model = models[weights]
        options = sp.options.replace(
            sampler=sampler,
            steps=int(steps),
            spacing=spacing,
            temperature=temperature,
            colour_guidance=guidance,
            colour_guidance_interval=interval,
        )
        samples, _, secs = generate(model, count, options, sp.seed, torch.device("cpu"))
        drawn = sprite_colours(model, count, sp.seed, torch.device("cpu"))
        shown = {"class_followed": None, "class_near": None, "grey_followed": None}
        if drawn is not None:  # how far the sprites show the colour classes they were drawn with
            shown = followed(drawn, torch.from_numpy(samples).permute(0, 3, 1, 2), model.colour_classes)
        t0 = time.perf_counter()
        q = sample_quality(samples, train, test, ep.swd_repeats, ep.seed, True, ep.c2st_repeats)
        metric_s = time.perf_counter() - t0
        # paired with the first row (same seeds, same bootstrap draws): the difference and its s.e.
        diff = np.asarray(q["swd_per_repeat"]) - np.asarray((rows[0] if rows else q)["swd_per_repeat"])
        q["swd_diff"], q["swd_diff_se"] = float(diff.mean()), float(diff.std(ddof=1))
        row = {
            "weights": weights,
            "sampler": sampler,
            "steps": int(steps),
            "spacing": spacing,
            "temperature": temperature,
            "colour_guidance": guidance,
            "colour_guidance_interval": list(interval),
            "count": count,
            "sample_s": round(secs, 1),
            "metric_s": round(metric_s, 1),
            **q,
            **shown,
        }
        rows.append(row)
        strips.append(samples[:8])
        print(
            f"{sampler:>9} {steps:>4} {spacing:>6} T {temperature:g} w {guidance:g} in t {span(interval)}: "
            f"classifier {q['c2st']:.3f} "
            f"+- {q['c2st_se']:.3f} "
            f"(floor {q['c2st_floor']:.3f}), SWD {q['swd']:6.1f} +- {q['swd_se']:4.1f} "
            f"(96: {q['swd_96']:6.1f} +- {q['swd_96_se']:4.1f}; floor {q['swd_floor']:.1f}), "
            f"graininess {q['graininess']:5.1f} (test {q['graininess_test']:.1f}), parts {q['parts']:.2f}, "
            f"palette {q['palette']:.0f}, flatness {q['flatness']:.3f}, hue {q['hue']:.2f}, "
            f"class followed {share(shown['class_followed'])} (near {share(shown['class_near'])}, "
            f"grey {share(shown['grey_followed'])}), {secs:6.1f} s; "
            f"vs first row {q['swd_diff']:+.1f} +- {q['swd_diff_se']:.1f}",
            flush=True,
        )
        (out / "samplers.json").write_text(json.dumps(rows, indent=2) + "\n")  # each row kept as it ends
    lines = [
        "| weights | sampler | steps | spacing | temperature | colour guidance (in t) | classifier "
        "| SWD x1e3 (mean of levels) | paired difference to the "
        f"first row | SWD at 96 px | graininess | parts | palette | flatness | hue | class followed (grey) "
        f"| seconds for {count} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['weights']} | {r['sampler']} | {r['steps']} | {r['spacing']} | {r['temperature']:g} "
            f"| {r['colour_guidance']:g} ({span(r['colour_guidance_interval'])}) "
            f"| {r['c2st']:.3f} +- {r['c2st_se']:.3f} "
            f"| {r['swd']:.1f} +- {r['swd_se']:.1f} | {r['swd_diff']:+.1f} +- {r['swd_diff_se']:.1f} "
            f"| {r['swd_96']:.1f} +- {r['swd_96_se']:.1f} | {r['graininess']:.1f} "
            f"| {r['parts']:.2f} +- {r['parts_se']:.2f} | {r['palette']:.0f} +- {r['palette_se']:.0f} "
            f"| {r['flatness']:.3f} | {r['hue']:.2f} | {share(r['class_followed'])} ({share(r['grey_followed'])}) "
            f"| {r['sample_s']:.0f} |"
        )
    r0 = rows[0]
    lines.append(
        f"| real floor (train vs test) | | | | | | {r0['c2st_floor']:.3f} +- {r0['c2st_floor_se']:.3f} "
        f"| {r0['swd_floor']:.1f} +- {r0['swd_floor_se']:.1f} | | "
        f"{r0['swd_floor_96']:.1f} +- {r0['swd_floor_96_se']:.1f} | {r0['graininess_test']:.1f} (test) "
        f"| {r0['parts_test']:.2f} (test) | {r0['palette_test']:.1f} (test) | {r0['flatness_test']:.3f} (test) "
        f"| {r0['hue_test']:.2f} (test) | | |"
    )
    (out / "samplers.md").write_text("\n".join(lines) + "\n")
    (out / "samplers.png").write_bytes(png_bytes(image_grid(np.concatenate(strips), ncol=8)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
