"""Benchmark: training and sampling speed of the VDM at 96x96, and what each choice buys.

    python benchmarks/model.py                       # the full table (~6 minutes on a 2-core CPU)
    python benchmarks/model.py --rows default,naive  # some rows only
    python benchmarks/model.py --list                # the rows and what they change
    python benchmarks/model.py --rows fp32,bf16 --repeat 3   # each row 3 times, round-robin: medians
    python benchmarks/model.py --interleave 10 --rows fp32,bf16-unfused,bf16   # train steps in one process
    python benchmarks/model.py --preset long --rows default,c64,c32-b2 --sample-n 0   # shapes of a preset

Every row runs in its own process (so its peak memory is its own) and reports: train img/s
(the real `vdm.training.step.train_step`: forward, backward, gradient clipping, AdamW, EMA; median
of timed steps after warm-up), model FLOPs per image (torch.utils.flop_counter, forward +
backward), achieved FLOP/s and its fraction of the matmul peak measured in the same process in the
row's network dtype (a 2048^2 matmul), sampler img/s at T=256 and T=64 (the sample stage's walk at T steps),
and peak RSS (CPU) or peak allocated memory (CUDA). The table is printed and written to
--json.

--interleave N times the training step of the precision rows (fp32, bf16-unfused, bf16) in one
process instead, on one model: N blocks of 4 steps of each row in turn, each row's median step and
its ratio to the first row's, block by block. On a VM whose speed drifts by 10-20% from one
process (or minute) to the next, this is the comparison that holds.

--preset NAME lays presets/NAME.yaml over params.yaml first, so `default` is the preset's recipe
and the shape rows its net at another width or depth (the isoFLOP comparison at its budget).

Rows:
    default             params.yaml's model and batch: what `dvc repro` trains (its precision: auto)
    fp32, bf16          the default with train.precision and sample.precision set to fp32 / bf16: the
                        network under bf16 autocast against float32, in one run
    bf16-unfused        bf16 without the fused training kernels (vdm/model/fused.py; VDM_FUSED_KERNELS=0):
                        the norms' float32 round trip and the optimiser's foreach ops
    naive               the same model and math, written the obvious way: the reconstruction
                        term over the full (B, 3, 96, 96, 256) level tensor, attention as
                        explicit softmax(QK^T)V, NCHW memory layout, per-parameter AdamW
    naive-recon, naive-attention, naive-layout, naive-adamw
                        one naive choice at a time (the gain of each choice)
    compiled            the default's training step with the UNet under torch.compile (inductor;
                        on a CPU it needs a C++ compiler): warmup_s includes the compiling
    adamw               the default's training step with plain AdamW (train.update_clip off: one fused
                        kernel, against the clip's foreach ops and one read of the per-tensor rates)
    mp                  the default with model.magnitude_preserving (vdm/model/magnitude.py: normalised
                        weights, no GroupNorm)
    c32, c64, c32-b2, c48-b2, c64-b2
                        the default at another width (model.channels) and res blocks per level
                        (-b2: model.num_res_blocks 2): each shape's step cost, for the isoFLOP comparison
    gpu                 presets/gpu.yaml's full-scale model (no stem, 128 channels at
                        96/48/24/12, attention at 24 and 12); on CUDA: batch 128, bf16
                        autocast, torch.compile, TF32; on a CPU: batch 4, the precision of params.yaml, no sampler
"""

from __future__ import annotations

import argparse
import json
import math
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

NAIVE = ("recon", "attention", "layout", "adamw")
ROWS = {
    "default": (),
    "fp32": (),
    "bf16": (),
    "bf16-unfused": (),
    "naive": NAIVE,
    **{f"naive-{n}": (n,) for n in NAIVE},
    "compiled": (),
    "adamw": (),
    "mp": (),
    "gpu": (),
    **{shape: () for shape in ("c32", "c64", "c32-b2", "c48-b2", "c64-b2")},
}
# shape rows: (model.channels, model.num_res_blocks), the rest as params.yaml (the isoFLOP comparison)
SHAPES = {"c32": (32, 1), "c64": (64, 1), "c32-b2": (32, 2), "c48-b2": (48, 2), "c64-b2": (64, 2)}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(device, dtype, n: int = 2048, reps: int = 5) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def explicit_attention(self, x):
    """Attention.forward written out: softmax(Q K^T / sqrt(d)) V with the full score matrix."""
    import torch

    b, c, h, w = x.shape
    qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
    q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    out = torch.softmax(scores, dim=-1) @ v
    return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def apply_naive(choices) -> None:
    """Swap library pieces for their naive forms (this process only)."""
    import torch

    import vdm.model.decoder
    import vdm.model.diffusion
    import vdm.model.unet

    if "recon" in choices:
        full = vdm.model.decoder.log_prob_levels_full
        encode = vdm.model.decoder.encode

        def naive_nll(x, eps_0, g0, chunk=None, half_width=None):  # the window's options do not apply
            return -full(x, encode(x) + torch.exp(0.5 * g0) * eps_0, g0)

        vdm.model.diffusion.decoder_nll = naive_nll
    if "attention" in choices:
        vdm.model.unet.Attention.forward = explicit_attention


def base_params(preset: str | None):
    """params.yaml, with presets/PRESET.yaml laid over it where one is named."""
    from vdm.core.errors import UserError
    from vdm.core.params import load_params

    try:
        return load_params(ROOT / "params.yaml", preset)
    except UserError as e:
        sys.exit(f"error: {e}")


def row_params(row: str, device, preset: str | None = None):
    params = base_params(preset)
    if row in ("fp32", "bf16", "bf16-unfused"):
        precision = row[:4]
        update = {s: getattr(params, s).model_copy(update={"precision": precision}) for s in ("train", "sample")}
        return params.model_copy(update=update), params.train.batch_size, True
    if row in SHAPES or row == "mp":
        channels, blocks = SHAPES.get(row, (params.model.channels, params.model.num_res_blocks))
        update = {"channels": channels, "num_res_blocks": blocks}
        update |= {"magnitude_preserving": True} if row == "mp" else {}
        model = params.model.model_copy(update=update)
        return params.model_copy(update={"model": model}), params.train.batch_size, True
    if row in ("compiled", "adamw"):
        flag = {"compile": True} if row == "compiled" else {"update_clip": 0}
        params = params.model_copy(update={"train": params.train.model_copy(update=flag)})
        return params, params.train.batch_size, False
    if row != "gpu":
        return params, params.train.batch_size, True
    params = base_params("gpu")
    cuda = device.type == "cuda"
    if not cuda:  # a CPU runs it for its FLOP count and speed at a batch that fits in minutes
        params = params.model_copy(update={"train": params.train.model_copy(update={"compile": False})})
    return params, params.train.batch_size if cuda else 4, cuda


def run_row(row: str, steps: int, sample_n: int, preset: str | None = None) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vdm.core.runtime import resolve_precision
    from vdm.sampling.samplers import sample as draw
    from vdm.training.step import build_training, train_step

    choices = ROWS[row]
    apply_naive(choices)
    if row == "bf16-unfused":
        os.environ["VDM_FUSED_KERNELS"] = "0"  # read when a kernel is first wanted
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    params, batch, sample = row_params(row, device, preset)
    size = params.data.image_size
    model, ema, opt, sched = build_training(params, device)
    peak = matmul_peak_gflops(device, model.net_dtype)
    if "layout" in choices:
        model = model.to(memory_format=torch.contiguous_format)
    if "adamw" in choices:
        opt = torch.optim.AdamW(model.parameters(), lr=params.train.lr, foreach=False, fused=False)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    with FlopCounterMode(display=False) as fc:  # 2 images: FLOPs are linear in batch
        model.loss(x[:2].permute(0, 3, 1, 2).to(device), gen).objective.mean().backward()
    flops = fc.get_total_flops() / 2
    opt.zero_grad(set_to_none=True)
    if params.train.compile:
        model.net.forward = torch.compile(model.net.forward)

    def step():
        train_step(model, model, ema, opt, sched, x, gen, device, params.train.grad_clip)

    t0 = time.perf_counter()
    for _ in range(3 if params.train.compile else 1):  # warm-up (and compile)
        step()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    out = dict(
        row=row,
        device=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        precision=str(model.net_dtype).removeprefix("torch."),
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        batch=batch,
        step_s=round(step_s, 3),
        train_img_s=round(batch / step_s, 1),
        gflop_per_img=round(flops / 1e9, 2),
        achieved_gflops=round(flops * batch / step_s / 1e9, 1),
        matmul_peak_gflops=round(peak, 1),
        warmup_s=round(warmup_s, 1),
    )
    out["fraction_of_peak"] = round(out["achieved_gflops"] / peak, 3)
    if device.type == "cuda":
        out["peak_alloc_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    out["train_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    if sample and sample_n:
        net = ema.module
        if "layout" in choices:
            net = net.to(memory_format=torch.contiguous_format)
        net.eval()
        net.net_dtype = resolve_precision(params.sample.precision, device)
        runs = [(64, min(sample_n, params.sample.batch_size))]
        if row != "naive":  # the T=256 target is the default's; naive is compared at T=64
            runs.insert(0, (256, sample_n))
        for t_steps, n in runs:
            options = params.sample.options.replace(steps=t_steps)  # the sample stage's walk at t_steps
            draw(net, 1, options.replace(steps=2), torch.Generator(device=device).manual_seed(0), device)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            gen, chunk = torch.Generator(device=device).manual_seed(0), params.sample.batch_size
            for start in range(0, n, chunk):
                draw(net, min(chunk, n - start), options, gen, device)
            sync(device)
            dt = time.perf_counter() - t0
            out[f"sample_t{t_steps}_n"] = n
            out[f"sample_t{t_steps}_s"] = round(dt, 1)
            out[f"sample_t{t_steps}_img_s"] = round(n / dt, 3)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


COLUMNS = [
    ("row", "row"),
    ("precision", "net dtype"),
    ("params_m", "params (M)"),
    ("batch", "batch"),
    ("train_img_s", "train img/s"),
    ("gflop_per_img", "GFLOP/img (fwd+bwd)"),
    ("achieved_gflops", "achieved GFLOP/s"),
    ("matmul_peak_gflops", "matmul peak GFLOP/s"),
    ("fraction_of_peak", "of peak"),
    ("speedup", "x naive"),
    ("sample_t256_s", "T=256 sampler s (n)"),
    ("sample_t64_img_s", "T=64 sampler img/s"),
    ("train_peak_rss_mb", "train peak RSS MB"),
]


def median_row(runs: list[dict]) -> dict:
    """One row from its repeated runs: every figure the median over the runs (timings moved by up to
    20% from one process to the next on a shared 2-core VM), the run count beside it."""
    out = dict(runs[0])
    for key, value in out.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            mid = statistics.median(r[key] for r in runs)
            out[key] = int(mid) if isinstance(value, int) and mid == int(mid) else round(mid, 4)
    out["runs"] = len(runs)
    return out


def table(rows: list[dict]) -> str:
    naive = next((r for r in rows if r["row"] == "naive"), None)
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        r = dict(r)
        if naive and r["row"].startswith(("default", "naive")):
            r["speedup"] = round(r["train_img_s"] / naive["train_img_s"], 2)
        if "sample_t256_s" in r:
            r["sample_t256_s"] = f"{r['sample_t256_s']} ({r['sample_t256_n']})"
        if "peak_alloc_mb" in r:
            r["train_peak_rss_mb"] = f"{r['train_peak_rss_mb']} (CUDA alloc {r['peak_alloc_mb']})"
        lines.append("| " + " | ".join(str(r.get(k, "-")) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


PRECISION_ROWS = ("fp32", "bf16-unfused", "bf16")


def interleave(names: list[str], blocks: int, per_block: int = 4, params_path: Path = ROOT / "params.yaml") -> dict:
    """The training step of precision rows alternated in one process (see the docstring)."""
    import torch

    from vdm.core.params import load_params
    from vdm.model import fused
    from vdm.training.step import build_training, train_step

    params = load_params(params_path)
    params = params.model_copy(update={"train": params.train.model_copy(update={"precision": "bf16"})})
    device = torch.device("cpu")
    model, ema, opt, sched = build_training(params, device)
    batch, size = params.train.batch_size, params.data.image_size
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    if "bf16" in names and not fused.available():  # built before any timing
        sys.exit("error: the fused kernel did not build here: the bf16 row would be bf16-unfused")

    def use(row: str) -> None:
        model.net_dtype = torch.float32 if row == "fp32" else torch.bfloat16
        fused.use(row != "bf16-unfused")  # fp32 takes the fused optimiser step too

    def step() -> float:
        t0 = time.perf_counter()
        train_step(model, model, ema, opt, sched, x, gen, device, params.train.grad_clip)
        return time.perf_counter() - t0

    times: dict[str, list[list[float]]] = {row: [] for row in names}
    try:
        for row in names:  # warm-up
            use(row)
            step(), step()
        for _ in range(blocks):
            for row in names:
                use(row)
                times[row].append([step() for _ in range(per_block)])
    finally:
        fused.use(True)
    first = names[0]
    out = {"device": f"cpu x{torch.get_num_threads()} threads", "batch": batch, "blocks": blocks, "rows": {}}
    for row in names:
        med = statistics.median(t for b in times[row] for t in b)
        ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(times[first], times[row], strict=True)]
        out["rows"][row] = {
            "step_s": round(med, 4),
            "train_img_s": round(batch / med, 1),
            f"x_{first}": round(statistics.median(a for b in times[first] for a in b) / med, 3),
            "block_ratio_min": round(min(ratios), 3),
            "block_ratio_max": round(max(ratios), 3),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--steps", type=int, default=5, help="timed train steps per row, after warm-up")
    ap.add_argument("--sample-n", type=int, default=64, help="sprites sampled at T=256 (0: skip the sampler)")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs of every row, round-robin; the table gives each figure's median"
    )
    ap.add_argument("--json", default="reports/bench_model.json")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="N",
        help="N blocks of the precision rows' train steps in one process",
    )
    ap.add_argument("--preset", metavar="NAME", help="presets/NAME.yaml over params.yaml under every row")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.list:
        print(__doc__[__doc__.index("Rows:") :])
        return
    if args.one:
        print(json.dumps(run_row(args.one, args.steps, args.sample_n, args.preset)))
        return
    names = args.rows.split(",")
    for name in names:
        if name not in ROWS:
            sys.exit(f"error: unknown row {name!r}; rows: {', '.join(ROWS)}")
    base_params(args.preset)  # a missing preset or a key params.yaml lacks: one line before any row runs
    if args.interleave:
        if args.preset:
            sys.exit("error: --interleave times params.yaml's recipe only; drop --preset or --interleave")
        if not set(names) <= set(PRECISION_ROWS):
            sys.exit(f"error: --interleave times the rows {', '.join(PRECISION_ROWS)} only")
        result = interleave(names, args.interleave)
        for row, r in result["rows"].items():
            print(
                f"{row}: {r['train_img_s']} img/s, x{r[f'x_{names[0]}']} of {names[0]} "
                f"(blocks {r['block_ratio_min']}-{r['block_ratio_max']})"
            )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(args.repeat):  # round-robin: a machine's drift over the run reaches every row alike
        for name in names:
            sample_n = args.sample_n if name in ("default", "fp32", "bf16", "naive", "gpu") else 0
            cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--sample-n", str(sample_n)]
            cmd += ["--preset", args.preset] if args.preset else []
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if p.returncode:
                sys.exit(f"row {name} failed:\n{p.stderr}")
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            tag = f" (run {rep + 1}/{args.repeat})" if args.repeat > 1 else ""
            print(f"{name}{tag}: {time.perf_counter() - t0:.0f} s  {json.dumps(runs[name][-1])}", flush=True)
    rows = [median_row(runs[name]) for name in names]
    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print(table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
