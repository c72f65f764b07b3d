"""The GPU proof in one command: tests, speed, and a short full-scale run, in about 8 minutes.

    python scripts/gpu_check.py --out reports/gpu-check        # on a machine with CUDA
    python scripts/gpu_check.py --tiny --out /tmp/gpu-check    # anywhere: the same phases, tiny

Phases (each with its time budget, printed first as a plan):
  1. environment   torch, CUDA, the card and its published dense bf16 peak
  2. tests         `pytest -m cuda tests/test_cuda.py`: bf16 autocast against fp32, compiled
                   against eager, fused AdamW, resume on CUDA, DDP over nccl (skipped without CUDA)
  3. benchmark     `benchmarks/model.py --rows gpu` (presets/gpu.yaml's model, bf16 + compile):
                   img/s, model FLOP/s and the fraction of the card's peak
  4. train         presets/gpu.yaml for about --train-seconds (steps = seconds x the benchmark's
                   img/s / batch, so the run is reproducible), then the sample and evaluate stages
  5. report        OUT/report.json (every figure), grid.png, strip.png, loss.png, logs/

Everything lands under --out, so the folder can be fetched in one piece. --tiny runs the same
phases on the smoke preset (synthetic 32x32 sprites, a few steps; the benchmark's default row
for one step): CI runs it to prove the script works. The train phase needs data/processed
(`dvc repro preprocess`; pass --processed elsewhere); --tiny makes its own.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Published dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of the card's name.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def card_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS.items():  # most specific first
        if key in name:
            return peak
    return None


def environment() -> dict:
    import torch

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if env["cuda"]:
        name = torch.cuda.get_device_name(0)
        env.update(
            card=name,
            cards=torch.cuda.device_count(),
            memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            bf16_peak_tflops=card_peak(name),
            cuda_version=torch.version.cuda,
        )
    return env


class Phases:
    """Runs commands with a time budget each, logging to OUT/logs/<phase>.log."""

    def __init__(self, out: Path, budgets: dict[str, int]):
        self.out, self.budgets, self.seconds = out, budgets, {}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, phase: str, cmd: list[str], cwd: Path, share: float = 1.0) -> subprocess.CompletedProcess:
        budget = max(10, int(self.budgets[phase] * share))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
        t0 = time.perf_counter()
        with open(self.out / "logs" / f"{phase}.log", "a") as log:
            log.write(f"$ {' '.join(cmd)}  (cwd {cwd}, budget {budget} s)\n")
            log.flush()
            try:
                p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, timeout=budget)
            except subprocess.TimeoutExpired:
                p = subprocess.CompletedProcess(cmd, 124, "", "")
                log.write(f"timed out after {budget} s\n")
            log.write(p.stdout or "")
        self.seconds[phase] = round(self.seconds.get(phase, 0) + time.perf_counter() - t0, 1)
        return p


def run_params(tiny: bool, steps: int | None) -> dict:
    """params.yaml with the gpu preset (or, --tiny, the smoke preset) and this check's settings."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    preset = yaml.safe_load((ROOT / "presets" / ("smoke.yaml" if tiny else "gpu.yaml")).read_text())
    for section, values in preset.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(raw[section].get(key), dict):
                raw[section][key].update(value)
            else:
                raw[section][key] = value
    t = raw["train"]
    t["steps"] = steps if steps else 20
    t.update(
        eval_every=0,
        sample_every=0,
        checkpoint_every=t["steps"],
        warmup_steps=min(t["warmup_steps"], max(1, t["steps"] // 10)),
        wandb="disabled",
    )
    if not tiny:
        raw["sample"].update(count=64, steps=64, batch_size=64)
        raw["evaluate"].update(batch_size=128)
    return raw


def loss_chart(rows: list[dict], path: Path, width: int = 640, height: int = 320) -> None:
    """The training bound against step, as a PNG (Pillow only: nothing to install)."""
    import math

    from PIL import Image, ImageDraw

    pts = [(int(r["step"]), float(r["total"])) for r in rows if math.isfinite(float(r["total"]))]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    if len(pts) >= 2:
        xs, ys = [p[0] for p in pts], [math.log10(max(p[1], 1e-6)) for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys) + 1e-9
        pad = 40

        def xy(x, y):
            return pad + (x - x0) / max(1, x1 - x0) * (width - 2 * pad), height - pad - (y - y0) / (y1 - y0) * (
                height - 2 * pad
            )

        d.line([xy(x, y) for x, y in zip(xs, ys, strict=True)], fill=(31, 119, 180), width=2)
        d.rectangle([pad, pad, width - pad, height - pad], outline="black")
        d.text((pad, 8), f"training bound (bits/dim, log scale): {10**y1:.3g} .. {10**y0:.3g}", fill="black")
        d.text((pad, height - pad + 8), f"step {x0} .. {x1}", fill="black")
    img.save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/gpu-check", help="folder for everything this writes")
    ap.add_argument("--tiny", action="store_true", help="the same phases, tiny (CPU, about a minute)")
    ap.add_argument("--train-seconds", type=int, default=240, help="training time of the full-scale run")
    ap.add_argument("--processed", default=str(ROOT / "data" / "processed"), help="data/processed to train on")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train_s = 30 if args.tiny else args.train_seconds
    budgets = {"tests": 90, "benchmark": 120, "data": 60, "train": train_s + 120, "sample": 60, "evaluate": 90}
    print(f"gpu check -> {out}; plan (seconds at most): {json.dumps(budgets)}, total {sum(budgets.values())}")
    phases = Phases(out, budgets)
    report: dict = {"tiny": args.tiny, "env": environment()}
    print(f"environment: {json.dumps(report['env'])}", flush=True)
    if not args.tiny and not report["env"]["cuda"]:
        print("error: no CUDA device here; run with --tiny to check the script on a CPU", file=sys.stderr)
        return 2

    # 2. tests
    p = phases.run("tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"], ROOT)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    report["tests"] = {"exit": p.returncode, "summary": last}
    print(f"tests: {last}", flush=True)

    # 3. benchmark
    bench = out / "benchmark.json"
    row = (
        ["--rows", "default", "--steps", "1", "--sample-n", "0"] if args.tiny else ["--rows", "gpu", "--sample-n", "64"]
    )
    p = phases.run("benchmark", [sys.executable, "benchmarks/model.py", *row, "--json", str(bench)], ROOT)
    b = json.loads(bench.read_text())[0] if p.returncode == 0 and bench.is_file() else {}
    peak = report["env"].get("bf16_peak_tflops")
    if b and peak:
        b["fraction_of_card_peak"] = round(b["achieved_gflops"] / (peak * 1e3), 4)
    report["benchmark"] = b
    print(f"benchmark: {json.dumps(b) if b else 'failed (logs/benchmark.log)'}", flush=True)

    # 4. train, sample, evaluate in a run folder of their own
    run = out / "run"
    run.mkdir()
    steps = None
    if not args.tiny:
        batch = yaml.safe_load((ROOT / "presets/gpu.yaml").read_text())["train"]["batch_size"]
        steps = max(100, int(train_s * b.get("train_img_s", 0) / batch)) if b else 1000
    (run / "params.yaml").write_text(yaml.safe_dump(run_params(args.tiny, steps), sort_keys=False))
    if args.tiny:
        for stage in ("download", "preprocess"):
            phases.run("data", [sys.executable, "-m", f"stages.{stage}"], run, 0.5)
    else:
        processed = Path(args.processed).resolve()
        if not (processed / "train.npy").is_file():
            print(
                f"error: {processed}/train.npy not found: run `dvc repro preprocess` or pass --processed",
                file=sys.stderr,
            )
            return 2
        (run / "data").mkdir()
        (run / "data" / "processed").symlink_to(processed)
    codes = {}
    for stage in ("train", "sample", "evaluate"):
        codes[stage] = phases.run(stage, [sys.executable, "-m", f"stages.{stage}"], run).returncode
        print(f"{stage}: exit {codes[stage]} in {phases.seconds[stage]} s", flush=True)
        if codes[stage]:
            break
    for name in ("train.json", "train_perf.json", "eval.json"):
        f = run / "metrics" / name
        report[name.removesuffix(".json")] = json.loads(f.read_text()) if f.is_file() else None
    for name in ("grid.png", "strip.png"):
        if (run / "samples" / name).is_file():
            shutil.copyfile(run / "samples" / name, out / name)
    if (run / "plots" / "train.csv").is_file():
        with open(run / "plots" / "train.csv") as f:
            loss_chart(list(csv.DictReader(f)), out / "loss.png")

    # 5. report
    report["steps"] = steps or 20
    report["seconds"] = phases.seconds
    report["ok"] = report["tests"]["exit"] in (0, 5) and bool(b) and all(c == 0 for c in codes.values())
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'ok' if report['ok'] else 'FAILED'}: {out}/report.json, {sum(phases.seconds.values()):.0f} s in all")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
