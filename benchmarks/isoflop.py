"""The isoFLOP comparison: sample quality against the net's shape, each budget a fixed training time.

    python benchmarks/isoflop.py add RUN --budget long   # the row of a finished run (its directory)
    python benchmarks/isoflop.py                         # docs/isoflop.png from docs/isoflop.csv

Each row is one run of a budget's recipe at one shape (channels, residual blocks per level), trained
for the images its own step cost buys in the budget's time: steps = the recipe's steps x the shape's
img/s over the recipe shape's (`python benchmarks/model.py --preset long --rows default,c32-b2`).
`add` reads the run's directory as `dvc exp run` or `dvc repro` leaves it: params.yaml (shape,
steps x batch = images seen), metrics/train_perf.json (the training img/s it reached) and
metrics/eval.json (the evaluate stage's figures); a row of the same budget and shape is replaced.
The plot puts every figure against the net's parameters, one line per budget, the test sprites'
value (or the real-against-real floor) dashed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scaling import FIGURES, panel  # noqa: E402  (figure, its test-split reference, title, log y)

from vdm.core.errors import UserError  # noqa: E402
from vdm.core.params import load_params  # noqa: E402

CSV = ROOT / "docs" / "isoflop.csv"
PNG = ROOT / "docs" / "isoflop.png"
KEYS = ("budget", "channels", "blocks", "params", "img_s", "images")
COLUMNS = (*KEYS, *(c for f in FIGURES for c in (f[0], f"{f[0]}_se")), *(f[1] for f in FIGURES if f[1]))


def parameters(model, image_size: int) -> int:
    """The network's trainable parameters (the schedule's few excluded): the net's size."""
    from vdm.model.diffusion import build_vdm

    return sum(p.numel() for p in build_vdm(model, image_size).net.parameters())


def run_row(run: Path, budget: str) -> dict:
    """One run's row: its shape and images from params.yaml, its rate and figures from metrics/."""
    files = {name: run / name for name in ("params.yaml", "metrics/eval.json", "metrics/train_perf.json")}
    missing = [name for name, f in files.items() if not f.is_file()]
    if missing:
        raise UserError(f"{run} is not a finished run: {', '.join(missing)} missing (train and evaluate it first)")
    p = load_params(files["params.yaml"])
    ev = json.loads(files["metrics/eval.json"].read_text())
    perf = json.loads(files["metrics/train_perf.json"].read_text())
    if perf.get("steps_this_run") != p.train.steps:
        raise UserError(
            f"{run}: metrics/train_perf.json times {perf.get('steps_this_run')} steps of the run's "
            f"{p.train.steps} (a resumed run): its img/s is not the whole run's"
        )
    row = {
        "budget": budget,
        "channels": p.model.channels,
        "blocks": p.model.num_res_blocks,
        "params": parameters(p.model, p.data.image_size),
        "img_s": perf["img_per_s"],
        "images": p.train.steps * p.train.batch_size,
    }
    for key, ref, _, _ in FIGURES:
        row[key], row[f"{key}_se"] = ev.get(key), ev.get(f"{key}_se")
        if ref:
            row[ref] = ev.get(ref)
    return row


def read_rows(path: Path = CSV) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: (v if k == "budget" or v == "" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def write_rows(rows: list[dict], path: Path = CSV) -> None:
    rows = sorted(rows, key=lambda r: (r["budget"], float(r["params"])))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in COLUMNS})


def _cell(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, str):
        return v
    return str(int(v)) if float(v).is_integer() else f"{float(v):.4g}"


def add(rows: list[dict], row: dict) -> list[dict]:
    """rows with `row`, replacing one of the same budget and shape."""
    same = (row["budget"], int(row["channels"]), int(row["blocks"]))
    return [r for r in rows if (r["budget"], int(r["channels"]), int(r["blocks"])) != same] + [row]


def plot(rows: list[dict], path: Path = PNG) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    axes.flat[-1].axis("off")
    budgets = sorted(
        {r["budget"] for r in rows}, key=lambda b: min(float(r["images"]) for r in rows if r["budget"] == b)
    )
    for ax, (key, ref, title, logy) in zip(axes.flat, FIGURES, strict=False):
        for i, budget in enumerate(budgets):
            rs = sorted(
                (r for r in rows if r["budget"] == budget and r.get(key) not in ("", None)),
                key=lambda r: float(r["params"]),
            )
            if not rs:
                continue
            x = [float(r["params"]) / 1e6 for r in rs]
            y = [float(r[key]) for r in rs]
            err = [float(r.get(f"{key}_se") or 0) for r in rs]
            seen = [float(r["images"]) / 1e3 for r in rows if r["budget"] == budget]
            label = f"{budget}: {min(seen):,.0f}k-{max(seen):,.0f}k images"
            line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, color=f"C{i}")
            for xi, yi, r in zip(x, y, rs, strict=True):
                ax.annotate(
                    f"{int(r['channels'])}x{int(r['blocks'])}",
                    (xi, yi),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                    color=line[0].get_color(),
                )
            refs = [float(r[ref]) for r in rs if ref and r.get(ref) not in ("", None)]
            if refs:
                ax.axhline(refs[-1], color=line[0].get_color(), ls="--", lw=0.8)
        panel(ax, title, "network parameters (millions)", logy)
        ax.legend(fontsize=8)
    fig.suptitle("Each shape trained for the images its own step cost buys in a budget's time (channels x blocks)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=("add", "plot"), default="plot")
    ap.add_argument("run", nargs="?", type=Path, help="add: the run's directory (its params.yaml and metrics/)")
    ap.add_argument("--budget", help="add: the budget the run belongs to, as docs/isoflop.csv names it (e.g. long)")
    ap.add_argument("--csv", type=Path, default=CSV)
    ap.add_argument("--png", type=Path, default=PNG)
    args = ap.parse_args()
    rows = read_rows(args.csv)
    if args.command == "add":
        if args.run is None or not args.budget:
            raise UserError(
                "add needs a run's directory and --budget NAME: python benchmarks/isoflop.py add RUN --budget long"
            )
        rows = add(rows, run_row(args.run, args.budget))
        write_rows(rows, args.csv)
        rows = read_rows(args.csv)
        print(f"isoflop: {args.csv.name} has {len(rows)} row{'s' if len(rows) > 1 else ''}")
    if not rows:
        raise UserError(f"{args.csv} has no rows: add runs first (python benchmarks/isoflop.py add RUN --budget NAME)")
    plot(rows, args.png)
    print(f"isoflop: wrote {args.png.name}")


if __name__ == "__main__":
    from stages._cli import run

    run(main)
