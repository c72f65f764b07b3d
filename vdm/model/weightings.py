"""Weightings of the diffusion term the network trains on (`model.loss_weighting`): a registry of
functions gamma -> w(gamma) (Kingma & Gao, 2023). The bound itself is always unweighted (`elbo`).

    elbo     w = 1: the bound
    sigmoid  w = sigmoid(gamma_t + b), b = model.sigmoid_bias: about 1 at low SNR and e^(gamma_t + b) at
             high SNR, which moves the network's effort from imperceptible high-SNR detail to the coarse
             structure that sampling needs first
    min_snr  w = min(1, 5 / SNR_t) (Hang et al. 2023, min-SNR-5 written for the eps integrand)
    edm      EDM's objective (Karras et al. 2022) as a weighting of the bound's integrand (see `edm`)

Every weighting is called as fn(gamma, sigmoid_bias=...): the model's settings as keywords, of
which each takes the ones it needs. A new one is a function here with `@WEIGHTINGS.register("name")`
and a test; params.yaml's allowed values are WEIGHTINGS' names (vdm/core/registry.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vdm.core.registry import Registry

Weighting = Callable[..., torch.Tensor]  # (gamma, **model settings) -> w(gamma), the same shape

# name -> weighting; `@WEIGHTINGS.register("name")` adds one
WEIGHTINGS: Registry[Weighting] = Registry("loss weighting", "model.loss_weighting")

MIN_SNR_GAMMA = 5.0  # Hang et al. 2023: the eps-loss weight min(SNR, 5) / SNR
# EDM's training distribution of the noise level (Karras et al. 2022): ln(sigma) ~ N(-1.2, 1.2^2),
# sigma the noise-to-signal ratio e^(gamma/2), and its data standard deviation
EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_DATA = -1.2, 1.2, 0.5


@WEIGHTINGS.register("elbo")
def elbo(gamma: torch.Tensor, **_) -> torch.Tensor:
    return torch.ones_like(gamma)


@WEIGHTINGS.register("sigmoid")
def sigmoid(gamma: torch.Tensor, *, sigmoid_bias: float, **_) -> torch.Tensor:
    return torch.sigmoid(gamma + sigmoid_bias)


@WEIGHTINGS.register("min_snr")
def min_snr(gamma: torch.Tensor, **_) -> torch.Tensor:
    """min(SNR, 5) / SNR, SNR = e^-gamma."""
    return torch.clamp(MIN_SNR_GAMMA * torch.exp(gamma), max=1.0)


@WEIGHTINGS.register("edm")
def edm(gamma: torch.Tensor, **_) -> torch.Tensor:
    """EDM's objective as a weighting of the bound's integrand over gamma (Kingma & Gao 2023): its
    log-normal density of sigma, times its loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    turned from x-space into eps-space (a factor sigma^2). As a density over gamma = 2 ln sigma it
    is N(gamma; 2 P_mean, (2 P_std)^2); scaled to peak at 1 there."""
    mean, std, sd2 = 2 * EDM_P_MEAN, 2 * EDM_P_STD, EDM_SIGMA_DATA**2
    density = torch.exp(-0.5 * torch.square((gamma - mean) / std))
    return density * (torch.exp(gamma) + sd2) / (math.exp(mean) + sd2)
