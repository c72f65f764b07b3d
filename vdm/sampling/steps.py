"""The samplers' steps, a registry: SAMPLERS, name -> step function (`@sampler("name", ...)`).

Every sampler walks a grid gamma_0 > ... (from gamma(1) down to gamma(0)) and needs only a
denoiser x_hat(z, gamma), the estimate of the data given z_t (clipped to [-1, 1] when asked).
With alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma), lambda = -gamma / 2 = log(alpha / sigma)
and a step from gamma_t to gamma_s < gamma_t:

    ancestral  z_s ~ q(z_s | z_t, x = x_hat): mean (alpha_s / alpha_t) e^(gamma_s - gamma_t) z_t
               + alpha_s c x_hat, variance sigma_s^2 c, c = 1 - SNR_t / SNR_s (the paper's sampler);
               with a temperature T < 1 the fresh noise is scaled by T (standard deviation T sigma_s sqrt(c)):
               a colder walk, fewer sprites' worth of variety for less of the noise the net fails to remove
    ddim       z_s = alpha_s x_hat + sigma_s eps_hat, eps_hat = (z_t - alpha_t x_hat) / sigma_t
               (Song et al. 2021, eta = 0: the probability-flow ODE to first order)
    dpmpp_2m   z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) D, h = lambda_s - lambda_t,
               D = x_hat on the first step, else (1 + 1/2r) x_hat - (1/2r) x_hat_prev with
               r = h_prev / h (Lu et al. 2022, DPM-Solver++(2M): second order, one net call a step)
    sprite     ancestral, with every x_hat below gamma PALETTE_START pulled toward a palette of the
               sprite's own: x_hat + w (P(x_hat) - x_hat), P the sprite repainted in at most
               PALETTE_COLOURS flat colours found from x_hat itself (vdm.core.images.reduce_colours:
               k-means over the foreground, colours nearer than PALETTE_MERGE levels joined, no
               majority vote, which would erase one-pixel outlines; the background snapped to white),
               w rising from 0 at PALETTE_START to 1 at PALETTE_FULL. The walk continues from the
               pulled estimate, so the next steps' network calls repair the seams a repainting makes;
               the final image (sample.denoise_last) is pulled at gamma(0) as well

params.yaml's sample.sampler, the `vdm` command and the API take their choices from SAMPLERS, and
the deterministic ones (no fresh noise) are those encoding and interpolation accept. A new sampler
is one function here and its test. The walk that calls the steps is vdm/sampling/samplers.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vdm.core.images import reduce_colours
from vdm.core.registry import Registry
from vdm.model.conversions import alpha_sigma, decode_nearest, encode, eps_from_x

# the sprite sampler's palette pull (see the module docstring)
PALETTE_START = -3.0  # gamma where the pull begins: noise-to-signal e^(gamma/2) = 0.22, the layout decided
PALETTE_FULL = -8.0  # gamma from which the estimate is moved all the way onto its palette
PALETTE_COLOURS = 12  # at most this many colours per sprite (test sprites cover 90% with about 7)
PALETTE_MERGE = 24.0  # colours closer than this (levels, RGB distance) are one: each sprite keeps its own count


def randn(shape, generator: torch.Generator | list[torch.Generator] | None, device) -> torch.Tensor:
    """Standard normal noise; with a list of generators, row k comes from generator k (so each
    sample's draws do not depend on the others in its batch)."""
    if isinstance(generator, list | tuple):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device) for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device)


@dataclass(frozen=True)
class Step:
    """One step of a walk from gamma_t down (or up, when encoding) to gamma_s: z at gamma_t, the
    denoiser's x_hat there, and what a sampler may use besides. `memory` lives for one walk: a
    multistep sampler keeps its earlier steps there."""

    z: torch.Tensor
    x_hat: torch.Tensor
    gamma_t: torch.Tensor
    gamma_s: torch.Tensor
    generator: torch.Generator | list[torch.Generator] | None
    temperature: float
    memory: dict


StepFn = Callable[[Step], torch.Tensor]  # -> z at gamma_s
Refine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_hat, gamma) -> the x_hat the walk uses


def _as_is(x_hat: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return x_hat


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its step function, whether it draws noise, and what it does to each
    estimate of x before using it (the final denoised image included)."""

    step: StepFn
    deterministic: bool  # draws no noise: runs the probability-flow ODE (encoding needs one)
    refine: Refine = _as_is

    @property
    def repaints(self) -> bool:
        """Whether the walk changes the network's estimates (so it lands off an exact denoiser's data)."""
        return self.refine is not _as_is


# name -> sampler, in the order params.yaml's comment lists them; `@sampler(name, deterministic)` adds one
SAMPLERS: Registry[Sampler] = Registry("sampler", "sample.sampler")


def sampler(name: str, deterministic: bool, refine: Refine = _as_is) -> Callable[[StepFn], StepFn]:
    """Register a step function under `name` (with `refine`, applied to every x_hat the walk uses):
    params.yaml's sample.sampler, the CLI, the API and the tests take their choices from SAMPLERS."""

    def register(step: StepFn) -> StepFn:
        SAMPLERS.add(name, Sampler(step, deterministic, refine))
        return step

    return register


def deterministic_samplers() -> tuple[str, ...]:
    """The samplers that draw no noise (encoding and interpolation need one)."""
    return tuple(name for name, s in SAMPLERS.items() if s.deterministic)


@sampler("ancestral", deterministic=False)
def ancestral_step(s: Step) -> torch.Tensor:
    """z_s ~ q(z_s | z_t, x = x_hat), its fresh noise scaled by the temperature."""
    alpha_t, _ = alpha_sigma(s.gamma_t)
    alpha_s, sigma_s = alpha_sigma(s.gamma_s)
    c = -torch.expm1(s.gamma_s - s.gamma_t)
    noise = randn(s.z.shape, s.generator, s.z.device)
    return (
        (alpha_s / alpha_t) * (1 - c) * s.z + alpha_s * c * s.x_hat + s.temperature * torch.sqrt(sigma_s**2 * c) * noise
    )


@sampler("ddim", deterministic=True)
def ddim_step(s: Step) -> torch.Tensor:
    """z_s = alpha_s x_hat + sigma_s eps_hat (eta = 0)."""
    alpha_t, sigma_t = alpha_sigma(s.gamma_t)
    alpha_s, sigma_s = alpha_sigma(s.gamma_s)
    return alpha_s * s.x_hat + sigma_s * eps_from_x(s.z, s.x_hat, alpha_t, sigma_t)


@sampler("dpmpp_2m", deterministic=True)
def dpmpp_2m_step(s: Step) -> torch.Tensor:
    """DPM-Solver++(2M): second order from the previous step's x_hat (kept in `memory`)."""
    _, sigma_t = alpha_sigma(s.gamma_t)
    alpha_s, sigma_s = alpha_sigma(s.gamma_s)
    h = 0.5 * (s.gamma_t - s.gamma_s)
    d = s.x_hat
    if "x_prev" in s.memory:
        r = s.memory["h_prev"] / h
        d = (1 + 0.5 / r) * s.x_hat - (0.5 / r) * s.memory["x_prev"]
    s.memory["x_prev"], s.memory["h_prev"] = s.x_hat, h
    return (sigma_s / sigma_t) * s.z - alpha_s * torch.expm1(-h) * d


def palette_pull(x_hat: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x_hat (B, 3, H, W) in [-1, 1] at gamma (a 0-d tensor) moved a share w(gamma) of the way to
    its sprites repainted in at most PALETTE_COLOURS flat colours each (w: 0 above PALETTE_START,
    1 from PALETTE_FULL down)."""
    w = min(1.0, max(0.0, (PALETTE_START - float(gamma)) / (PALETTE_START - PALETTE_FULL)))
    if w == 0.0:
        return x_hat
    levels = decode_nearest(x_hat).permute(0, 2, 3, 1).cpu().numpy()
    flat = reduce_colours(np.ascontiguousarray(levels), PALETTE_COLOURS, vote=False, merge=PALETTE_MERGE)
    target = encode(torch.from_numpy(flat).permute(0, 3, 1, 2).to(x_hat.device)).to(x_hat.dtype)
    return torch.lerp(x_hat, target, w)


@sampler("sprite", deterministic=False, refine=palette_pull)
def sprite_step(s: Step) -> torch.Tensor:
    """The ancestral step from the palette-pulled estimate (the walk has applied palette_pull)."""
    return ancestral_step(s)
