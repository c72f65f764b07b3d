"""The training loop: AdamW with warm-up and cosine decay, gradient clipping, EMA, periodic
validation bits/dim and sample grids, resumable checkpoints, DDP under torchrun.

Reproducibility: every random draw of step s (time samples, noise, dropout, the batch)
derives from (train.seed, s, rank), never from state carried between steps. So a run
resumed from a checkpoint at step s continues exactly as an uninterrupted run would, and
the same params + data on the same machine give bit-identical weights and metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vdm import checkpoint as ckpt
from vdm.atomic import Commit, journal_for, recover, write_bytes, write_json
from vdm.data import StepBatches, batch_loader, hflip_half, load_split, to_nchw
from vdm.devices import resolve_device
from vdm.diffusion import VDM, build_vdm, estimate_bpd, fit_gamma_0
from vdm.ema import make_ema
from vdm.errors import UserError
from vdm.images import image_grid, png_bytes
from vdm.params import Params, as_dict
from vdm.progress import Progress
from vdm.tracking import Tracker, run_name, write_csv


class Interrupted(UserError):
    """SIGINT/SIGTERM: a checkpoint was written; rerun to resume."""


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def lr_factor(step: int, warmup: int, total: int, cosine: bool, final: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then cosine or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    return (((seed * 1_000_003 + step) * 1_009 + rank) * 17 + stream) % (2**63 - 1)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Outputs:
    models: Path = Path("models")
    metrics: Path = Path("metrics")
    plots: Path = Path("plots")
    checkpoints: Path = Path("checkpoints")

    @property
    def journal(self) -> Path:
        """The commit journal of the outputs above (see vdm/atomic.py: Commit)."""
        return journal_for(self.models)


@dataclass
class State:
    step: int = 0
    train_rows: list = field(default_factory=list)
    val_rows: list = field(default_factory=list)


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second one kills)."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def _check_finite(loss_means: dict, step: int) -> None:
    bad = {k: v for k, v in loss_means.items() if not math.isfinite(v)}
    if bad:
        terms = ", ".join(f"{k}={v:.4g}" for k, v in loss_means.items())
        raise NonFiniteLoss(
            f"non-finite loss at step {step} ({terms}). The last good checkpoint is kept; lower train.lr, "
            "raise train.warmup_steps or set train.grad_clip, then rerun"
        )


def _eval_bpd(model: VDM, images: np.ndarray, n: int, seed: int, device, batch: int) -> dict:
    x = to_nchw(images[:n])
    gen = torch.Generator(device=device).manual_seed(seed)
    return estimate_bpd(model, x, time_samples=1, batch_size=batch, generator=gen, device=device)


def _sample_grid(model: VDM, count: int, steps: int, seed: int, device) -> np.ndarray:
    """The training grid: the sample stage's ancestral sampler, with its final denoising step (the
    last grid is drawn after the gamma_0 fit, where z_0 alone still holds visible noise)."""
    from vdm.samplers import sample

    gen = torch.Generator(device=device).manual_seed(seed)
    x, _ = sample(model, count, steps, "ancestral", "t", gen, device, denoise_last=True)
    return image_grid(x.permute(0, 2, 3, 1).numpy(), ncol=int(math.ceil(math.sqrt(count))))


def build_training(params: Params, device: torch.device):
    """(model, EMA, AdamW, lr scheduler) for params, on device, freshly initialised."""
    tp = params.train
    model = build_vdm(params.model, params.data.image_size).to(device)
    if device.type in ("cpu", "cuda"):
        model = model.to(memory_format=torch.channels_last)
    ema = make_ema(model, tp.ema_decay)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay, foreach=not fused, fused=fused or None
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, tp.warmup_steps, tp.steps, tp.cosine_decay, tp.final_lr_fraction)
    )
    return model, ema, opt, sched


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (this CPU has no fast bf16)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def train_step(train_model, model, ema, opt, sched, batch, gen, device, grad_clip: float):
    """One optimisation step on a (B, H, W, 3) uint8 batch; returns (Loss, grad norm).

    `train_model` is `model` or its DDP wrapper. Phases are labelled for torch.profiler.
    """
    with torch.profiler.record_function("data_to_device"):
        x = to_nchw(batch).to(device, non_blocking=True)
    with torch.profiler.record_function("forward"), autocast_for(device):
        loss = train_model(x, gen)
        objective = loss.objective.mean()  # the bound, or the weighted objective (see vdm.diffusion)
    with torch.profiler.record_function("backward"):
        opt.zero_grad(set_to_none=True)
        objective.backward()
    with torch.profiler.record_function("optimizer"):
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else torch.tensor(math.nan)
        )
        opt.step()
        sched.step()
    with torch.profiler.record_function("ema"):
        ema.update_parameters(model)
    return loss, grad_norm


def train(params: Params, processed: str | os.PathLike = "data/processed", out: Outputs | None = None) -> dict:
    out = out or Outputs()
    tp, size = params.train, params.data.image_size
    d = init_distributed()
    try:
        return _train(params, tp, size, Path(processed), out, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(params: Params, tp, size: int, processed: Path, out: Outputs, d: Dist) -> dict:
    device = resolve_device(tp.device, "train.device", d.local_rank)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    train_x, val_x = load_split(processed, "train"), load_split(processed, "val")
    if train_x.shape[1] != size:
        raise UserError(
            f"{processed}/train.npy holds {train_x.shape[1]}px images but data.image_size = {size}: "
            "rerun `dvc repro preprocess`"
        )
    StepBatches(len(train_x), tp.batch_size, tp.seed, 0, tp.steps, d.rank, d.world)  # batch size check, up front

    key = ckpt.config_hash(params, processed)
    store = ckpt.Checkpoints(out.checkpoints, key)
    if d.main and recover(out.journal):
        print(f"train: finished moving the outputs of an interrupted run into place ({out.journal})", file=sys.stderr)
    model, ema, opt, sched = build_training(params, device)

    state = State()
    saved = store.load()
    if saved is not None:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = State(saved["step"], saved["train_rows"], saved["val_rows"])
        if d.main:
            print(f"train: resuming from {store.path} at step {state.step}/{tp.steps}", file=sys.stderr)
    elif d.main:
        shutil.rmtree(store.grids, ignore_errors=True)  # grids of an abandoned run of this config
        others = store.others()
        note = f" ({len(others)} checkpoint(s) of other configs left untouched in {out.checkpoints}/)" if others else ""
        print(f"train: no checkpoint for this config ({key}); starting fresh{note}", file=sys.stderr)

    train_model = model
    if tp.compile and device.type == "cuda":
        model.net.forward = torch.compile(model.net.forward)
    if d.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    config = {
        "params": {"data": as_dict(params.data), "model": as_dict(params.model), "train": as_dict(params.train)},
        "config_hash": key,
        "run_name": run_name(key),
    }
    tracker = Tracker(tp.wandb, config["params"], config["run_name"], enabled=d.main)
    gen = torch.Generator(device=device)
    loader = batch_loader(
        train_x,
        StepBatches(len(train_x), tp.batch_size, tp.seed, state.step, tp.steps, d.rank, d.world),
        tp.num_workers,
        device.type == "cuda",
    )
    eval_batch = max(1, min(64, tp.batch_size))

    def save_checkpoint():
        if d.main:
            store.save(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": state.step,
                    "train_rows": state.train_rows,
                    "val_rows": state.val_rows,
                }
            )

    def evaluate(step: int):
        ema.module.eval()
        v = _eval_bpd(ema.module, val_x, tp.eval_images, tp.seed, device, eval_batch)
        state.val_rows.append(
            {
                "step": step,
                "val_bpd": v["total"],
                "val_bpd_se": v["total_se"],
                **{f"val_{k}": v[k] for k in ("diffusion", "latent", "recon")},
            }
        )
        tracker.log({"val/bpd": v["total"], "val/bpd_se": v["total_se"]}, step)
        return v

    def sample(step: int):
        ema.module.eval()
        grid = _sample_grid(ema.module, tp.sample_count, tp.sample_steps, tp.seed, device)
        write_bytes(store.grids / f"step-{step:06d}.png", png_bytes(grid))
        tracker.image("samples", grid, step, caption=f"EMA, step {step}, T={tp.sample_steps}")

    t_start, images_seen = time.perf_counter(), 0
    # a bar in a terminal, a log line every 30 s otherwise (CI, nohup, DVC without a tty)
    bar = Progress(tp.steps, "train", "step", enabled=d.main, every_s=30.0, initial=state.step)
    model.train()
    with _StopFlag() as stop:
        for x in loader:
            step = state.step
            gen.manual_seed(step_seed(tp.seed, step, d.rank))
            torch.manual_seed(step_seed(tp.seed, step, d.rank, stream=1))  # dropout
            if tp.hflip:
                x = hflip_half(x, torch.Generator().manual_seed(step_seed(tp.seed, step, d.rank, stream=2)))
            loss, grad_norm = train_step(train_model, model, ema, opt, sched, x, gen, device, tp.grad_clip)
            state.step = step = step + 1
            images_seen += len(x) * d.world
            bar.update(1)

            log_now = step % tp.log_every == 0 or step == tp.steps or step % tp.checkpoint_every == 0
            if log_now:
                means = loss.means()
                _check_finite(means, step)
                row = {
                    "step": step,
                    **{k: means[k] for k in ("total", "diffusion", "latent", "recon")},
                    "gamma_0": means["gamma_0"],
                    "gamma_1": means["gamma_1"],
                    "lr": sched.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                }
                if d.main:
                    state.train_rows.append(row)
                    rate = images_seen / (time.perf_counter() - t_start)
                    bar.set_postfix(bound=f"{means['total']:.3f}", img_s=f"{rate:.1f}")
                    tracker.log({f"train/{k}": v for k, v in row.items() if k != "step"} | {"img_per_s": rate}, step)
            if d.main and tp.eval_every and step % tp.eval_every == 0 and step != tp.steps:
                evaluate(step)
            if d.main and tp.sample_every and step % tp.sample_every == 0 and step != tp.steps and tp.sample_count:
                sample(step)
            if step % tp.checkpoint_every == 0 and step != tp.steps:
                save_checkpoint()
            if stop.signal is not None:
                if not log_now:
                    _check_finite(loss.means(), step)
                save_checkpoint()
                bar.close()
                tracker.finish()
                raise Interrupted(
                    f"interrupted by signal {stop.signal} at step {step}/{tp.steps}; checkpoint "
                    f"saved to {store.path}: rerun the stage to resume"
                )
    bar.close()
    wall = time.perf_counter() - t_start

    fit = None
    if tp.fit_gamma_0:  # on every rank (deterministic), so DDP replicas stay identical
        ema.module.eval()
        fit = fit_gamma_0(ema.module, to_nchw(train_x[: tp.eval_images]), tp.seed, eval_batch, device)
        with torch.no_grad():
            model.schedule.endpoints[0] = fit["gamma_0"]
        if d.main:
            print(
                f"train: gamma_0 fitted on {min(tp.eval_images, len(train_x))} training images: "
                f"{fit['gamma_0_learned']:.2f} -> {fit['gamma_0']:.2f} "
                f"(bound {fit['bpd_learned']:.2f} -> {fit['bpd_fitted']:.2f} bits/dim)",
                file=sys.stderr,
            )
    result = {}
    if d.main:
        v = evaluate(tp.steps)
        t = _eval_bpd(ema.module, train_x, tp.eval_images, tp.seed, device, eval_batch)
        if tp.sample_count:
            sample(tp.steps)
        last = state.train_rows[-1]
        result = {
            "steps": tp.steps,
            "train_loss_bpd": last["total"],  # the last logged training batch (raw weights)
            "train_bpd": t["total"],
            "train_bpd_se": t["total_se"],  # EMA weights, train images
            "val_bpd": v["total"],
            "val_bpd_se": v["total_se"],
            **{f"val_{k}": v[k] for k in ("diffusion", "latent", "recon")},
            "gamma_0": fit["gamma_0"] if fit else last["gamma_0"],  # what the saved model uses
            "gamma_0_learned": last["gamma_0"],
            "gamma_1": last["gamma_1"],
            "eval_images": min(tp.eval_images, len(val_x)),
        }
        perf = {
            "img_per_s": round(images_seen / wall, 2),
            "wall_s": round(wall, 1),
            "peak_memory_mb": round(peak_memory_mb(device)),
            "device": str(device),
            "processes": d.world,
            "steps_this_run": images_seen // max(1, tp.batch_size * d.world),
        }
        with Commit(out.journal) as c:  # all of the outputs from this run, or (on a failure) none
            ckpt.write_model(c.dir(out.models), model, ema.module, {**config, "steps": tp.steps})
            grids = c.dir(out.plots / "samples")
            for f in sorted(store.grids.glob("step-*.png")):
                shutil.copyfile(f, grids / f.name)
            write_csv(c.file(out.plots / "train.csv"), state.train_rows)
            write_csv(c.file(out.plots / "val.csv"), state.val_rows)
            write_json(c.file(out.metrics / "train.json"), result)
            write_json(c.file(out.metrics / "train_perf.json"), perf)
        tracker.log({"final/" + k: v for k, v in result.items() if isinstance(v, (int, float))}, tp.steps)
        store.remove()
        result = {**result, **perf}
    if d.world > 1:
        _check_ranks_agree(model, d)
    tracker.finish()
    return result


def _check_ranks_agree(model: torch.nn.Module, d: Dist) -> None:
    """DDP keeps replicas identical; verify it (a hash of the weights, gathered from all ranks)."""
    import hashlib

    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()
    hashes = [None] * d.world
    dist.all_gather_object(hashes, digest)
    if d.main:
        same = len(set(hashes)) == 1
        print(f"ddp: {d.world} processes, weights identical across ranks: {same} ({digest[:12]})")
        if not same:
            raise UserError(f"DDP replicas diverged: weight hashes {hashes}")
