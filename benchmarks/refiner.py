"""A low-noise expert (a refiner): a small second net trained only where the noise is a few pixel
levels, and the walk's last steps taken with it (eDiff-I's experts, SDXL's refiner).

    python benchmarks/refiner.py train --name r1 --steps 2000      # -> reports/refiner/r1/models
    python benchmarks/refiner.py score --models models --refiner reports/refiner/r1/models \\
        --rows ancestral sprite ancestral+refiner sprite+refiner

`train` runs the training loop (vdm.training.loop.train) on params.yaml with the RECIPE below
changed (and --set key=value on top): a fixed linear schedule over [gamma_min, gamma_max] only,
eps-prediction (its error in x is sigma / alpha times the net's: precise where the noise is
small) trained on the bound, a narrower net without attention, no post-training fits. The net
is conditioned on gamma itself, so it denoises at whatever gammas the main model's walk visits.

`score` prints, per gamma, the error of both models' x_hat beside doing nothing (z_t / alpha_t;
benchmarks/denoiser.py's rows), then draws params.yaml's sample count with the sample stage's
seeds and options for each row (SAMPLER or SAMPLER+refiner: the walk's steps below the
refiner's gamma_max use the refiner, vdm.sampling.samplers.refined_denoiser) and scores them
as the evaluate stage does. Rows are cached in OUT/ROW.json per (models, refiner, options).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.denoiser import denoiser_rows  # noqa: E402
from benchmarks.sweep import apply, parse_row  # noqa: E402
from stages._cli import run  # noqa: E402
from vdm.core.images import image_grid, png_bytes  # noqa: E402
from vdm.core.params import parse_params  # noqa: E402
from vdm.core.runtime import resolve_device  # noqa: E402
from vdm.evaluation.evaluate import sample_quality  # noqa: E402
from vdm.model.checkpoint import load_model  # noqa: E402
from vdm.sampling.sprites import generate  # noqa: E402
from vdm.training.loop import Outputs, train  # noqa: E402

RECIPE = {
    "model.schedule": "fixed_linear",
    "model.gamma_min": -11.0,  # the walk ends near gamma_0 = -7.2 (3.5 levels of noise)
    "model.gamma_max": -2.0,  # 47 levels: where the main model's x_hat is still the better one
    "model.channels": 32,
    "model.channel_mult": [1, 2, 2],
    "model.attention_resolutions": [],
    "model.prediction": "eps",
    "model.loss_weighting": "elbo",
    "train.steps": 2000,
    "train.fit_gamma_0": False,
    "train.fit_eps_scale": False,
    "train.eval_every": 0,
    "train.sample_every": 0,
    "train.sample_count": 0,  # a refiner alone draws no sprites
    "train.eval_images": 32,
    "train.wandb": "disabled",
}


def train_refiner(name: str, steps: int | None, sets: dict, processed: str, out: Path) -> dict:
    changes = {**RECIPE, **({"train.steps": steps} if steps else {}), **sets}
    p = parse_params(apply(yaml.safe_load(Path("params.yaml").read_text()), changes))
    d = out / name
    r = train(p, processed, Outputs(d / "models", d / "metrics", d / "plots", d / "checkpoints"))
    return {k: r[k] for k in ("val_bpd", "img_per_s", "wall_s")}


def score_rows(models, refiner_dir, rows: list[str], processed: str, out: Path, count=None, sets=None) -> list[dict]:
    p = parse_params(apply(yaml.safe_load(Path("params.yaml").read_text()), sets or {}))
    sp, ep = p.sample, p.evaluate
    count = count or sp.count
    device = resolve_device(sp.device, "sample.device")
    main = load_model(models, "ema", device, sp.precision)[0]
    refiner = load_model(refiner_dir, "ema", device, sp.precision)[0]
    train_x = np.load(Path(processed) / "train.npy", mmap_mode="r")
    test_x = np.load(Path(processed) / "test.npy")
    with main.fp32(), refiner.fp32():
        ours, theirs = denoiser_rows(main, test_x[:32]), denoiser_rows(refiner, test_x[:32])
    print(f"{'gamma':>6} {'noise':>7} {'rms main':>9} {'rms refiner':>11} {'rms z/a':>8}  (levels, 32 test sprites)")
    for a, b in zip(ours, theirs, strict=True):
        print(
            f"{a['gamma']:>6.1f} {a['noise_levels']:>7.2f} {a['rms_x_hat']:>9.2f} {b['rms_x_hat']:>11.2f} "
            f"{a['rms_identity']:>8.2f}"
        )
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for row in rows:
        sampler, _, extra = row.partition("+")
        options = sp.options.replace(sampler=sampler)
        key = {"models": str(models), "refiner": str(refiner_dir) if extra else None, "count": count}
        key.update(options.model_dump(mode="json"), c2st_repeats=ep.c2st_repeats)
        cached = out / f"{row}.json"
        if cached.is_file() and json.loads(cached.read_text())["key"] == key:
            results.append(json.loads(cached.read_text()))
            continue
        samples, _, secs = generate(main, count, options, sp.seed, device, refiner=refiner if extra else None)
        q = sample_quality(samples, train_x, test_x, ep.swd_repeats, ep.seed, False, ep.c2st_repeats)
        r = {"row": row, "key": key, "seconds": round(secs, 1), **q}
        (out / f"{row}.png").write_bytes(png_bytes(image_grid(samples[:64], ncol=8)))
        cached.write_text(json.dumps(r, indent=1) + "\n")
        results.append(r)
    print("| walk | classifier | parts | palette | flatness | graininess | SWD x1e3 | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['row']} | {_c2st(r)} | {r['parts']:.2f} | {r['palette']:.1f} "
            f"| {r['flatness']:.3f} | {r['graininess']:.1f} | {r['swd']:.1f} +- {r['swd_se']:.1f} | {r['seconds']} |"
        )
    q = results[0]
    floor = "" if q["c2st"] is None else f"floor {q['c2st_floor']:.3f}"
    print(
        f"| test sprites | {floor} | {q['parts_test']:.2f} | {q['palette_test']:.1f} "
        f"| {q['flatness_test']:.3f} | {q['graininess_test']:.1f} | floor {q['swd_floor']:.1f} | |"
    )
    return results


def _c2st(r: dict) -> str:
    return "off" if r["c2st"] is None else f"{r['c2st']:.3f} +- {r['c2st_se']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a refiner")
    t.add_argument("--name", required=True)
    t.add_argument("--steps", type=int, default=None, help=f"train.steps (default {RECIPE['train.steps']})")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="over params.yaml and RECIPE")
    s = sub.add_parser("score", help="denoiser rows and scored walks with and without a refiner")
    s.add_argument("--models", default="models", help="the main model's folder")
    s.add_argument("--refiner", required=True, help="a refiner's models folder (from `train`)")
    s.add_argument("--rows", nargs="+", default=["ancestral", "ancestral+refiner"], help="SAMPLER[+refiner]")
    s.add_argument("--count", type=int, default=None, help="sprites per row (default: sample.count)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="over params.yaml")
    t.add_argument("--out", default="reports/refiner", help="the refiner goes to OUT/NAME/models")
    s.add_argument("--out", default="reports/refiner/score", help="rows cached here (OUT/ROW.json, OUT/ROW.png)")
    for p in (t, s):
        p.add_argument("--processed", default="data/processed")
    args = ap.parse_args()
    t0 = time.perf_counter()
    _, sets = parse_row(" ".join([args.command, *args.set]))  # the sweep's KEY=VALUE parsing
    if args.command == "train":
        print(json.dumps(train_refiner(args.name, args.steps, sets, args.processed, Path(args.out))))
    else:
        score_rows(args.models, args.refiner, args.rows, args.processed, Path(args.out), args.count, sets)
    print(f"refiner: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    run(main)
