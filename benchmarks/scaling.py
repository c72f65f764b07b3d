"""The scaling curve: sample quality against images seen, from one long run of a recipe.

    python benchmarks/scaling.py                          # train (resuming) and score every budget
    python benchmarks/scaling.py --score-only --threads 1 # score the snapshots written so far
    python benchmarks/scaling.py --docs                   # also write docs/scaling.{csv,png}
    python benchmarks/scaling.py --name lr5e-4 --set train.lr=0.0005 --docs   # the committed curve
    python benchmarks/scaling.py --name hflip --set train.hflip=true   # another recipe's curve
    python benchmarks/scaling.py --guide-ratio 4 --guidance 2   # autoguided by the snapshot at 1/4

One run of params.yaml (with --set's changes) trains at a constant learning rate after warm-up
(train.cosine_decay = false), so its schedule does not end at any budget, for as many steps as the
largest budget needs; the weights are saved at every budget (vdm.training.loop: snapshot_steps).
Each snapshot is then scored as the sample and evaluate stages score a model: sample.count
sprites from the EMA weights with params.yaml's sampler and seed, the classifier two-sample test
beside its floor, their parts, palette, flatness, SWD and graininess beside the test split's,
and the test bound (one time sample per
image). The snapshots carry no post-training fits (gamma_0 stays the learned one).

The run is resumable (train.checkpoint_every) and every scored budget is cached in
OUT/NAME/scores/ with the sample and evaluate settings it was scored with (a row scored with
other settings, e.g. `--set sample.temperature=0.5`, is scored again), so the command can be
stopped and rerun at any time, and --score-only can score the snapshots of a run still
training. Writes OUT/NAME/scaling.csv, scaling.png (each figure against images seen, log
axis, the test sprites' value as a dashed line) and strip.png (8 sprites per budget, the same
seeds: one row per budget).

With --guide-ratio R and --guidance W, every budget b whose b / R is also a budget is sampled
with autoguidance (vdm.sampling.samplers.guided_denoiser): the snapshot at b / R guides with weight W.
Those rows go to their own files (scaling-guideR-wW.*), from the same seeds as the plain ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep import apply, parse_row, score  # noqa: E402

from vdm.core.errors import UserError  # noqa: E402
from vdm.core.images import image_grid, png_bytes  # noqa: E402
from vdm.core.params import parse_params  # noqa: E402
from vdm.evaluation.c2st import c2st_metric  # noqa: E402
from vdm.evaluation.metrics import SampleSets  # noqa: E402
from vdm.training.loop import Outputs, train  # noqa: E402

BUDGETS = (2_400, 4_800, 9_600, 19_200, 38_400, 76_800, 115_200, 153_600, 230_400, 307_200)  # images seen (2.1 decades)
# (figure, its test-split reference, y label, log y)
FIGURES = (
    ("c2st", "c2st_floor", "classifier accuracy (floor: train vs test)", False),
    ("parts", "parts_test", "parts per sprite", False),
    ("palette", "palette_test", "colours covering 90% of the sprite", True),
    ("flatness", "flatness_test", "flat share of the sprite", False),
    ("swd", "swd_floor", "SWD x 1000 (floor: train vs test)", False),
    ("graininess", "graininess_test", "graininess (levels)", False),
    ("test_bpd", None, "test bound (bits/dim)", False),
)
COLUMNS = ("images", "step", *(c for f in FIGURES for c in (f[0], f"{f[0]}_se")), "parts_test", "palette_test")
COLUMNS = (*COLUMNS, "flatness_test", "swd_floor", "c2st_floor", "graininess_test", "sample_s")


def run_params(sets: dict, budgets: tuple[int, ...]) -> tuple[dict, int]:
    """params.yaml with the curve's settings and `sets`; and the batch size."""
    base = yaml.safe_load(Path("params.yaml").read_text())
    raw = apply(base, sets)
    batch = raw["train"]["batch_size"]
    bad = [b for b in budgets if b % batch]
    if bad:
        raise SystemExit(f"scaling: budgets {bad} are not multiples of train.batch_size = {batch}")
    common = {
        "train.steps": max(budgets) // batch,
        "train.cosine_decay": False,
        "train.wandb": "disabled",
        "train.eval_every": 0,
        "train.sample_every": 0,
    }
    return apply(raw, common), batch


# settings of the sample and evaluate sections a score does not depend on: a cached score stays valid
UNSCORED = {"sample": ("device",), "evaluate": ("closest_pairs", "inception_weights", "filter_colours", "device")}


def _scoring(settings: dict) -> dict:
    return {sec: {k: v for k, v in d.items() if k not in UNSCORED.get(sec, ())} for sec, d in settings.items()}


def score_budget(snap: Path, cache: Path, images: int, step: int, p, train_x, test_x, guide=None, weight=1.0):
    """The figures of one snapshot (cached in `cache`, with its samples beside it)."""
    samples_path = cache.with_suffix(".npy")
    scored_with = {"sample": p.sample.model_dump(mode="json"), "evaluate": p.evaluate.model_dump(mode="json")}
    if cache.is_file() and samples_path.is_file():
        row = json.loads(cache.read_text())
        if isinstance(cached := row.pop("scored_with", None), dict) and _scoring(cached) == _scoring(scored_with):
            samples = np.load(samples_path)
            if "c2st" not in row:  # scored before the classifier test: add it from the cached samples
                ep = p.evaluate
                sets = SampleSets(samples, train_x, test_x, ep.swd_repeats, ep.seed, c2st_repeats=ep.c2st_repeats)
                row.update(c2st_metric(sets))
                cache.write_text(json.dumps({**row, "scored_with": cached}, indent=1) + "\n")
            return row, samples
    q, samples = score(snap, "ema", p, train_x, test_x, guide, weight)
    row = {"images": images, "step": step, **{k: v for k, v in q.items() if not isinstance(v, list)}}
    row["scored_with"] = scored_with
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(samples_path, samples)
    cache.write_text(json.dumps(row, indent=1) + "\n")
    del row["scored_with"]
    return row, samples


def panel(ax, title: str, xlabel: str, logy: bool) -> None:
    """One figure's axes: log x, log y where the figure wants it, its title and a grid."""
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    axes.flat[-1].axis("off")
    x = [r["images"] for r in rows]
    for ax, (key, ref, label, logy) in zip(axes.flat, FIGURES, strict=False):
        y = [r[key] for r in rows]
        err = [r.get(f"{key}_se", 0.0) for r in rows]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label="samples")
        if ref:
            floor = ref in ("swd_floor", "c2st_floor")
            ax.axhline(rows[-1][ref], color="k", ls="--", lw=1, label="floor" if floor else "test sprites")
            ax.legend(fontsize=8)
        panel(ax, label, "images seen", logy)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_table(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=list(BUDGETS), help="budgets, in images seen")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml change")
    ap.add_argument("--name", default="default", help="the recipe's name: its folder under --out")
    ap.add_argument("--score-only", action="store_true", help="no training: score the snapshots there are")
    ap.add_argument("--train-only", action="store_true", help="no scoring: train (resuming) and stop")
    ap.add_argument("--guide-ratio", type=int, default=0, help="autoguide budget b by the snapshot at b / R")
    ap.add_argument("--guidance", type=float, default=2.0, help="the autoguidance weight (with --guide-ratio)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--processed", default="data/processed")
    ap.add_argument("--out", default="reports/scaling")
    ap.add_argument("--docs", action="store_true", help="also write docs/scaling[-NAME].csv, .png and -strip.png")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    budgets = tuple(sorted(set(args.images)))
    _, sets = parse_row(" ".join(["row", *args.set]))
    raw, batch = run_params(sets, budgets)
    p = parse_params(raw)
    d = Path(args.out) / args.name
    out = Outputs(d / "models", d / "metrics", d / "plots", d / "checkpoints", snapshots=d / "snapshots")
    steps = {b: b // batch for b in budgets}
    # done: every snapshot written and the run finished (a run killed after its last snapshot
    # still holds its checkpoint: resuming writes that snapshot again, identically, and models/)
    done = all((out.snapshots / f"step-{s:06d}" / "ema.pt").is_file() for s in steps.values())
    done = done and not any(out.checkpoints.glob("*.pt"))
    (d / "params.yaml").parent.mkdir(parents=True, exist_ok=True)
    (d / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if not args.score_only and not done:
        t0 = time.perf_counter()
        r = train(p, args.processed, out, snapshot_steps=tuple(steps.values()))
        print(f"scaling: trained {p.train.steps} steps in {time.perf_counter() - t0:.0f} s ({r['img_per_s']} img/s)")
    if args.train_only:
        return

    train_x = np.load(Path(args.processed) / "train.npy", mmap_mode="r")
    test_x = np.load(Path(args.processed) / "test.npy")
    rows, strips = [], []
    guided = f"-guide{args.guide_ratio}-w{args.guidance:g}" if args.guide_ratio else ""
    for images, step in steps.items():
        snap = out.snapshots / f"step-{step:06d}"
        guide = None
        if args.guide_ratio:
            if images % args.guide_ratio or images // args.guide_ratio not in steps:
                continue
            guide = out.snapshots / f"step-{steps[images // args.guide_ratio]:06d}"
        if not (snap / "ema.pt").is_file():
            print(f"scaling: {images} images (step {step}): no snapshot yet")
            continue
        cache = d / f"scores{guided}" / f"step-{step:06d}.json"
        row, samples = score_budget(snap, cache, images, step, p, train_x, test_x, guide, args.guidance)
        rows.append(row)
        strips.append(samples[:8])
        print(
            f"scaling: {images:>7} images: classifier {row['c2st']:.3f} (floor {row['c2st_floor']:.3f}), "
            f"parts {row['parts']:.2f} (test {row['parts_test']:.2f}), palette "
            f"{row['palette']:.0f} ({row['palette_test']:.1f}), flatness {row['flatness']:.3f} "
            f"({row['flatness_test']:.3f}), SWD {row['swd']:.1f} +- {row['swd_se']:.1f} "
            f"(floor {row['swd_floor']:.1f}), "
            f"graininess {row['graininess']:.1f} ({row['graininess_test']:.1f}), test {row['test_bpd']:.2f} bits/dim",
            flush=True,
        )
    if not rows:
        return
    title = f"scaling: {args.name} ({' '.join(args.set) or 'params.yaml'}), constant lr after warm-up"
    targets = [(d / "scaling.csv", d / "scaling.png", d / "strip.png")]
    if args.docs:
        suffix = "" if args.name == "default" else f"-{args.name}"
        docs = Path("docs")
        targets.append(
            (docs / f"scaling{suffix}.csv", docs / f"scaling{suffix}.png", docs / f"scaling{suffix}-strip.png")
        )
    for table, picture, strip in targets:
        write_table(rows, table)
        plot(rows, picture, title)
        strip.write_bytes(png_bytes(image_grid(np.concatenate(strips), ncol=8)))
        print(f"scaling: wrote {table}, {picture}, {strip}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # bad params, damaged data, an interrupted run: one line, not a traceback
        sys.exit(f"scaling: {e}")
