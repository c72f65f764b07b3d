"""Use a trained model from Python: load a model directory, generate sprites, interpolate.

    from vdm.app.api import load
    model = load("models")                       # the train stage's output (ema.pt; train.ema_decay 0: raw), on CPU
    sprites = model.generate(16, seed=3)          # (16, 96, 96, 3) uint8
    for batch in model.stream(10_000, seed=3):    # many sprites, a batch at a time as they are drawn
        ...
    model.images(4, seed=3, steps=32)[0].save("new.png")
    frames = model.interpolate(a, b, frames=8)    # a, b: (96, 96, 3) uint8 sprites

Sampling options are one object, vdm.core.params.SamplingOptions (its defaults: params.yaml's sample
section); each call's keywords change its fields, checked, and `Sprites.options` can be replaced
whole. The same seed, options and device give the same sprites as the sample stage.
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
from vdm.core.params import SamplingOptions
from vdm.core.runtime import resolve_device
from vdm.sampling import samplers
from vdm.sampling.samplers import sprite_generator

# Encoding runs the probability-flow ODE, so interpolation needs a deterministic sampler.
ODE_SAMPLER = "dpmpp_2m"
# Sizes a caller sets, bounded (steps and batch size by SamplingOptions, as params.yaml's sample
# section): a million sprites per call (`stream` keeps one batch in memory; `generate` all of them:
# 27 GB at 96x96); an interpolation is one strip of frames, decoded DECODE_BATCH at a time.
MAX_SPRITES = 1_000_000
MAX_FRAMES = 64
MAX_COLOURS = 64  # the colour filter's most colours per sprite (a sprite needs about 7)
DECODE_BATCH = 32


class Sprites:
    """A trained VDM ready to draw sprites. Build it with `load`."""

    def __init__(self, model, config: dict, device: torch.device, path: Path):
        self.model, self.config, self.device, self.path = model, config, device, path
        self.image_size = model.net.image_size
        self.options = SamplingOptions()  # what every call starts from (the sample stage's defaults)

    def __repr__(self) -> str:
        return f"Sprites({str(self.path)!r}, trained {self.config.get('steps')} steps, on {self.device})"

    def generate(self, n: int, seed: int = 0, **options) -> np.ndarray:
        """n new sprites, (n, H, W, 3) uint8; `options` are those of `stream` (steps, sampler,
        spacing, batch_size, temperature, on_step, colours). Sprite k of a seed is the same whatever n and
        batch_size (each has its own random stream; batched convolutions round differently, by at
        most a level on a few pixels), so asking for more extends the set. All n are kept in
        memory: for many sprites, `stream` hands them over batch by batch."""
        return np.concatenate(list(self.stream(n, seed, **options)))

    def stream(
        self,
        n: int,
        seed: int = 0,
        on_step: Callable[[int], None] | None = None,
        colours: int = 0,
        **options,
    ) -> Iterator[np.ndarray]:
        """The sprites of `generate` with the same arguments, batch by batch as they are drawn:
        (b, H, W, 3) uint8 arrays of at most batch_size sprites, so memory does not grow with n.
        `options` change fields of `self.options` (sampler, steps, spacing, batch_size,
        clip_denoised, denoise_last, temperature; None keeps one). `on_step(i)` is called after
        every network evaluation of every batch (a progress bar, or a deadline that raises).
        `colours` > 0 repaints each sprite in at most that many flat colours
        (vdm.core.images.reduce_colours: a filter after sampling, not the model). The arguments
        are checked at once, before the first batch is asked for."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SPRITES:
            raise UserError(f"n = {n!r}: ask for at least 1 sprite and at most {MAX_SPRITES}")
        if isinstance(colours, bool) or not isinstance(colours, int) or not 0 <= colours <= MAX_COLOURS:
            raise UserError(f"colours = {colours!r}: give a whole number from 0 (the model's own) to {MAX_COLOURS}")
        check_seed(seed)
        return self._batches(n, seed, samplers.check_options(self.options.replace(**options)), on_step, colours)

    def _batches(self, n: int, seed: int, options: SamplingOptions, on_step, colours: int) -> Iterator[np.ndarray]:
        for start in range(0, n, options.batch_size):
            stop = min(n, start + options.batch_size)
            gens = [sprite_generator(seed, k, self.device) for k in range(start, stop)]
            x, _ = samplers.sample(self.model, stop - start, options, gens, self.device, on_step=on_step)
            batch = x.permute(0, 2, 3, 1).numpy()
            yield reduce_colours(batch, colours) if colours else batch
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

    def ode_options(self, **options) -> SamplingOptions:
        """The options of encode/decode/interpolate: self.options with `options` changed and, unless
        given, the deterministic ODE_SAMPLER; checked, and refused for a sampler that draws noise."""
        return samplers.check_deterministic(self.options.replace(**{"sampler": ODE_SAMPLER, **options}))

    def encode(self, images: np.ndarray, **options) -> torch.Tensor:
        """Latents z_1 (n, 3, H, W) of sprites (n, H, W, 3) uint8 by the probability-flow ODE;
        `options` as for `ode_options` (steps, sampler, spacing)."""
        opts = self.ode_options(**options)
        return samplers.encode(self.model, self._check_sprites(images), opts)

    def decode(self, latents: torch.Tensor, **options) -> np.ndarray:
        """Sprites (n, H, W, 3) uint8 from latents z_1, the probability-flow ODE run back (DECODE_BATCH
        latents at a time: the network's memory does not grow with n)."""
        opts = self.ode_options(**options)
        out = []
        for start in range(0, latents.shape[0], DECODE_BATCH):
            z = latents[start : start + DECODE_BATCH]
            x, _ = samplers.sample(self.model, z.shape[0], opts, None, self.device, z=z)
            out.append(x.permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    def interpolate(self, a: np.ndarray, b: np.ndarray, frames: int = 8, **options) -> np.ndarray:
        """`frames` sprites (frames, H, W, 3) uint8 from a to b: both encoded to z_1, the latents
        joined by spherical interpolation (z_1 is Gaussian: slerp keeps every frame's norm typical,
        where a straight line would pass through low-norm, washed-out latents), each decoded."""
        if isinstance(frames, bool) or not isinstance(frames, int) or not 2 <= frames <= MAX_FRAMES:
            raise UserError(f"frames = {frames!r}: give 2 (the two ends) to {MAX_FRAMES}")
        opts = self.ode_options(**options)
        z = samplers.encode(self.model, self._check_sprites(np.stack([np.asarray(a), np.asarray(b)])), opts)
        w = torch.linspace(0.0, 1.0, frames, device=z.device)
        return self.decode(slerp(z[0], z[1], w), **opts.model_dump())


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
