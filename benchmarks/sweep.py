"""Training sweep decided by the sample metric: each row trains params.yaml with a few values
changed, from the same seeds, then scores the same way the sample and evaluate stages do.

    python benchmarks/sweep.py --steps 300 --row base --row "b0 model.sigmoid_bias=0" \\
        --row "edm model.loss_weighting=edm"
    python benchmarks/sweep.py --steps 1100 --row base ...      # full-budget rows

A row is "NAME key=value ..." (values in YAML, keys as in `dvc exp run -S`); each row's
full-budget twin is `dvc exp run -S key=value ...`. Every row draws the same sprites (seed,
count, sampler and steps from params.yaml's sample section) with its EMA weights and, with
--raw, its raw weights; SWD is paired with the first row (same bootstrap draws: the
difference has a much smaller s.e. than either figure). Test bits/dim uses one time sample
per image. Finished rows are kept in OUT/NAME/row.json and reused when their params match.

Writes OUT/sweep.json, OUT/sweep.md (the table) and OUT/sweep.png (8 sprites per row).
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

from vdm.core.errors import UserError  # noqa: E402
from vdm.core.images import image_grid, png_bytes  # noqa: E402
from vdm.core.params import overlay, parse_params  # noqa: E402
from vdm.core.runtime import resolve_device  # noqa: E402
from vdm.evaluation.evaluate import sample_quality  # noqa: E402
from vdm.evaluation.metrics import memorisation, structure_summary  # noqa: E402
from vdm.model.bound import estimate_bpd  # noqa: E402
from vdm.model.checkpoint import config_hash, load_model  # noqa: E402
from vdm.sampling.sprites import generate  # noqa: E402
from vdm.training.loop import Outputs, train  # noqa: E402


def parse_row(spec: str) -> tuple[str, dict]:
    name, *pairs = spec.split()
    sets = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"sweep: row {name!r}: {pair!r} is not key=value")
        sets[key] = yaml.safe_load(value)
    return name, sets


def apply(raw: dict, sets: dict) -> dict:
    """raw params with `sets` (keys as in `dvc exp run -S`) laid over; a key params.yaml lacks stops here."""
    try:
        return overlay(raw, sets, "sweep")
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


def finished_training(d: Path, p, processed: str) -> dict | None:
    """A row's training that ended before (the train loop writes its models and metrics together)
    with these settings on this data: its metrics and rate, or None. A sweep stopped while scoring
    a row then scores it without training it again."""
    try:
        config = json.loads((d / "models" / "config.json").read_text())
        result = json.loads((d / "metrics" / "train.json").read_text())
        perf = json.loads((d / "metrics" / "train_perf.json").read_text())
    except (OSError, ValueError):
        return None
    return {**result, **perf} if config.get("config_hash") == config_hash(p, processed) else None


def _same(cached: dict, raw: dict) -> bool:
    """The cached row's params equal these, ignoring keys added to params.yaml since it ran (new keys
    default to the behaviour before them)."""
    for key, value in cached.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            if not _same(value, raw[key]):
                return False
        elif raw.get(key) != value:
            return False
    return True


def score(models: Path, which: str, p, train_x, test_x, guide: Path | None = None, guidance: float = 1.0):
    """(figures, samples) of the `which` weights in `models`, sampled as the sample stage does
    (autoguided by the EMA weights in `guide` with weight `guidance`, if given)."""
    sp, ep = p.sample, p.evaluate
    device = resolve_device(sp.device, "sample.device")
    model = load_model(models, which, device, sp.precision)[0]
    weak = None
    if guide is not None:
        weak = load_model(guide, "ema", device, sp.precision)[0]
    samples, _, secs = generate(model, sp.count, sp.options, sp.seed, device, guide=weak, guidance=guidance)
    q = sample_quality(samples, train_x, test_x, ep.swd_repeats, ep.seed, True, ep.c2st_repeats)
    q["copies"] = memorisation(samples, train_x, test_x)["copies"]
    gen = torch.Generator(device).manual_seed(ep.seed)
    bpd = estimate_bpd(model, torch.from_numpy(test_x).permute(0, 3, 1, 2), 1, ep.batch_size, gen, device)
    return {**q, "sample_s": round(secs, 1), "test_bpd": bpd["total"], "test_bpd_se": bpd["total_se"]}, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", action="append", required=True, help='"NAME key=value ..." (repeatable)')
    ap.add_argument("--steps", type=int, default=None, help="train.steps for every row (default: params.yaml)")
    ap.add_argument("--count", type=int, default=None, help="sample.count for every row (default: params.yaml)")
    ap.add_argument("--raw", action="store_true", help="also score each row's raw (non-EMA) weights")
    ap.add_argument("--processed", default="data/processed")
    ap.add_argument("--out", default="reports/sweep")
    args = ap.parse_args()

    base = yaml.safe_load(Path("params.yaml").read_text())
    common = {"train.wandb": "disabled", "train.eval_every": 0, "train.sample_every": 0}
    if args.steps:
        common["train.steps"] = args.steps
    if args.count:
        common["sample.count"] = args.count
    train_x = np.load(Path(args.processed) / "train.npy", mmap_mode="r")
    test_x = np.load(Path(args.processed) / "test.npy")
    out = Path(args.out)
    rows, strips = [], []
    for spec in args.row:
        name, sets = parse_row(spec)
        raw = apply(base, {**common, **sets})
        p = parse_params(raw)
        d = out / name
        cached = d / "row.json"
        if cached.is_file() and _same(json.loads(cached.read_text())["params"], raw):
            row = json.loads(cached.read_text())
            print(f"{name}: reusing {cached}", flush=True)
        else:
            t0 = time.perf_counter()
            if r := finished_training(d, p, args.processed):
                print(f"{name}: scoring the models it trained before ({d / 'models'})", flush=True)
                train_s = r["wall_s"] + r["fits_s"] + r["final_eval_s"]
            else:
                r = train(p, args.processed, Outputs(d / "models", d / "metrics", d / "plots", d / "checkpoints"))
                train_s = time.perf_counter() - t0
            row = {"name": name, "sets": sets, "params": raw, "train_s": round(train_s, 1)}
            row.update({k: r[k] for k in ("val_bpd", "img_per_s", "wall_s", "gamma_0", "gamma_1")})
            for which in ("ema", "model") if args.raw else ("ema",):
                q, samples = score(d / "models", which, p, train_x, test_x)
                row[which] = q
                np.save(d / f"samples-{which}.npy", samples)
            cached.write_text(json.dumps(row, indent=1) + "\n")
        if "flatness" not in row["ema"]:  # a row scored before the whole-sprite figures existed
            row["ema"].update(structure_summary(np.load(d / "samples-ema.npy"), test_x))
        rows.append(row)
        strips.append(np.load(d / "samples-ema.npy")[:8])
        ref = np.asarray(rows[0]["ema"]["swd_per_repeat"])
        for which in ("ema", "model"):
            if which in row:
                diff = np.asarray(row[which]["swd_per_repeat"]) - ref
                row[which]["swd_diff"], row[which]["swd_diff_se"] = float(diff.mean()), float(diff.std(ddof=1))
        q = row["ema"]
        print(
            f"{name}: classifier {q['c2st']:.3f} (floor {q['c2st_floor']:.3f}), "
            f"SWD {q['swd']:.1f} +- {q['swd_se']:.1f} (96 px {q['swd_96']:.1f}), paired "
            f"{q['swd_diff']:+.1f} +- {q['swd_diff_se']:.1f}, graininess {q['graininess']:.1f}, "
            f"parts {q['parts']:.2f}, palette {q['palette']:.0f}, flatness {q['flatness']:.3f}, "
            f"copies {q.get('copies', float('nan')):.1%}, "
            f"test {q['test_bpd']:.2f} bpd, {row['img_per_s']:.1f} img/s",
            flush=True,
        )
    lines = [
        "| row | changed | classifier | parts | palette | flatness | SWD (mean of levels) | paired vs first row "
        "| SWD 96 px "
        "| graininess | test bits/dim | raw weights: SWD (paired) | img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["ema"]
        changed = " ".join(f"{k}={v}" for k, v in r["sets"].items()) or "(params.yaml)"
        rawq = r.get("model")
        rawcol = f"{rawq['swd']:.1f} ({rawq['swd_diff']:+.1f} +- {rawq['swd_diff_se']:.1f})" if rawq else ""
        lines.append(
            f"| {r['name']} | {changed} | {q['c2st']:.3f} +- {q['c2st_se']:.3f} "
            f"| {q['parts']:.2f} +- {q['parts_se']:.2f} | {q['palette']:.0f} +- "
            f"{q['palette_se']:.0f} | {q['flatness']:.3f} +- {q['flatness_se']:.3f} | {q['swd']:.1f} +- "
            f"{q['swd_se']:.1f} | {q['swd_diff']:+.1f} +- {q['swd_diff_se']:.1f} | {q['swd_96']:.1f} +- "
            f"{q['swd_96_se']:.1f} | {q['graininess']:.1f} | "
            f"{q['test_bpd']:.2f} +- {q['test_bpd_se']:.2f} | {rawcol} | {r['img_per_s']:.1f} |"
        )
    q0 = rows[0]["ema"]
    lines.append(
        f"| test sprites / real floor | train vs test | {q0['c2st_floor']:.3f} | {q0['parts_test']:.2f} "
        f"| {q0['palette_test']:.1f} | "
        f"{q0['flatness_test']:.3f} | {q0['swd_floor']:.1f} +- {q0['swd_floor_se']:.1f} | | "
        f"{q0['swd_floor_96']:.1f} | {q0['graininess_test']:.1f} | | | |"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.png").write_bytes(png_bytes(image_grid(np.concatenate(strips), ncol=8)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
