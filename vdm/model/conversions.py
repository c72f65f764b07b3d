"""Conversions between data, levels and noise, in gamma = -log SNR.

Data x in {0..255} is mapped to the centres of 256 bins in [-1, 1]: f = (2x + 1)/256 - 1.
With alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t), z_t = alpha_t f + sigma_t eps.
"""

from __future__ import annotations

import torch

LEVELS = 256
BIN = 2.0 / LEVELS  # spacing of the 256 levels in [-1, 1]


def encode(x: torch.Tensor) -> torch.Tensor:
    """uint8 levels {0..255} -> bin centres in [-1, 1] (float32)."""
    return (2.0 * x.float() + 1.0) / LEVELS - 1.0


def alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(sigmoid(-gamma_t)) and sigma_t = sqrt(sigmoid(gamma_t)), so that
    alpha^2 + sigma^2 = 1 and gamma = log(sigma^2 / alpha^2)."""
    return torch.sqrt(torch.sigmoid(-gamma)), torch.sqrt(torch.sigmoid(gamma))


def x_from_eps(z: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The x that z = alpha x + sigma eps holds for this eps."""
    return (z - sigma * eps) / alpha


def eps_from_x(z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The eps that z = alpha x + sigma eps holds for this x."""
    return (z - alpha * x) / sigma


def decode_nearest(z_rescaled: torch.Tensor) -> torch.Tensor:
    """The most likely level for z_0 / alpha_0: the nearest bin centre, as uint8."""
    return torch.clamp(torch.round((z_rescaled + 1.0) * (LEVELS / 2) - 0.5), 0, LEVELS - 1).to(torch.uint8)
