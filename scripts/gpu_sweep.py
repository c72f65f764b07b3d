"""Training rows on one GPU machine from the GPU pack, all at once: each row is its own
`benchmarks/sweep.py` process (a small net at batch 16 leaves most of an H100/H200 idle, so
several share it), stopped at --seconds; finished rows are scored as the sweep scores them, and
every row's logged losses come back, a checkpoint's rows for one still training.

    make gpu-pack            # on the development machine: gpu-pack/ (the splits, the wheels it lacks)
    python3 scripts/gpu_sweep.py --out "$OUT" --seconds 400 \\
        --row "base 1200" --row "floor 1200 model.weight_floor=0.01" \\
        --row "lr2e3 5000 train.lr=0.002 train.cosine_decay=false"

A row is "NAME STEPS key=value ..." (sweep.py's row with its own train.steps). A --probe row
(the same form) runs benchmarks/stability.py instead: the training steps with its probes every 10
steps (where a run diverges). Writes OUT/summary.json (each row's exit code, its sweep row with
the scores, its train.csv or the checkpoint's logged rows; each probe's CSV) and
OUT/samples-NAME.npy (the first 32 sprites of each scored row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", action="append", default=[], help='"NAME STEPS key=value ..." (repeatable)')
    ap.add_argument("--probe", action="append", default=[], help='"NAME STEPS key=value ...": a stability probe')
    ap.add_argument("--pack", default="gpu-pack")
    ap.add_argument("--out", default="reports/gpu-sweep")
    ap.add_argument("--seconds", type=float, default=400, help="stop every row still running after this long")
    args = ap.parse_args()
    t0 = time.time()
    out, work = Path(args.out), ROOT / "reports" / "gpu-sweep-rows"
    out.mkdir(parents=True, exist_ok=True)
    pack = Path(args.pack)
    info = gpu_check.read_pack(pack)
    site = gpu_check.unpack_wheels(pack, info, ROOT / ".gpu-check" / "site")
    gpu_check.unpack_splits(pack, info, ROOT / "data" / "processed")
    env = {**os.environ, "PYTHONPATH": f"{site}:{ROOT}", "OMP_NUM_THREADS": "2"}
    procs = {}
    for spec in args.row:
        name, steps, *sets = spec.split()
        row = " ".join([name, *sets, "train.checkpoint_every=100", "train.device=cuda", "sample.device=cuda"])
        cmd = [sys.executable, "benchmarks/sweep.py", "--steps", steps, "--row", row, "--out", str(work / name)]
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed below, after the process ends)
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for spec in args.probe:
        name, steps, *sets = spec.split()
        sets = [*sets, "train.device=cuda"]
        cmd = [sys.executable, "benchmarks/stability.py", "--steps", steps, "--out", str(work / name)]
        cmd += [arg for s in sets for arg in ("--set", s)]
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed below, after the process ends)
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    while time.time() - t0 < args.seconds and any(p.poll() is None for p, _ in procs.values()):
        time.sleep(5)
    for p, _ in procs.values():
        if p.poll() is None:
            p.terminate()
    for p, _ in procs.values():
        p.wait()
    summary = {"seconds": round(time.time() - t0), "rows": {}}
    import numpy as np
    import torch

    for name, (p, log) in procs.items():
        log.close()
        d = work / name / name
        logged = out / f"{name}.log"
        r = {"rc": p.returncode, "log_tail": logged.read_text()[-1500:]}
        logged.unlink()
        if (work / name / "probe.csv").is_file():
            r["probe_csv"] = (work / name / "probe.csv").read_text()
        if (d / "row.json").is_file():
            row = json.loads((d / "row.json").read_text())
            row["ema"] = {k: v for k, v in row["ema"].items() if not isinstance(v, list)}
            r["row"] = row
            np.save(out / f"samples-{name}.npy", np.load(d / "samples-ema.npy")[:32])
        if (d / "plots" / "train.csv").is_file():
            r["train_csv"] = (d / "plots" / "train.csv").read_text()
        else:
            for ck in (d / "checkpoints").glob("*.pt"):
                r["train_rows"] = torch.load(ck, map_location="cpu", weights_only=True)["train_rows"]
        summary["rows"][name] = r
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: (v["rc"], "row" in v) for k, v in summary["rows"].items()}))


if __name__ == "__main__":
    main()
