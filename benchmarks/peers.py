"""The DDPM a user would train instead, on the same data for the same wall-clock, scored with the
same metric as the VDM.

    pip install -r benchmarks/requirements-peers.txt      # diffusers, pinned (not a pipeline dependency)
    python benchmarks/peers.py                            # train, sample, score -> reports/peers/
    python benchmarks/peers.py --probe                    # only time one train step of each size

The peer is Hugging Face diffusers' unconditional image-generation recipe: `UNet2DModel`
(ResNet blocks, attention at the second-lowest level and in the middle block) predicting eps,
`DDPMScheduler` with linear betas over 1000 steps, AdamW with warm-up and cosine decay,
gradient clipping at 1, and `EMAModel` with its warm-up (inv_gamma 1, power 3/4). Two changes
for the budget, the same ones the VDM's default makes: the UNet is sized so that one training
step costs about what the VDM's does on this CPU (`--probe` measures it; see the README), and
the learning rate is 1e-3 (the recipe's 1e-4 is meant for hundreds of epochs; this budget is
about 13). It reads data/processed/train.npy, trains for metrics/train_perf.json's wall_s (the
VDM train stage's wall-clock, evaluation and sample grids included), then samples
`--count` sprites with diffusers' own DDPMPipeline: with the DDPM scheduler over
`--ddpm-steps` steps and with a DDIM scheduler over `--ddim-steps`, and scores both with the
evaluate stage's sliced Wasserstein distance and graininess (and FID/KID where Inception
weights are present).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdm.core.atomic import write_json  # noqa: E402
from vdm.core.images import image_grid, png_bytes  # noqa: E402
from vdm.evaluation.evaluate import sample_quality  # noqa: E402
from vdm.evaluation.metrics import fidelity, inception_weights  # noqa: E402

# (block_out_channels, layers_per_block): candidates for matching the VDM's step cost
SIZES = {
    "xs": ((16, 32, 64, 64), 1),
    "s": ((16, 32, 64, 128), 1),
    "m": ((16, 32, 64, 128), 2),
    "l": ((32, 64, 128, 192), 2),
}


def build_unet(size: str, image_size: int):
    from diffusers import UNet2DModel

    channels, layers = SIZES[size]
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,  # the recipe's 32 needs at least 32 channels per level
        attention_head_dim=8,
    )


def to_model_range(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1] (the recipe's normalisation)."""
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_step(unet, scheduler, opt, lr_sched, x, gen):
    noise = torch.randn(x.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), generator=gen)
    pred = unet(scheduler.add_noise(x, noise, t), t).sample
    loss = torch.nn.functional.mse_loss(pred, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    lr_sched.step()
    return loss.item()


def probe(train: np.ndarray, batch: int) -> dict:
    """Median seconds of a training step of each size (after two warm-up steps)."""
    from diffusers import DDPMScheduler

    out = {}
    for size in SIZES:
        torch.manual_seed(0)
        unet = build_unet(size, train.shape[1])
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        gen = torch.Generator().manual_seed(0)
        times = []
        for i in range(7):
            x = to_model_range(train[i * batch : (i + 1) * batch])
            t0 = time.perf_counter()
            train_step(unet, scheduler, opt, lr_sched, x, gen)
            times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in unet.parameters())
        out[size] = {"s_per_step": float(np.median(times[2:])), "params": params}
        print(f"peer {size}: {SIZES[size]}, {params / 1e6:.2f} M parameters, {out[size]['s_per_step']:.2f} s a step")
    return out


def train_peer(train: np.ndarray, args) -> tuple[object, object, dict]:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    unet = build_unet(args.size, train.shape[1])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    warmup, horizon = args.warmup, args.expected_steps

    def lr_at(step):  # linear warm-up, then cosine to 0 over the steps the budget is expected to allow
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, horizon - warmup))))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    gen = torch.Generator().manual_seed(args.seed)
    order = np.random.default_rng(args.seed)
    perm, pos, step, losses = order.permutation(len(train)), 0, 0, []
    t_start = last_print = time.perf_counter()
    while time.perf_counter() - t_start < args.seconds:
        if pos + args.batch > len(perm):
            perm, pos = order.permutation(len(train)), 0
        idx = np.sort(perm[pos : pos + args.batch])
        pos += args.batch
        loss = train_step(unet, scheduler, opt, lr_sched, to_model_range(train[idx]), gen)
        ema.step(unet.parameters())
        losses.append(loss)
        step += 1
        now = time.perf_counter()
        if now - last_print > 30:
            last_print = now
            print(f"peer: step {step}, loss {np.mean(losses[-20:]):.4f}, {now - t_start:.0f}/{args.seconds:.0f} s")
    wall = time.perf_counter() - t_start
    ema.copy_to(unet.parameters())
    return (
        unet,
        scheduler,
        {"train_steps": step, "train_wall_s": round(wall, 1), "final_loss": float(np.mean(losses[-50:]))},
    )


def sample_peer(unet, scheduler, kind: str, steps: int, count: int, batch: int, seed: int) -> tuple[np.ndarray, float]:
    from diffusers import DDIMScheduler, DDPMPipeline

    sched = scheduler if kind == "ddpm" else DDIMScheduler.from_config(scheduler.config)
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    out = []
    t0 = time.perf_counter()
    for start in range(0, count, batch):
        n = min(batch, count - start)
        images = pipe(batch_size=n, generator=gen, num_inference_steps=steps, output_type="np").images
        out.append(np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processed", default="data/processed", help="folder with train.npy and test.npy")
    ap.add_argument("--size", default="s", choices=sorted(SIZES), help="UNet size (see --probe)")
    ap.add_argument("--seconds", type=float, default=None, help="training wall-clock (default: the VDM's)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (the VDM default's)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument(
        "--expected-steps", type=int, default=650, help="cosine decay horizon (~ the steps the budget allows)"
    )
    ap.add_argument("--count", type=int, default=None, help="sprites to sample (default: sample.count)")
    ap.add_argument("--ddpm-steps", type=int, default=256)
    ap.add_argument("--ddim-steps", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/peers", help="output folder")
    ap.add_argument("--probe", action="store_true", help="only time a training step of each size")
    args = ap.parse_args()

    try:
        import diffusers  # noqa: F401
    except ImportError:
        sys.exit("error: diffusers is not installed: pip install -r benchmarks/requirements-peers.txt")
    import yaml

    processed = Path(args.processed)
    if not (processed / "train.npy").is_file():
        sys.exit(f"error: {processed}/train.npy not found: run `dvc repro preprocess` first")
    train = np.load(processed / "train.npy", mmap_mode="r")
    test = np.load(processed / "test.npy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.probe:
        write_json(out / "probe.json", probe(train, args.batch))
        return
    params = yaml.safe_load(Path("params.yaml").read_text())
    if args.seconds is None:
        args.seconds = json.loads(Path("metrics/train_perf.json").read_text())["wall_s"]
    count = args.count or params["sample"]["count"]
    repeats, eval_seed = params["evaluate"]["swd_repeats"], params["evaluate"]["seed"]

    print(f"peer: training DDPM size {args.size} for {args.seconds:.0f} s on {len(train)} sprites")
    unet, scheduler, info = train_peer(train, args)
    unet.eval()
    report = {
        "size": args.size,
        "block_out_channels": list(SIZES[args.size][0]),
        "layers_per_block": SIZES[args.size][1],
        "params": sum(p.numel() for p in unet.parameters()),
        "lr": args.lr,
        "batch": args.batch,
        **info,
    }
    weights, _, _ = inception_weights(params["evaluate"]["inception_weights"])
    for kind, steps in (("ddpm", args.ddpm_steps), ("ddim", args.ddim_steps)):
        with torch.no_grad():
            samples, secs = sample_peer(unet, scheduler, kind, steps, count, params["sample"]["batch_size"], args.seed)
        q = sample_quality(samples, train, test, repeats, eval_seed)
        row = {"steps": steps, "count": count, "sample_s": round(secs, 1), **q}
        if weights is not None:
            row.update(fidelity(samples, test, weights, torch.device("cpu")))
        report[kind] = row
        grid = image_grid(samples[:64], ncol=int(math.ceil(math.sqrt(min(64, len(samples))))))
        (out / f"ddpm-peer-{kind}.png").write_bytes(png_bytes(grid))
        print(
            f"peer {kind} {steps} steps: SWD {q['swd']:.1f} +- {q['swd_se']:.1f} (floor {q['swd_floor']:.1f}), "
            f"graininess {q['graininess']:.1f} (test {q['graininess_test']:.1f}), {secs:.0f} s for {count}"
        )
    write_json(out / "peers.json", report)


if __name__ == "__main__":
    main()
