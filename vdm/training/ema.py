"""Exponential moving average of the weights, with a decay that warms up.

A fixed decay of 0.999 averages over ~1000 steps, so in a run of a few hundred steps the
EMA stays near the initial (random) weights. The decay here starts small and grows:
decay_n = min(decay, (1 + n) / (10 + n)) after n updates, so early on the EMA follows the
model and later it averages over ~1 / (1 - decay) steps.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def warmup_decay(decay: float, n: int) -> float:
    return min(decay, (1.0 + n) / (10.0 + n))


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An AveragedModel of `model` (a copy) updated with `ema.update_parameters(model)`."""

    @torch.no_grad()
    def ema_update(ema_params, params, num_averaged):
        d = warmup_decay(decay, int(num_averaged))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)
