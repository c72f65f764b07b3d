"""Profile training and sampling with torch.profiler.

Writes, under the output folder:
    train_trace.json, sample_trace.json   Chrome / Perfetto traces (open in ui.perfetto.dev)
    train_top_ops.txt, sample_top_ops.txt the top operators by self time
    breakdown.json                        the training step split into its labelled phases
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from vdm.core.params import Params, SamplingOptions
from vdm.core.runtime import resolve_device
from vdm.data.splits import StepBatches, batch_loader, load_split
from vdm.sampling.samplers import sample
from vdm.training.step import build_training, step_seed, train_step

PHASES = ("data_load", "data_to_device", "forward", "backward", "optimizer", "ema")
WARMUP = 2


def _activities(device: torch.device):
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profile_run(
    params: Params, processed: str | os.PathLike, out: str | os.PathLike, train_steps: int, sample_steps: int
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tp, size = params.train, params.data.image_size
    device = resolve_device(tp.device, "train.device")
    try:
        data, source = load_split(processed, "train"), str(processed)
    except Exception:
        data = np.random.default_rng(0).integers(0, 256, (tp.batch_size * 4, size, size, 3), dtype=np.uint8)
        source = "random uint8 (no processed data found)"
    model, ema, opt, sched = build_training(params, device)
    steps = WARMUP + train_steps
    loader = iter(
        batch_loader(
            data, StepBatches(len(data), tp.batch_size, tp.seed, 0, steps), tp.num_workers, device.type == "cuda"
        )
    )
    gen = torch.Generator(device=device)
    sched_p = torch.profiler.schedule(wait=0, warmup=WARMUP, active=train_steps, repeat=1)
    model.train()
    with profile(activities=_activities(device), schedule=sched_p) as prof:
        t0 = None
        for step in range(steps):
            if step == WARMUP:
                t0 = time.perf_counter()
            with record_function("data_load"):
                batch = next(loader)
            gen.manual_seed(step_seed(tp.seed, step, 0))
            train_step(model, model, ema, opt, sched, batch, gen, device, tp.grad_clip)
            prof.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / train_steps
    prof.export_chrome_trace(str(out / "train_trace.json"))
    averages = prof.key_averages()
    (out / "train_top_ops.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=30))
    phase_us = {e.key: e.cpu_time_total / train_steps for e in averages if e.key in PHASES}
    total_us = sum(phase_us.values())
    breakdown = {
        "device": str(device),
        "data": source,
        "batch_size": tp.batch_size,
        "train_steps": train_steps,
        "step_s": round(wall, 4),
        "img_per_s": round(tp.batch_size / wall, 2),
        "phases_ms": {k: round(phase_us.get(k, 0) / 1000, 2) for k in PHASES},
        "phases_fraction": {k: round(phase_us.get(k, 0) / total_us, 4) for k in PHASES},
    }

    ema.module.eval()
    n = max(1, tp.sample_count)
    with profile(activities=_activities(device)) as prof:
        t0 = time.perf_counter()
        options = SamplingOptions().replace(steps=sample_steps)
        sample(ema.module, n, options, torch.Generator(device=device).manual_seed(0), device)
        sample_wall = time.perf_counter() - t0
    prof.export_chrome_trace(str(out / "sample_trace.json"))
    (out / "sample_top_ops.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    breakdown["sampler"] = {"images": n, "steps": sample_steps, "s_per_step": round(sample_wall / sample_steps, 4)}
    (out / "breakdown.json").write_text(json.dumps(breakdown, indent=2) + "\n")
    return breakdown
