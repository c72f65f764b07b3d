"""Benchmark: the VDM at 96x96 on this machine's CPU (or a CUDA device).

    python benchmarks/model.py                  # default config + CIFAR-shaped config
    python benchmarks/model.py --configs default --sample-n 64

Each config runs in its own process (so peak RSS is its own) and reports: train img/s
(forward + backward + AdamW step, median of timed steps after warm-up), model FLOPs per
image (torch.utils.flop_counter, forward + backward), achieved FLOP/s and its fraction of
the fp32 matmul peak measured in the same process, sampler img/s at T steps (a real
ancestral-sampling run), and peak RSS.

    default  params.yaml's model section, batch 32
    cifar    shaped like the paper's CIFAR-10 net: no downsampling, 128 channels, 8 res
             blocks per path, no attention, activation checkpointing; batch 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "default": dict(batch=32, overrides={}),
    "cifar": dict(
        batch=8,
        overrides=dict(
            patch_size=1,
            channels=128,
            channel_mult=[1],
            num_res_blocks=8,
            attention_resolutions=[],
            checkpointing=True,
        ),
    ),
}


def matmul_peak_gflops(device, n: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = []
    for i in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_one(name: str, steps: int, sample_n: int, sample_steps: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vdm.diffusion import build_vdm
    from vdm.params import load_params

    cfg = CONFIGS[name]
    params = load_params(ROOT / "params.yaml")
    model_p = dataclasses.replace(params.model, **cfg["overrides"])
    size, batch = params.data.image_size, cfg["batch"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak_gflops(device)

    model = build_vdm(model_p, size).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(x, gen).total.mean().backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:  # on 2 images: FLOPs are linear in batch, memory is not
        model.loss(x[:2], gen).total.mean().backward()
    flops = fc.get_total_flops() / 2
    step()  # warm-up
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    out = dict(
        config=name,
        device=str(device),
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        batch=batch,
        step_s=round(step_s, 3),
        train_img_s=round(batch / step_s, 1),
        gflop_per_img=round(flops / 1e9, 2),
        achieved_gflops=round(flops * batch / step_s / 1e9, 1),
        matmul_peak_gflops=round(peak, 1),
    )
    out["fraction_of_peak"] = round(out["achieved_gflops"] / peak, 3)
    if sample_n:
        model.eval()
        t0 = time.perf_counter()
        model.sample(sample_n, (3, size, size), sample_steps, torch.Generator(device=device).manual_seed(0), device)
        sync(device)
        dt = time.perf_counter() - t0
        out.update(
            sample_n=sample_n, sample_steps=sample_steps, sample_s=round(dt, 1), sample_img_s=round(sample_n / dt, 3)
        )
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if device.type == "cuda":
        out["peak_cuda_alloc_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="default,cifar")
    ap.add_argument("--steps", type=int, default=5, help="timed train steps (after one warm-up)")
    ap.add_argument("--sample-n", type=int, default=16, help="images sampled (0: skip the sampler)")
    ap.add_argument("--sample-steps", type=int, default=256)
    ap.add_argument("--json", default="reports/bench_model.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        sample_n = args.sample_n if args.one == "default" else 0
        print(json.dumps(run_one(args.one, args.steps, sample_n, args.sample_steps)))
        return
    rows = []
    for name in args.configs.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--steps",
            str(args.steps),
            "--sample-n",
            str(args.sample_n),
            "--sample-steps",
            str(args.sample_steps),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            sys.exit(f"{name} failed:\n{p.stderr}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    cols = [
        "config",
        "params_m",
        "batch",
        "train_img_s",
        "gflop_per_img",
        "achieved_gflops",
        "matmul_peak_gflops",
        "fraction_of_peak",
        "sample_img_s",
        "peak_rss_mb",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "-")) for c in cols))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
