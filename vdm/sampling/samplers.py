"""Sampling a trained VDM, written in gamma = -log SNR so that any monotone schedule works: the
walk from gamma(1) down to gamma(0) with a registered sampler's steps (vdm/sampling/steps.py), the
denoisers it calls (the model's own, or autoguided), and the probability-flow encoding.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): with a
guide, a weaker model of the same kind (here the same net earlier in its training), and a weight
w > 1, every sampler's denoiser becomes x_guide + w (x_hat - x_guide): the step moves away from what
the weaker model would draw, which is mostly the errors both models share. w = 1 is no guidance.

Step spacing: `t` takes the grid at t = i / steps, so it follows the learned schedule (which
puts its steps where the training loss varies most); `logsnr` spaces gamma uniformly between
the schedule's endpoints.

Every public function here takes the sampling options whole (vdm.core.params.SamplingOptions: the
sampler, steps, spacing, clipping, the final denoising step, the temperature), as the sample stage,
the API and the `vdm` command build them.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable

import numpy as np
import torch

from vdm.core.errors import UserError
from vdm.core.params import SamplingOptions
from vdm.model.conversions import alpha_sigma, decode_nearest
from vdm.model.conversions import encode as level_centres
from vdm.model.diffusion import VDM
from vdm.sampling.steps import SAMPLERS, Step, deterministic_samplers, randn

SPACINGS = typing.get_args(SamplingOptions.model_fields["spacing"].annotation)  # ("t", "logsnr")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z, gamma of shape (B,)) -> x_hat


@torch.no_grad()
def gamma_grid(schedule: Callable, steps: int, spacing: str, device) -> torch.Tensor:
    """steps + 1 values of gamma from gamma(1) down to gamma(0) (float32, on device)."""
    if spacing == "t":
        t = torch.arange(steps, -1, -1, device=device, dtype=torch.float32) / steps
        return schedule(t)[0].float()
    if spacing == "logsnr":
        ends = schedule(torch.tensor([1.0, 0.0], device=device))[0].float()
        return torch.linspace(float(ends[0]), float(ends[1]), steps + 1, device=device)
    raise ValueError(f"unknown spacing {spacing!r}: one of {', '.join(SPACINGS)}")


def sprite_generator(seed: int, k: int, device) -> torch.Generator:
    """The random stream of sprite k of `seed`: independent streams from one seed (numpy's
    SeedSequence). Every way of drawing sprites (the sample stage, `vdm generate`, the API, the
    demo) seeds sprite k with it, so a seed draws the same sprites whatever the count and batch."""
    state = np.random.SeedSequence([seed, k]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def vdm_denoiser(
    model: VDM,
    clip: bool,
    colour: torch.Tensor | None = None,
    guidance: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Denoiser:
    """x_hat(z, gamma) of a VDM, whatever the net predicts. A self-conditioned net sees the
    previous call's estimate (clipped to [-1, 1]; zeros on the first call): make one denoiser per
    walk. A colour-conditioned net (vdm/model/colour.py) draws each sprite's `colour` class, guided
    with weight `guidance`: x_none + guidance (x_class - x_none) (two network calls a step unless the
    weight is 0 or 1) where the walk's t is in `interval` (gamma between gamma(a) and gamma(b)),
    the class alone elsewhere (guidance in a limited interval, Kynkaanniemi et al. 2024); without
    classes, unconditioned."""
    previous: list[torch.Tensor] = []
    if not getattr(model, "colour_classes", 0) or colour is None:
        colour, guidance = None, 1.0
    everywhere = colour is None or guidance == 1 or tuple(interval) == (0.0, 1.0)
    if not everywhere:  # gamma at the interval's ends, as gamma_grid computes the walk's
        ends = model.schedule(torch.tensor(interval, dtype=torch.float32, device=colour.device))[0].detach().float()
        low, high = float(ends[0]), float(ends[1])

    def estimate(z: torch.Tensor, gamma: torch.Tensor, x_self: torch.Tensor | None) -> torch.Tensor:
        weight = guidance if everywhere or low <= float(gamma[0]) <= high else 1.0  # a walk's batch shares gamma
        if colour is None or weight == 0:
            return model.x_hat(z, gamma, x_self)
        x_class = model.x_hat(z, gamma, x_self, colour)
        return x_class if weight == 1 else torch.lerp(model.x_hat(z, gamma, x_self), x_class, weight)

    def denoise(z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        if not model.self_condition:
            x_hat = estimate(z, gamma, None)
            return x_hat.clamp(-1.0, 1.0) if clip else x_hat
        x_hat = estimate(z, gamma, previous[0] if previous else None)
        previous[:] = [x_hat.clamp(-1.0, 1.0)]
        return previous[0] if clip else x_hat

    return denoise


def draw_colours(
    model: VDM, n: int, generator: torch.Generator | list[torch.Generator] | None, device
) -> torch.Tensor | None:
    """(n,) colour classes for a colour-conditioned model's sprites, drawn from the shares of its
    training images (one draw from each sprite's generator where there is a list); None without."""
    if not getattr(model, "colour_classes", 0):
        return None
    shares = model.colour_shares().float()
    if isinstance(generator, list):
        drawn = [torch.multinomial(shares.to(g.device), 1, generator=g).to(device) for g in generator]
        return torch.cat(drawn)
    at = shares if generator is None else shares.to(generator.device)
    return torch.multinomial(at, n, replacement=True, generator=generator).to(device)


def walk_start(
    model: VDM, n: int, generator: torch.Generator | list[torch.Generator] | None, device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A walk's random start, in the order `sample` draws it: z_1 ~ N(0, I), then a colour-
    conditioned model's classes for the sprites (draw_colours; None without)."""
    size = model.net.image_size
    z = randn((n, 3, size, size), generator, device)
    return z, draw_colours(model, n, generator, device)


def sprite_colours(model: VDM, count: int, seed: int, device) -> torch.Tensor | None:
    """The colour classes that sprites 0 .. count - 1 of `seed` are drawn with (by the sample stage,
    `vdm generate`, the API: each sprite from its own stream); None for a model without classes."""
    return walk_start(model, count, [sprite_generator(seed, k, device) for k in range(count)], device)[1]


def guided_denoiser(
    model: VDM,
    guide: VDM | None,
    weight: float,
    clip: bool,
    colour: torch.Tensor | None = None,
    options: SamplingOptions | None = None,
) -> Denoiser:
    """The denoiser a sampler walks with: the model's own, or with a guide and weight != 1 the
    autoguided x_guide + weight (x_hat - x_guide), clipped after mixing when asked; a colour-
    conditioned model (and guide) draw the sprites' `colour` classes, guided as `options` say
    (vdm_denoiser)."""
    options = options or SamplingOptions()
    colour_guidance = (colour, options.colour_guidance, options.colour_guidance_interval)
    if guide is None or weight == 1:
        return vdm_denoiser(model, clip, *colour_guidance)
    main = vdm_denoiser(model, False, *colour_guidance)
    weak = vdm_denoiser(guide, False, *colour_guidance)

    def denoise(z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        x_guide = weak(z, gamma)
        x_hat = torch.lerp(x_guide, main(z, gamma), weight)
        return x_hat.clamp(-1.0, 1.0) if clip else x_hat

    return denoise


def refined_denoiser(denoise: Denoiser, refiner: VDM | None, clip: bool) -> Denoiser:
    """`denoise` where gamma is above the refiner's range, the refiner's own x_hat below its top
    gamma(1): a low-noise expert, a small net trained only on that range (eDiff-I's experts, SDXL's
    refiner; `python benchmarks/refiner.py`). Without a refiner, `denoise` itself."""
    if refiner is None:
        return denoise
    low, top = vdm_denoiser(refiner, clip), float(refiner.schedule.gamma_1)

    def switched(z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return low(z, gamma) if float(gamma[0]) < top else denoise(z, gamma)  # a walk's batch shares gamma

    return switched


@torch.no_grad()
def solve(
    denoise: Denoiser,
    z: torch.Tensor,
    gammas: torch.Tensor,
    options: SamplingOptions,
    generator: torch.Generator | list[torch.Generator] | None = None,
    snapshots: set[int] = frozenset(),
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run options.sampler from z at gammas[0] to gammas[-1]; returns z there and {step index: z}
    at the indices in `snapshots` (0 = the start, len(gammas) - 1 = the end). options.temperature
    scales the ancestral steps' fresh noise (the deterministic samplers draw none)."""
    n, temperature = z.shape[0], options.temperature
    kept = {}
    step, refine, memory = SAMPLERS[options.sampler].step, SAMPLERS[options.sampler].refine, {}
    for i in range(len(gammas) - 1):
        if i in snapshots:
            kept[i] = z.clone()
        gt, gs = gammas[i], gammas[i + 1]
        x_hat = refine(denoise(z, gt.expand(n)), gt)
        z = step(Step(z, x_hat, gt, gs, generator, temperature, memory))
        if on_step is not None:
            on_step(i + 1)
    if len(gammas) - 1 in snapshots:
        kept[len(gammas) - 1] = z.clone()
    return z, kept


@torch.no_grad()
def sample(
    model: VDM,
    n: int,
    options: SamplingOptions,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: str | torch.device = "cpu",
    trajectory_points: int = 0,
    on_step: Callable[[int], None] | None = None,
    z: torch.Tensor | None = None,
    guide: VDM | None = None,
    guidance: float = 1.0,
    refiner: VDM | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """n images, (n, 3, H, W) uint8, drawn as `options` say, and `trajectory_points` snapshots of
    z_t (clipped to [-1, 1], as uint8) at evenly spaced steps from the start to the end.

    The walk starts from z_1 ~ N(0, I) drawn from `generator` (one for the batch, or a list: one
    per sample), then a colour-conditioned model's classes for the sprites (draw_colours); or from
    the given latents `z` (n, 3, H, W), e.g. those of `encode`: with a deterministic sampler (ddim,
    dpmpp_2m) that decodes them, on the unconditioned ODE that `encode` runs.

    The image is the model's decoder applied to z_0 (the nearest level to z_0 / alpha_0), or with
    options.denoise_last the nearest level to the denoiser's x_hat(z_0, gamma_0): one more network
    call that removes the noise z_0 still holds, as DDPM's last step does. It matters where gamma_0
    is high enough for that noise to be visible (a gamma_0 fitted to the bound: train.fit_gamma_0).
    With a `guide` model and `guidance` w != 1 the walk is autoguided (guided_denoiser); with a
    `refiner` its steps below the refiner's range top use the refiner (refined_denoiser)."""
    device = torch.device(device)
    steps = options.steps
    colour = None  # given latents (encode's) decode on the unconditioned ODE that encoded them
    if z is None:
        z, colour = walk_start(model, n, generator, device)
    else:
        z = z.to(device=device, dtype=torch.float32)
    gammas = gamma_grid(model.schedule, steps, options.spacing, device)
    keep = set()
    if trajectory_points:
        keep = {round(i * steps / max(1, trajectory_points - 1)) for i in range(trajectory_points)}
    denoise = refined_denoiser(
        guided_denoiser(model, guide, guidance, options.clip_denoised, colour, options),
        refiner,
        options.clip_denoised,
    )
    z, kept = solve(denoise, z, gammas, options, generator, keep, on_step)
    traj = [((kept[i].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu() for i in sorted(kept)]
    if options.denoise_last:
        x_hat = SAMPLERS[options.sampler].refine(denoise(z, gammas[-1].expand(n)), gammas[-1])
        return decode_nearest(x_hat).cpu(), traj
    alpha_0 = math.sqrt(float(torch.sigmoid(-gammas[-1])))
    return decode_nearest(z / alpha_0).cpu(), traj


def check_options(options: SamplingOptions) -> SamplingOptions:
    """The options, if their sampler is registered (SamplingOptions checks every other field when
    it is built); else a UserError naming the samplers."""
    SAMPLERS[options.sampler]
    return options


def check_deterministic(options: SamplingOptions) -> SamplingOptions:
    """The options, if their sampler draws no noise (encoding and decoding run the probability-flow
    ODE); else a UserError naming the samplers that do."""
    check_options(options)
    if options.sampler not in deterministic_samplers():
        choices = " or ".join(deterministic_samplers())
        raise UserError(f"the probability-flow ODE needs a deterministic sampler ({choices}), not {options.sampler!r}")
    return options


@torch.no_grad()
def encode(
    model: VDM,
    images: torch.Tensor,
    options: SamplingOptions,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Latents z_1 of images (n, 3, H, W) uint8: the probability-flow ODE of the learned schedule run
    forward, from z_0 = alpha_0 x at gamma(0) up to gamma(1), with a deterministic sampler (the same
    update rules as sampling, on the reversed gamma grid). `sample(..., z=latents)` with the same
    options runs the ODE back; the round trip is exact as steps grow."""
    check_deterministic(options)
    device = next(model.parameters()).device
    x = level_centres(images.to(device))
    gammas = gamma_grid(model.schedule, options.steps, options.spacing, device).flip(0)
    alpha_0, _ = alpha_sigma(gammas[0])
    z, _ = solve(vdm_denoiser(model, options.clip_denoised), alpha_0 * x, gammas, options, on_step=on_step)
    return z
