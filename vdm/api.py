"""Use a trained model from Python: load a model directory, generate sprites, interpolate.

    from vdm.api import load
    model = load("models")                       # the train stage's output (EMA weights), on CPU
    sprites = model.generate(16, seed=3)          # (16, 96, 96, 3) uint8
    model.images(4, seed=3, steps=32)[0].save("new.png")
    frames = model.interpolate(a, b, frames=8)    # a, b: (96, 96, 3) uint8 sprites

Sampling defaults are those of the sample stage (SAMPLE_DEFAULTS, equal to params.yaml's
sample section); the same seed, settings and device give the same sprites.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vdm import samplers
from vdm.errors import UserError
from vdm.runtime import resolve_device

SAMPLE_DEFAULTS = {
    "sampler": "ancestral",
    "steps": 64,
    "spacing": "t",
    "clip_denoised": True,
    "denoise_last": True,
    "temperature": 0.8,
}
# Encoding runs the probability-flow ODE, so interpolation needs a deterministic sampler.
INTERPOLATE_DEFAULTS = {"sampler": "dpmpp_2m", "steps": 64, "spacing": "t"}


def check_sampling(sampler: str, steps: int, spacing: str, temperature: float = 1.0) -> None:
    if sampler not in samplers.SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: use one of {', '.join(samplers.SAMPLERS)}")
    if spacing not in samplers.SPACINGS:
        raise UserError(f"unknown spacing {spacing!r}: use one of {', '.join(samplers.SPACINGS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps = {steps!r}: give a whole number of at least 1")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature <= 1:
        raise UserError(f"temperature = {temperature!r}: give a number above 0 and at most 1")


class Sprites:
    """A trained VDM ready to draw sprites. Build it with `load`."""

    def __init__(self, model, config: dict, device: torch.device, path: Path):
        self.model, self.config, self.device, self.path = model, config, device, path
        self.image_size = model.net.image_size

    def __repr__(self) -> str:
        return f"Sprites({str(self.path)!r}, trained {self.config.get('steps')} steps, on {self.device})"

    def generate(
        self,
        n: int,
        seed: int = 0,
        steps: int | None = None,
        sampler: str | None = None,
        spacing: str | None = None,
        batch_size: int = 32,
        on_step: Callable[[int], None] | None = None,
        temperature: float | None = None,
    ) -> np.ndarray:
        """n new sprites, (n, H, W, 3) uint8. Sprite k of a seed is the same whatever n and
        batch_size (each has its own random stream; batched convolutions round differently, by at
        most a level on a few pixels), so asking for more extends the set. `on_step(i)` is called
        after every network evaluation of every batch (a progress bar, or a deadline that raises).
        `temperature` scales the ancestral sampler's fresh noise (default: the sample stage's)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"n = {n!r}: ask for at least 1 sprite")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size = {batch_size!r}: give a whole number of at least 1")
        sampler = sampler or SAMPLE_DEFAULTS["sampler"]
        steps = SAMPLE_DEFAULTS["steps"] if steps is None else steps
        spacing = spacing or SAMPLE_DEFAULTS["spacing"]
        temperature = SAMPLE_DEFAULTS["temperature"] if temperature is None else temperature
        check_sampling(sampler, steps, spacing, temperature)
        check_seed(seed)
        out = []
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            x, _ = samplers.sample(
                self.model,
                stop - start,
                steps,
                sampler,
                spacing,
                [sprite_generator(seed, k, self.device) for k in range(start, stop)],
                self.device,
                clip_denoised=SAMPLE_DEFAULTS["clip_denoised"],
                on_step=on_step,
                denoise_last=SAMPLE_DEFAULTS["denoise_last"],
                temperature=float(temperature),
            )
            out.append(x.permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    def images(self, n: int, seed: int = 0, **kwargs) -> list:
        """The same sprites as `generate`, as PIL images."""
        from PIL import Image

        return [Image.fromarray(a) for a in self.generate(n, seed, **kwargs)]

    def _check_sprites(self, images: np.ndarray) -> torch.Tensor:
        a = np.asarray(images)
        if a.ndim == 3:
            a = a[None]
        size = self.image_size
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (size, size, 3):
            raise UserError(f"sprites must be uint8 arrays of shape ({size}, {size}, 3), got {a.dtype} {a.shape}")
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)

    def encode(self, images: np.ndarray, steps: int | None = None, sampler: str | None = None) -> torch.Tensor:
        """Latents z_1 (n, 3, H, W) of sprites (n, H, W, 3) uint8 by the probability-flow ODE."""
        sampler, steps = _ode_settings(sampler, steps)
        x = self._check_sprites(images)
        return samplers.encode(self.model, x, steps, sampler, INTERPOLATE_DEFAULTS["spacing"])

    def decode(self, latents: torch.Tensor, steps: int | None = None, sampler: str | None = None) -> np.ndarray:
        """Sprites (n, H, W, 3) uint8 from latents z_1, the probability-flow ODE run back."""
        sampler, steps = _ode_settings(sampler, steps)
        x, _ = samplers.sample(
            self.model,
            latents.shape[0],
            steps,
            sampler,
            INTERPOLATE_DEFAULTS["spacing"],
            None,
            self.device,
            clip_denoised=SAMPLE_DEFAULTS["clip_denoised"],
            denoise_last=SAMPLE_DEFAULTS["denoise_last"],
            z=latents,
        )
        return x.permute(0, 2, 3, 1).numpy()

    def interpolate(
        self, a: np.ndarray, b: np.ndarray, frames: int = 8, steps: int | None = None, sampler: str | None = None
    ) -> np.ndarray:
        """`frames` sprites (frames, H, W, 3) uint8 from a to b: both encoded to z_1, the latents
        joined by spherical interpolation (z_1 is Gaussian: slerp keeps every frame's norm typical,
        where a straight line would pass through low-norm, washed-out latents), each decoded."""
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise UserError(f"frames = {frames!r}: give at least 2 (the two ends)")
        z = self.encode(np.stack([np.asarray(a), np.asarray(b)]), steps, sampler)
        w = torch.linspace(0.0, 1.0, frames, device=z.device)
        return self.decode(slerp(z[0], z[1], w), steps, sampler)


def _ode_settings(sampler: str | None, steps: int | None) -> tuple[str, int]:
    """The sampler and step count of encode/decode: defaults filled in, checked, deterministic only."""
    sampler = sampler or INTERPOLATE_DEFAULTS["sampler"]
    steps = INTERPOLATE_DEFAULTS["steps"] if steps is None else steps
    check_sampling(sampler, steps, INTERPOLATE_DEFAULTS["spacing"])
    if sampler == "ancestral":
        raise UserError("the probability-flow ODE needs a deterministic sampler: use ddim or dpmpp_2m")
    return sampler, steps


def slerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between tensors a and b (same shape) at weights w (k,): (k, *a.shape)."""
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    w = w.double().view(-1, 1)
    if float(theta) < 1e-6:
        out = (1 - w) * fa + w * fb
    else:
        out = (torch.sin((1 - w) * theta) * fa + torch.sin(w * theta) * fb) / math.sin(float(theta))
    return out.to(a.dtype).view(-1, *a.shape)


SEED_LIMIT = 2**63  # seeds 0 .. 2**63 - 1, as params.yaml's seeds: what torch's and numpy's generators take


def sprite_generator(seed: int, k: int, device: torch.device) -> torch.Generator:
    """The random stream of sprite k of `seed`: independent streams from one seed (numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, k]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"seed = {seed!r}: give a whole number from 0 to 2**63 - 1")
    return seed


def load(path: str | os.PathLike = "models", device: str = "cpu", weights: str = "ema") -> Sprites:
    """The trained model in `path` (the train stage's models/: config.json and ema.pt/model.pt),
    on `device` (auto | cpu | cuda | cuda:N | mps). `weights`: ema (what the sample stage uses) or model."""
    from vdm.checkpoint import load_model

    if weights not in ("ema", "model"):
        raise UserError(f"weights = {weights!r}: use ema or model")
    p = Path(path)
    if not p.is_dir():
        raise UserError(
            f"model directory {p} not found: train one (`dvc repro train`), or `dvc checkout models` "
            "to restore the committed one"
        )
    dev = resolve_device(device, "device")
    model, config = load_model(p, weights, dev)
    return Sprites(model, config, dev, p)
