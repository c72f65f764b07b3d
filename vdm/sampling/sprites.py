"""Generate sprites with a trained VDM: PNGs, a grid, a denoising strip, and the speed.

samples/sample-0000.png ...   one PNG per sprite (96x96 RGB)
samples/samples.npy           all of them, (N, H, W, 3) uint8, for evaluation
samples/grid.png              the first 64 in a grid
samples/strip.png             denoising strip: one row per sample, z_t at evenly spaced t (1 -> 0), then x
samples/info.json             count, steps, seconds, images/s, device
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from vdm.core.atomic import atomic_dir
from vdm.core.images import image_grid, png_bytes
from vdm.core.params import SamplingOptions
from vdm.model.diffusion import VDM
from vdm.sampling import samplers


def generate(
    model: VDM,
    count: int,
    options: SamplingOptions,
    seed: int,
    device: torch.device,
    strip_rows: int = 0,
    strip_points: int = 2,
    progress: bool = False,
    guide: VDM | None = None,
    guidance: float = 1.0,
    refiner: VDM | None = None,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """`count` sprites drawn as `options` say, options.batch_size at a time: (N, H, W, 3) uint8
    samples, the strip image (or None) and the sampling seconds.

    Sprite k is drawn from its own random stream (vdm.sampling.samplers.sprite_generator(seed, k)): the
    same sprites as `vdm generate` and the API draw with the same seed and options.
    The strip (strip_rows samples, each at strip_points evenly spaced steps) comes from the first
    batch only. `progress` shows a bar over all network evaluations (tqdm; a log line every few
    seconds when not in a terminal). A `guide` model and `guidance` weight autoguide the walk
    (vdm.sampling.samplers.guided_denoiser); a `refiner` takes the walk's low-noise steps
    (vdm.sampling.samplers.refined_denoiser).
    """
    from vdm.core.progress import Progress

    out, strip = [], None
    batch_size = options.batch_size
    bar = Progress(total=options.steps * math.ceil(count / batch_size), desc="sample", unit="step", enabled=progress)
    t0 = time.perf_counter()
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        points = strip_points if start == 0 and strip_rows else 0
        x, traj = samplers.sample(
            model,
            n,
            options,
            [samplers.sprite_generator(seed, k, device) for k in range(start, start + n)],
            device,
            points,
            on_step=lambda _: bar.update(1),
            guide=guide,
            guidance=guidance,
            refiner=refiner,
        )
        out.append(x.permute(0, 2, 3, 1).numpy())
        if points:
            rows = min(strip_rows, n)
            frames = [t[:rows] for t in traj] + [x[:rows]]
            tiles = torch.stack(frames, dim=1).flatten(0, 1)  # row-major: sample r, frame f
            strip = image_grid(tiles.permute(0, 2, 3, 1).numpy(), ncol=len(frames))
    if device.type == "cuda":
        torch.cuda.synchronize()
    bar.close()
    return np.concatenate(out), strip, time.perf_counter() - t0


def write_samples(
    out_dir: str | Path, samples: np.ndarray, strip: np.ndarray | None, info: dict, prefix: str = "sample-"
) -> None:
    """out_dir replaced whole: PREFIX0000.png ..., samples.npy, grid.png (the first 64), strip.png, info.json."""
    import json

    with atomic_dir(out_dir) as tmp:
        for i, img in enumerate(samples):
            (tmp / f"{prefix}{i:04d}.png").write_bytes(png_bytes(img))
        np.save(tmp / "samples.npy", samples, allow_pickle=False)
        ncol = int(math.ceil(math.sqrt(min(64, len(samples)))))
        (tmp / "grid.png").write_bytes(png_bytes(image_grid(samples[:64], ncol=ncol)))
        if strip is not None:
            (tmp / "strip.png").write_bytes(png_bytes(strip))
        (tmp / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
