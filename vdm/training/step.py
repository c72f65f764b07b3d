"""One optimisation step and what it needs: the model with its EMA, AdamW and the lr schedule,
and the seeds of each step's random draws. The training loop (vdm/training/loop.py), the profiler
(vdm/training/profiling.py) and the step benchmark (benchmarks/model.py) all run this same step.
"""

from __future__ import annotations

import math

import torch

from vdm.core.errors import UserError
from vdm.core.params import Params, TrainParams
from vdm.core.runtime import resolve_precision
from vdm.data.splits import to_nchw
from vdm.model.diffusion import build_vdm, on_device
from vdm.model.unet import deepest_blocks
from vdm.training.ema import make_ema
from vdm.training.optim import ClippedAdamW


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


def decay_start(tp: TrainParams) -> int:
    """The first step at which the learning rate leaves its peak (train.steps if it never does):
    the cosine runs over the last decay_steps steps (0: every step after the warm-up)."""
    if not tp.cosine_decay:
        return tp.steps
    return max(tp.warmup_steps, tp.steps - (tp.decay_steps or tp.steps - tp.warmup_steps))


def lr_factor(step: int, tp: TrainParams) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then held until decay_start,
    then with cosine decay a cosine to final_lr_fraction. Until its decay starts a run steps as a
    held one does, so a held run's checkpoint can be finished by any such decay (warm-up, stable,
    decay)."""
    if step < tp.warmup_steps:
        return (step + 1) / tp.warmup_steps
    start = decay_start(tp)
    decay = tp.steps - start
    if step < start or decay <= 0:
        return 1.0
    progress = min(1.0, (step - start) / decay)
    return tp.final_lr_fraction + (1 - tp.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """The seed of one stream of step `step`'s draws on `rank` (0: times and noise, 1: dropout,
    2: the flip mask): a function of (seed, step, rank) alone, so a resumed run draws what an
    uninterrupted one would."""
    return (((seed * 1_000_003 + step) * 1_009 + rank) * 17 + stream) % (2**63 - 1)


def build_training(params: Params, device: torch.device):
    """(model, EMA, optimiser, lr scheduler) for params, on device, freshly initialised: AdamW, or
    with train.update_clip its update-clipped form (vdm/training/optim.py)."""
    tp = params.train
    model = on_device(build_vdm(params.model, params.data.image_size), device)  # channels_last where it pays
    model.net_dtype = resolve_precision(tp.precision, device, "train.precision")  # the EMA copy keeps it
    ema = make_ema(model, tp.ema_decay)
    groups = param_groups(model, tp)
    hyper = dict(lr=tp.lr, betas=(0.9, tp.adam_beta2), eps=tp.adam_eps, weight_decay=tp.weight_decay)
    if tp.update_clip:
        opt = ClippedAdamW(groups, **hyper, threshold=tp.update_clip)
    else:
        # one kernel over all parameters: 4x faster than foreach on a 2-core CPU (8.4M parameters)
        fused = device.type in ("cpu", "cuda")
        opt = torch.optim.AdamW(groups, **hyper, foreach=not fused, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tp))
    return model, ema, opt, sched


def param_groups(model, tp: TrainParams) -> list[dict]:
    """AdamW's parameter groups: every parameter at train.lr, except the blocks at the net's smallest
    feature map (vdm.model.unet.deepest_blocks) at lr x deep_lr_scale and the learned noise schedule's
    parameters at lr x schedule_lr_scale, each where its scale is not 1."""
    scales = {"schedule.": tp.schedule_lr_scale}
    if tp.deep_lr_scale != 1:
        scales.update({f"net.{name}.": tp.deep_lr_scale for name in deepest_blocks(model.net)})
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)
        groups.setdefault(scale, []).append(p)
    ordered = sorted(groups.items(), reverse=True)  # the rest first, as a single group when nothing is scaled
    return [{"params": ps} if s == 1 else {"params": ps, "lr": tp.lr * s} for s, ps in ordered]


def train_step(train_model, model, ema, opt, sched, batch, gen, device, grad_clip: float, shard=(0, 1)):
    """One optimisation step on a (B, H, W, 3) uint8 batch; returns (Loss, grad norm). With AdamW
    nothing in it reads a value back from the device, so on a GPU the host queues the next step at
    once; train.update_clip reads its per-tensor divisors back once a step (vdm/training/optim.py).

    `train_model` is `model` or its DDP wrapper; `shard` = (rank, processes): the batch is that
    slice of the global batch (vdm.model.diffusion.VDM.loss). Phases are labelled for torch.profiler.
    """
    with torch.profiler.record_function("data_to_device"):
        x = to_nchw(batch).to(device, non_blocking=True)
    with torch.profiler.record_function("forward"):  # the net under autocast when model.net_dtype is bf16
        loss = train_model(x, gen, shard)
        objective = loss.objective.mean()  # the bound, or the weighted objective (see vdm.model.diffusion)
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


def check_finite(loss_means: dict, step: int) -> None:
    """NonFiniteLoss naming the step and every term, if any term is NaN or infinite."""
    bad = {k: v for k, v in loss_means.items() if not math.isfinite(v)}
    if bad:
        terms = ", ".join(f"{k}={v:.4g}" for k, v in loss_means.items())
        raise NonFiniteLoss(
            f"non-finite loss at step {step} ({terms}). The last good checkpoint is kept; lower train.lr, "
            "raise train.warmup_steps or set train.grad_clip, then rerun"
        )
