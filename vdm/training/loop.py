"""The training loop: AdamW with warm-up and cosine decay, gradient clipping, EMA, periodic
validation bits/dim and sample grids, resumable checkpoints, DDP under torchrun; at the end the
gamma_0 fit, the final bits/dim, and all outputs committed together.

Reproducibility: every random draw of step s (time samples, noise, dropout, the batch)
derives from (train.seed, s, rank), never from state carried between steps. So a run
resumed from a checkpoint at step s continues exactly as an uninterrupted run would, and
the same params + data on the same machine give bit-identical weights and metrics.

The step itself is vdm/training/step.py; devices and processes are vdm/core/runtime.py.
"""

from __future__ import annotations

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

from vdm.core.atomic import Commit, journal_for, recover, write_bytes, write_json
from vdm.core.errors import UserError
from vdm.core.images import image_grid, png_bytes
from vdm.core.params import Params, SamplingOptions, as_dict
from vdm.core.progress import Progress
from vdm.core.runtime import (
    Dist,
    allow_tf32,
    close_distributed,
    init_distributed,
    peak_memory_mb,
    resolve_device,
    set_deterministic,
)
from vdm.data.splits import (
    StepBatches,
    balance_weights,
    batch_loader,
    hflip_half,
    load_split,
    to_nchw,
    train_groups,
)
from vdm.model import checkpoint as ckpt
from vdm.model.bound import estimate_bpd, fit_eps_scale, fit_gamma_0
from vdm.model.diffusion import VDM
from vdm.training.step import NonFiniteLoss, build_training, check_finite, decay_start, step_seed, train_step
from vdm.training.tracking import Tracker, run_name, write_csv

__all__ = ["NonFiniteLoss", "Interrupted", "Outputs", "train"]


class Interrupted(UserError):
    """SIGINT/SIGTERM: a checkpoint was written; rerun to resume."""


@dataclass
class Outputs:
    models: Path = Path("models")
    metrics: Path = Path("metrics")
    plots: Path = Path("plots")
    checkpoints: Path = Path("checkpoints")
    # where the EMA and raw weights are kept at the steps `train(snapshot_steps=...)` names (the
    # scaling curve's points): snapshots/step-NNNNNN/, each a models/ folder without the fits
    snapshots: Path | None = None

    @property
    def journal(self) -> Path:
        """The commit journal of the outputs above (see vdm/core/atomic.py: Commit)."""
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


def _eval_bpd(model: VDM, images: np.ndarray, n: int, seed: int, device, batch: int) -> dict:
    x = to_nchw(images[:n])
    gen = torch.Generator(device=device).manual_seed(seed)
    return estimate_bpd(model, x, time_samples=1, batch_size=batch, generator=gen, device=device)


def _sample_grid(model: VDM, count: int, steps: int, seed: int, device) -> np.ndarray:
    """The training grid: the sample stage's default options (with its final denoising step: the
    last grid is drawn after the gamma_0 fit, where z_0 alone still holds visible noise) at `steps`
    and temperature 1, the model's own walk, so the grids through training show the model alone."""
    from vdm.sampling.samplers import sample

    gen = torch.Generator(device=device).manual_seed(seed)
    x, _ = sample(model, count, SamplingOptions().replace(steps=steps, temperature=1.0), gen, device)
    return image_grid(x.permute(0, 2, 3, 1).numpy(), ncol=int(math.ceil(math.sqrt(count))))


def run_config(params: Params, processed: str | os.PathLike) -> dict:
    """What a run records of itself (a model folder's config.json less its step count, and wandb's
    config): its data, model and train settings, the hash that names its checkpoints, its name."""
    key = ckpt.config_hash(params, processed)
    sections = {k: as_dict(getattr(params, k)) for k in ("data", "model", "train")}
    return {"params": sections, "config_hash": key, "run_name": run_name(key)}


def train(
    params: Params,
    processed: str | os.PathLike = "data/processed",
    out: Outputs | None = None,
    snapshot_steps: tuple[int, ...] = (),
) -> dict:
    """Train params on processed/{train,val}.npy; write `out` (models, metrics, plots) on rank 0.
    At each of `snapshot_steps` the weights are also saved to out.snapshots (see Outputs).
    Returns the final metrics and performance figures (empty on other ranks)."""
    d = init_distributed(params.train.device)
    out = out or Outputs()
    if snapshot_steps and out.snapshots is None:
        raise ValueError("snapshot_steps needs Outputs.snapshots")
    try:
        run = _Run(params, Path(processed), out, d)
        run.snapshot_steps = frozenset(snapshot_steps)
        return run.run()
    finally:
        close_distributed(d)


class _Run:
    """One training run: the model and its optimiser, the checkpoint store, the tracker, and the
    rows logged so far. `run` is the loop; each thing it does at some steps is a method."""

    def __init__(self, params: Params, processed: Path, out: Outputs, d: Dist):
        self.params, self.tp, self.out, self.d = params, params.train, out, d
        tp, size = self.tp, params.data.image_size
        self.device = resolve_device(tp.device, "train.device", d.local_rank)
        set_deterministic(self.device)
        self.train_x, self.val_x = load_split(processed, "train"), load_split(processed, "val")
        if self.train_x.shape[1] != size:
            raise UserError(
                f"{processed}/train.npy holds {self.train_x.shape[1]}px images but data.image_size = {size}: "
                "rerun `dvc repro preprocess`"
            )
        StepBatches(len(self.train_x), tp.batch_size, tp.seed, 0, tp.steps, d.rank, d.world)  # batch size check
        # each training image's Pokémon, read (and checked) before any work where the decay balances them
        self.train_groups = train_groups(processed, len(self.train_x)) if tp.decay_balance else None
        self.config = run_config(params, processed)
        self.key = self.config["config_hash"]
        self.data_id = ckpt.data_id(processed)
        self.store = ckpt.Checkpoints(out.checkpoints, self.key)
        if d.main and recover(out.journal):
            print(
                f"train: finished moving the outputs of an interrupted run into place ({out.journal})", file=sys.stderr
            )
        self.model, self.ema, self.opt, self.sched = build_training(params, self.device)
        self.state = self._resume()
        self.eval_batch = max(1, min(64, tp.batch_size))
        self.snapshot_steps: frozenset[int] = frozenset()

    def _resume(self) -> State:
        """The saved state of this config's checkpoint loaded into the model, or a fresh State."""
        saved = self.store.load()
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.ema.load_state_dict(saved["ema"])
            self.opt.load_state_dict(saved["optimizer"])
            self.sched.load_state_dict(saved["scheduler"])
            if self.d.main:
                print(
                    f"train: resuming from {self.store.path} at step {saved['step']}/{self.tp.steps}", file=sys.stderr
                )
            return State(saved["step"], saved["train_rows"], saved["val_rows"])
        if self.d.main:
            shutil.rmtree(self.store.grids, ignore_errors=True)  # grids of an abandoned run of this config
            others = self.store.others()
            note = f" ({len(others)} checkpoint(s) of other configs left untouched in {self.out.checkpoints}/)"
            print(
                f"train: no checkpoint for this config ({self.key}); starting fresh{note if others else ''}",
                file=sys.stderr,
            )
        return State()

    def _wrapped(self) -> torch.nn.Module:
        """The module the step calls: compiled on CUDA if asked, DDP-wrapped under torchrun."""
        tp, device = self.tp, self.device
        if tp.compile and device.type == "cuda":
            self.model.net.forward = torch.compile(self.model.net.forward)
        allow_tf32(device)
        if self.d.world > 1:
            return torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        return self.model

    def save_checkpoint(self) -> None:
        if self.d.main:
            m, s = self.model, self.state
            self.store.save(
                {
                    "model": m.state_dict(),
                    "ema": self.ema.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "step": s.step,
                    "train_rows": s.train_rows,
                    "val_rows": s.val_rows,
                    "params": self.config["params"],  # a held run's state finishes other runs (branch.py)
                    "data_id": self.data_id,
                }
            )

    def snapshot(self, step: int) -> None:
        """The weights at `step`, as a models/ folder (no post-training fits), replaced whole."""
        if self.d.main:
            folder = self.out.snapshots / f"step-{step:06d}"
            ckpt.save_model(folder, self.model, self.ema.module, {**self.config, "steps": step})

    def evaluate(self, step: int) -> dict:
        """Validation bits/dim of the EMA weights: a row of plots/val.csv."""
        self.ema.module.eval()
        v = _eval_bpd(self.ema.module, self.val_x, self.tp.eval_images, self.tp.seed, self.device, self.eval_batch)
        self.state.val_rows.append(
            {
                "step": step,
                "val_bpd": v["total"],
                "val_bpd_se": v["total_se"],
                **{f"val_{k}": v[k] for k in ("diffusion", "latent", "recon")},
            }
        )
        self.tracker.log({"val/bpd": v["total"], "val/bpd_se": v["total_se"]}, step)
        return v

    def sample(self, step: int) -> None:
        """A grid of EMA samples, kept beside the checkpoint until the outputs are committed."""
        tp = self.tp
        self.ema.module.eval()
        grid = _sample_grid(self.ema.module, tp.sample_count, tp.sample_steps, tp.seed, self.device)
        write_bytes(self.store.grids / f"step-{step:06d}.png", png_bytes(grid))
        self.tracker.image("samples", grid, step, caption=f"EMA, step {step}, T={tp.sample_steps}")

    def log_row(self, step: int, loss, grad_norm: torch.Tensor, rate: float) -> None:
        """A row of plots/train.csv (the batch's terms, the endpoints, lr, gradient norm), after the
        non-finite check: the only place in the loop that reads values back from the device."""
        means = loss.means()
        if self.d.world > 1:  # the global batch's means, not rank 0's slice
            means = _mean_over_ranks(means, self.device)
        check_finite(means, step)
        row = {
            "step": step,
            **{k: means[k] for k in ("total", "diffusion", "latent", "recon")},
            "gamma_0": means["gamma_0"],
            "gamma_1": means["gamma_1"],
            "lr": self.sched.get_last_lr()[0],
            "grad_norm": float(grad_norm),
        }
        if self.d.main:
            self.state.train_rows.append(row)
            self.bar.set_postfix(batch_bpd_before_fits=f"{means['total']:.2f}", img_s=f"{rate:.1f}")
            self.tracker.log({f"train/{k}": v for k, v in row.items() if k != "step"} | {"img_per_s": rate}, step)

    def stop(self, signum: int, loss, logged: bool) -> None:
        """A signal asked the loop to stop: checkpoint (after the non-finite check) and raise Interrupted."""
        step = self.state.step
        if not logged:
            check_finite(loss.means(), step)
        self.save_checkpoint()
        self.bar.close()
        self.tracker.finish()
        raise Interrupted(
            f"interrupted by signal {signum} at step {step}/{self.tp.steps}; checkpoint "
            f"saved to {self.store.path}: rerun the stage to resume"
        )

    def run(self) -> dict:
        tp, d, device = self.tp, self.d, self.device
        train_model = self._wrapped()
        self.tracker = Tracker(tp.wandb, self.config["params"], self.config["run_name"], enabled=d.main)
        gen = torch.Generator(device=device)
        weights = balance_weights(self.train_groups, tp.decay_balance) if tp.decay_balance else None
        batches = StepBatches(
            len(self.train_x),
            tp.batch_size,
            tp.seed,
            self.state.step,
            tp.steps,
            d.rank,
            d.world,
            weights,
            decay_start(tp),
        )
        loader = batch_loader(self.train_x, batches, tp.num_workers, device.type == "cuda")
        t_start, images_seen = time.perf_counter(), 0
        # a bar in a terminal, a log line every 30 s otherwise (CI, nohup, DVC without a tty)
        self.bar = Progress(tp.steps, "train", "step", enabled=d.main, every_s=30.0, initial=self.state.step)
        self.model.train()
        with _StopFlag() as stop:
            for x in loader:
                step = self.state.step
                gen.manual_seed(step_seed(tp.seed, step, 0))  # the global batch's draws: the same on every rank
                torch.manual_seed(step_seed(tp.seed, step, d.rank, stream=1))  # dropout: per process
                if tp.hflip:
                    flips = torch.Generator().manual_seed(step_seed(tp.seed, step, 0, stream=2))
                    x = hflip_half(x, flips, d.rank, d.world)
                loss, grad_norm = train_step(
                    train_model,
                    self.model,
                    self.ema,
                    self.opt,
                    self.sched,
                    x,
                    gen,
                    device,
                    tp.grad_clip,
                    (d.rank, d.world),  # this process's slice of the global batch's draws (VDM.loss)
                )
                self.state.step = step = step + 1
                images_seen += tp.batch_size
                self.bar.update(1)
                logged = step % tp.log_every == 0 or step == tp.steps or step % tp.checkpoint_every == 0
                if logged:
                    self.log_row(step, loss, grad_norm, images_seen / (time.perf_counter() - t_start))
                last = step == tp.steps
                if d.main and tp.eval_every and step % tp.eval_every == 0 and not last:
                    self.evaluate(step)
                if d.main and tp.sample_every and step % tp.sample_every == 0 and not last and tp.sample_count:
                    self.sample(step)
                if step in self.snapshot_steps:
                    self.snapshot(step)  # before the checkpoint: a resumed run never skips one
                if step % tp.checkpoint_every == 0 and not last:
                    self.save_checkpoint()
                if stop.signal is not None:
                    self.stop(stop.signal, loss, logged)
        self.bar.close()
        wall = time.perf_counter() - t_start
        scale = self.fit_eps_scale()
        fit = self.fit_gamma_0()
        fits_s = time.perf_counter() - t_start - wall
        result = {}
        if d.main:
            result = self.finish(fit, scale, wall, images_seen, fits_s)
        if d.world > 1:
            _check_ranks_agree(self.model, d)
        self.tracker.finish()
        return result

    def fit_eps_scale(self) -> dict | None:
        """train.fit_eps_scale: the bound's eps estimate scaled per gamma by the least-squares factor
        on training images (vdm.model.bound.fit_eps_scale), fitted on the EMA weights and given to both."""
        tp = self.tp
        if not tp.fit_eps_scale:
            return None
        self.ema.module.eval()
        images = to_nchw(self.train_x[: tp.fit_images])
        fit = fit_eps_scale(self.ema.module, images, tp.seed, self.eval_batch, self.device)
        with torch.no_grad():
            self.model.eps_scale.copy_(self.ema.module.eps_scale)
        if self.d.main:
            half = "never" if fit["gamma_half"] is None else f"at gamma {fit['gamma_half']:.2f}"
            print(
                f"train: eps scale fitted at {len(fit['gamma'])} noise levels from gamma {fit['gamma'][0]:.1f} "
                f"(lowest {min(fit['scale']):.3f}; 1/2 {half})",
                file=sys.stderr,
            )
        return fit

    def fit_gamma_0(self) -> dict | None:
        """train.fit_gamma_0: gamma_0 moved to where the EMA weights' bound of training images is
        lowest (vdm.model.bound.fit_gamma_0). On every rank (deterministic): DDP replicas stay identical."""
        tp = self.tp
        if not tp.fit_gamma_0:
            return None
        self.ema.module.eval()
        fit = fit_gamma_0(
            self.ema.module, to_nchw(self.train_x[: tp.fit_images]), tp.seed, self.eval_batch, self.device
        )
        with torch.no_grad():
            self.model.schedule.endpoints[0] = fit["gamma_0"]
        if self.d.main:
            print(
                f"train: gamma_0 fitted on {min(tp.fit_images, len(self.train_x))} training images: "
                f"{fit['gamma_0_learned']:.2f} -> {fit['gamma_0']:.2f} "
                f"(bound {fit['bpd_learned']:.2f} -> {fit['bpd_fitted']:.2f} bits/dim)",
                file=sys.stderr,
            )
        return fit

    def finish(self, fit: dict | None, scale: dict | None, wall: float, images_seen: int, fits_s: float) -> dict:
        """The final bits/dim and grid, then every output committed at once; returns metrics + perf
        (with the seconds the post-training fits and the final bits/dim and grid took)."""
        tp, d = self.tp, self.d
        t_final = time.perf_counter()
        v = self.evaluate(tp.steps)
        t = _eval_bpd(self.ema.module, self.train_x, tp.eval_images, tp.seed, self.device, self.eval_batch)
        if tp.sample_count:
            self.sample(tp.steps)
        last = self.state.train_rows[-1]
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
            "eps_scale_half_gamma": scale["gamma_half"] if scale else None,  # where the fitted scale is 1/2
            "eval_images": min(tp.eval_images, len(self.val_x)),
        }
        perf = {
            "img_per_s": round(images_seen / wall, 2),
            "wall_s": round(wall, 1),  # the training steps (evaluations and grids between them included)
            "fits_s": round(fits_s, 2),  # train.fit_eps_scale and train.fit_gamma_0, after the last step
            "final_eval_s": round(time.perf_counter() - t_final, 2),  # final bits/dim (val, train) and grid
            "peak_memory_mb": round(peak_memory_mb(self.device)),
            "device": str(self.device),
            "processes": d.world,
            "steps_this_run": images_seen // tp.batch_size,
        }
        self.commit_outputs(result, perf)
        self.tracker.log({"final/" + k: v for k, v in result.items() if isinstance(v, (int, float))}, tp.steps)
        self.store.remove()
        return {**result, **perf}

    def commit_outputs(self, result: dict, perf: dict) -> None:
        """models/, plots/samples, plots/*.csv and metrics/train*.json: all of them, or (on a
        failure) none (see vdm/core/atomic.py: Commit)."""
        out, s = self.out, self.state
        with Commit(out.journal) as c:
            ckpt.write_model(c.dir(out.models), self.model, self.ema.module, {**self.config, "steps": self.tp.steps})
            grids = c.dir(out.plots / "samples")
            for f in sorted(self.store.grids.glob("step-*.png")):
                shutil.copyfile(f, grids / f.name)
            write_csv(c.file(out.plots / "train.csv"), s.train_rows)
            write_csv(c.file(out.plots / "val.csv"), s.val_rows)
            write_json(c.file(out.metrics / "train.json"), result)
            write_json(c.file(out.metrics / "train_perf.json"), perf)


def _mean_over_ranks(means: dict[str, float], device: torch.device) -> dict[str, float]:
    t = torch.tensor(list(means.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(means, (t / dist.get_world_size()).tolist(), strict=True))


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
