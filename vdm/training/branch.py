"""A held run finished by a decay (warm-up, stable, decay), and a run finished with other fits or
another average of its weights.

A run held at its peak rate (train.cosine_decay false) steps exactly as a run of the same settings
whose decay has not yet started (vdm.training.step.lr_factor: with train.decay_steps the cosine
runs over the last steps only). So the state of a held run at step S, a stability probe's state
or a training checkpoint, is also the state at step S of any such run whose decay starts at S or
later: `branch` writes it as that run's checkpoint, and the train stage resumes from it and runs
the decay. One held run then gives a finished model at each length, for the cost of its decay.
A checkpoint of a decaying run branches into runs with the same schedule at any step: they differ
only in what decides no step (the fits after training, the EMA, logging), so one run's last
checkpoint finishes it with its raw weights sampled (train.ema_decay 0) for the cost of its tail.

    python scripts/branch.py reports/probe/state.pt --preset long   # then: python scripts/preset.py long
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vdm.core.errors import UserError
from vdm.core.params import Params, as_dict
from vdm.model import checkpoint as ckpt
from vdm.training.step import decay_start

# train keys that decide no step before the decay starts: a held run finishes runs that differ in
# them (the run's length and decay, when it validates, samples, logs and checkpoints, the fits after
# it, the weights' average, which no step reads) and in those that decide no step at all
# (checkpoint.NOT_HASHED)
SCHEDULE = ("steps", "cosine_decay", "decay_steps", "final_lr_fraction")
STEP_NEUTRAL = (
    *SCHEDULE,
    "ema_decay",
    "decay_balance",  # chooses the batches from the decay's start only
    *("eval_every", "eval_images", "sample_every", "sample_count", "sample_steps", "log_every", "checkpoint_every"),
    *("fit_gamma_0", "fit_eps_scale", *ckpt.NOT_HASHED),
)
STATE_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "params", "data_id")


def run_settings(sections: dict) -> dict:
    """What decides a held run's steps, from config-style sections (data, model, train)."""
    model = {**ckpt.MODEL_KEYS_ADDED, **sections["model"]}
    train = {k: v for k, v in sections["train"].items() if k not in STEP_NEUTRAL}
    return (
        {"data.image_size": sections["data"]["image_size"]}
        | {f"model.{k}": v for k, v in model.items()}
        | {f"train.{k}": v for k, v in train.items()}
    )


def branch(state_path: str | os.PathLike, params: Params, processed: str | os.PathLike, checkpoints: Path) -> Path:
    """The held state at `state_path` written as the checkpoint of `params` (in `checkpoints`, the
    train stage's folder); every problem is one UserError naming the fix."""
    path = Path(state_path)
    if not path.is_file():
        raise UserError(f"{path} not found: give a held run's state (a stability probe's state.pt or a checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file is one line
        raise UserError(f"{path} is not a readable state ({type(e).__name__}): give a held run's state.pt") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(
            f"{path} has no {', '.join(missing)}: it is not a held run's state (a stability probe's state.pt or a "
            "training checkpoint written since they record their params); rerun the held run"
        )
    held = state["params"]
    step = state["step"]
    # a run with the same rate at every step (the same schedule) steps as the state's run at every step
    same_schedule = all(held["train"].get(k) == getattr(params.train, k) for k in SCHEDULE)
    if held["train"]["cosine_decay"] and not same_schedule:
        raise UserError(
            f"{path} is from a run with a decaying rate: only a held run (train.cosine_decay false), or one with the "
            f"run's own schedule ({', '.join('train.' + k for k in SCHEDULE)}), branches"
        )
    if not same_schedule and step > (start := decay_start(params.train)):
        room = params.train.steps - step
        raise UserError(
            f"{path} is at step {step}, past step {start} where the run's decay starts: lower train.decay_steps "
            f"to at most train.steps - {step} = {room}, or branch an earlier state"
        )
    if held["train"].get("decay_balance", 0.0) != params.train.decay_balance and step > decay_start(params.train):
        raise UserError(
            f"{path} is at step {step}, inside its decay, where train.decay_balance has chosen batches: set it as the "
            "run had it, or branch a state from before the decay"
        )
    ours = run_settings({k: as_dict(getattr(params, k)) for k in ("data", "model", "train")})
    theirs = run_settings(held)
    keys = sorted(ours.keys() | theirs.keys())
    differ = [f"{k} = {ours.get(k)!r} (held: {theirs.get(k)!r})" for k in keys if ours.get(k) != theirs.get(k)]
    if state["data_id"] != ckpt.data_id(processed):
        differ.append(f"the data in {processed} (held on other data)")
    if differ:
        raise UserError(f"{path} was held with other settings: {'; '.join(differ)}: set them as the held run had them")
    store = ckpt.Checkpoints(checkpoints, ckpt.config_hash(params, processed))
    if store.path.exists():
        raise UserError(f"{store.path} exists (this run's own checkpoint): delete it (and its .sha256) to branch again")
    store.dir.mkdir(parents=True, exist_ok=True)
    run = ("model", "ema", "optimizer", "scheduler", "step")
    rows = {"train_rows": [], "val_rows": []}  # the held run's own rows stay with it
    store.save({k: state[k] for k in run} | {"params": held, "data_id": state["data_id"]} | rows)
    return store.path
