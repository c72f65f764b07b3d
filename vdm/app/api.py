"""Use a trained model from Python: load a model directory, generate sprites, interpolate.

    from vdm.app.api import load
    model = load("models")                       # the train stage's output (EMA weights), on CPU
    sprites = model.generate(16, seed=3)          # (16, 96, 96, 3) uint8
    for batch in model.stream(10_000, seed=3):    # many sprites, a batch at a time as they are drawn
        ...
    model.images(4, seed=3, steps=32)[0].save("new.png")
    frames = model.interpolate(a, b, frames=8)    # a, b: (96, 96, 3) uint8 sprites

Sampling defaults are those of the sample stage (SAMPLE_DEFAULTS, equal to params.yaml's
sample section); the same seed, settings and device give the same sprites.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from vdm.core.errors import UserError
from vdm.core.images import reduce_colours
from vdm.core.runtime import resolve_device
from vdm.sampling import samplers
from vdm.sampling.samplers import sprite_generator
from vdm.sampling.steps import SAMPLERS, deterministic_samplers

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
# Sizes a caller sets, bounded: the sample stage's own limits on steps and batch size (params.yaml's
# sample.steps and sample.batch_size); a million sprites per call (`stream` keeps one batch in
# memory; `generate` all of them: 27 GB at 96x96); an interpolation is one strip of frames, decoded
# DECODE_BATCH at a time.
MAX_STEPS = 100_000
MAX_BATCH = 4096
MAX_SPRITES = 1_000_000
MAX_FRAMES = 64
MAX_COLOURS = 64  # the colour filter's most colours per sprite (a sprite needs about 7)
DECODE_BATCH = 32


def check_sampling(sampler: str, steps: int, spacing: str, temperature: float = 1.0) -> None:
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if spacing not in samplers.SPACINGS:
        raise UserError(f"unknown spacing {spacing!r}: use one of {', '.join(samplers.SPACINGS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"steps = {steps!r}: give a whole number from 1 to {MAX_STEPS}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature <= 1:
        raise UserError(f"temperature = {temperature!r}: give a number above 0 and at most 1")


class Sprites:
    """A trained VDM ready to draw sprites. Build it with `load`."""

    def __init__(self, model, config: dict, device: torch.device, path: Path):
        self.model, self.config, self.device, self.path = model, config, device, path
        self.image_size = model.net.image_size

    def __repr__(self) -> str:
        return f"Sprites({str(self.path)!r}, trained {self.config.get('steps')} steps, on {self.device})"

    def generate(self, n: int, seed: int = 0, **options) -> np.ndarray:
        """n new sprites, (n, H, W, 3) uint8; `options` are those of `stream` (steps, sampler,
        spacing, batch_size, on_step, temperature, colours). Sprite k of a seed is the same whatever n and
        batch_size (each has its own random stream; batched convolutions round differently, by at
        most a level on a few pixels), so asking for more extends the set. All n are kept in
        memory: for many sprites, `stream` hands them over batch by batch."""
        return np.concatenate(list(self.stream(n, seed, **options)))

    def stream(
        self,
        n: int,
        seed: int = 0,
        steps: int | None = None,
        sampler: str | None = None,
        spacing: str | None = None,
        batch_size: int = 32,
        on_step: Callable[[int], None] | None = None,
        temperature: float | None = None,
        colours: int = 0,
    ) -> Iterator[np.ndarray]:
        """The sprites of `generate` with the same arguments, batch by batch as they are drawn:
        (b, H, W, 3) uint8 arrays of at most batch_size sprites, so memory does not grow with n.
        `on_step(i)` is called after every network evaluation of every batch (a progress bar, or a
        deadline that raises); `temperature` scales the ancestral sampler's fresh noise; None
        means the sample stage's value. `colours` > 0 repaints each sprite in at most that many
        flat colours (vdm.core.images.reduce_colours: a filter after sampling, not the model).
        The arguments are checked at once, before the first batch is asked for."""
        settings = self._settings(n, seed, steps, sampler, spacing, batch_size, temperature, colours)
        return self._batches(n, seed, batch_size, settings, on_step)

    def _settings(self, n, seed, steps, sampler, spacing, batch_size, temperature, colours) -> dict:
        """The sampling options of a generate/stream call, defaults filled in, every one checked."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SPRITES:
            raise UserError(f"n = {n!r}: ask for at least 1 sprite and at most {MAX_SPRITES}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
            raise UserError(f"batch_size = {batch_size!r}: give a whole number from 1 to {MAX_BATCH}")
        if isinstance(colours, bool) or not isinstance(colours, int) or not 0 <= colours <= MAX_COLOURS:
            raise UserError(f"colours = {colours!r}: give a whole number from 0 (the model's own) to {MAX_COLOURS}")
        settings = {
            "sampler": sampler or SAMPLE_DEFAULTS["sampler"],
            "steps": SAMPLE_DEFAULTS["steps"] if steps is None else steps,
            "spacing": spacing or SAMPLE_DEFAULTS["spacing"],
            "temperature": SAMPLE_DEFAULTS["temperature"] if temperature is None else temperature,
        }
        check_sampling(**settings)
        check_seed(seed)
        settings["temperature"] = float(settings["temperature"])
        settings["colours"] = colours
        return settings

    def _batches(self, n: int, seed: int, batch_size: int, settings: dict, on_step) -> Iterator[np.ndarray]:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            x, _ = samplers.sample(
                self.model,
                stop - start,
                settings["steps"],
                settings["sampler"],
                settings["spacing"],
                [sprite_generator(seed, k, self.device) for k in range(start, stop)],
                self.device,
                clip_denoised=SAMPLE_DEFAULTS["clip_denoised"],
                on_step=on_step,
                denoise_last=SAMPLE_DEFAULTS["denoise_last"],
                temperature=settings["temperature"],
            )
            batch = x.permute(0, 2, 3, 1).numpy()
            yield reduce_colours(batch, settings["colours"]) if settings["colours"] else batch
            del x, batch  # not held while the next batch is drawn

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
        """Sprites (n, H, W, 3) uint8 from latents z_1, the probability-flow ODE run back (DECODE_BATCH
        latents at a time: the network's memory does not grow with n)."""
        sampler, steps = _ode_settings(sampler, steps)
        out = []
        for start in range(0, latents.shape[0], DECODE_BATCH):
            z = latents[start : start + DECODE_BATCH]
            x, _ = samplers.sample(
                self.model,
                z.shape[0],
                steps,
                sampler,
                INTERPOLATE_DEFAULTS["spacing"],
                None,
                self.device,
                clip_denoised=SAMPLE_DEFAULTS["clip_denoised"],
                denoise_last=SAMPLE_DEFAULTS["denoise_last"],
                z=z,
            )
            out.append(x.permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    def interpolate(
        self, a: np.ndarray, b: np.ndarray, frames: int = 8, steps: int | None = None, sampler: str | None = None
    ) -> np.ndarray:
        """`frames` sprites (frames, H, W, 3) uint8 from a to b: both encoded to z_1, the latents
        joined by spherical interpolation (z_1 is Gaussian: slerp keeps every frame's norm typical,
        where a straight line would pass through low-norm, washed-out latents), each decoded."""
        if isinstance(frames, bool) or not isinstance(frames, int) or not 2 <= frames <= MAX_FRAMES:
            raise UserError(f"frames = {frames!r}: give 2 (the two ends) to {MAX_FRAMES}")
        z = self.encode(np.stack([np.asarray(a), np.asarray(b)]), steps, sampler)
        w = torch.linspace(0.0, 1.0, frames, device=z.device)
        return self.decode(slerp(z[0], z[1], w), steps, sampler)


def _ode_settings(sampler: str | None, steps: int | None) -> tuple[str, int]:
    """The sampler and step count of encode/decode: defaults filled in, checked, deterministic only."""
    sampler = sampler or INTERPOLATE_DEFAULTS["sampler"]
    steps = INTERPOLATE_DEFAULTS["steps"] if steps is None else steps
    check_sampling(sampler, steps, INTERPOLATE_DEFAULTS["spacing"])
    if sampler not in deterministic_samplers():
        choices = " or ".join(deterministic_samplers())
        raise UserError(f"the probability-flow ODE needs a deterministic sampler: use {choices}")
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


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"seed = {seed!r}: give a whole number from 0 to 2**63 - 1")
    return seed


def load(
    path: str | os.PathLike = "models", device: str = "cpu", weights: str = "ema", precision: str = "auto"
) -> Sprites:
    """The trained model in `path` (the train stage's models/: config.json and ema.pt/model.pt),
    on `device` (auto | cpu | cuda | cuda:N | mps). `weights`: ema (what the sample stage uses),
    model, or the name of another weights file of the folder (<name>.pt). `precision`: the
    network's dtype when sampling (auto | fp32 | bf16, as sample.precision). Every file is checked
    first (vdm.model.checkpoint.load_model): a problem is a UserError naming the file and the fix."""
    from vdm.model.checkpoint import load_model, model_folder

    p = model_folder(path)
    dev = resolve_device(device, "device")
    model, config = load_model(p, weights, dev, precision)
    return Sprites(model, config, dev, p)
