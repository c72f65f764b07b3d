"""Benchmark: the preprocess stage on N synthetic 96x96 sprites (default 10,000).

    python benchmarks/preprocess.py [--count 10000] [--workers 1 2]

Draws the sprites once into a temporary folder (the download stage's synthetic source),
then runs preprocessing in a fresh process per worker count, as DVC runs a stage, and
prints wall time (process start to exit, imports included) and peak RSS of the stage
process and of its largest decode worker. Targets: <= 30 s wall, < 1.5 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vdm.core.params import parse_params  # noqa: E402
from vdm.data.sources import fetch  # noqa: E402

CHILD = """
import json, resource, sys
from vdm.core.params import parse_params
from vdm.data.preprocess import preprocess
raw, tmp, workers = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
preprocess(parse_params(raw).data, f"{tmp}/raw", f"{tmp}/out", f"{tmp}/data.json", workers=workers)
print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(source="synthetic", synthetic={"count": args.count, "seed": 0})
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        t0 = time.perf_counter()
        fetch(parse_params(raw).data, Path(tmp) / "raw")
        print(f"drew {args.count} synthetic sprites in {time.perf_counter() - t0:.1f} s")
        for workers in args.workers:
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(raw), tmp, str(workers)],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "TQDM_DISABLE": "1"},
            )
            wall = time.perf_counter() - t0
            main_kb, worker_kb = json.loads(out.stdout.strip().splitlines()[-1])
            images = json.loads((Path(tmp) / "data.json").read_text())["images"]
            results.append(
                dict(
                    workers=workers,
                    images=images,
                    wall_s=round(wall, 2),
                    img_per_s=round(images / wall),
                    peak_rss_mb=round(main_kb / 1024),
                    worker_peak_rss_mb=round(worker_kb / 1024) if workers > 1 else None,
                )
            )
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'workers':>8} {'images':>8} {'wall s':>8} {'img/s':>8} {'peak RSS MB':>12} {'worker MB':>10}")
    for r in results:
        print(
            f"{r['workers']:>8} {r['images']:>8} {r['wall_s']:>8.2f} {r['img_per_s']:>8} {r['peak_rss_mb']:>12}"
            f" {r['worker_peak_rss_mb'] or '-':>10}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
