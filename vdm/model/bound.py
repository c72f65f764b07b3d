"""The bound over a dataset (bits/dim, `estimate_bpd`) and the fits made after training that
lower it: gamma_0 (`fit_gamma_0`) and the eps scale (`fit_eps_scale`).

After training, the bound's eps estimate can be scaled per noise level (`fit_eps_scale`, the
train stage's `train.fit_eps_scale`): eps_hat -> c(gamma) eps_hat, c the least-squares factor on
training images, a table over `EPS_SCALE_GRID` interpolated linearly. Scaling eps_hat by c is
blending x_hat with z_t / alpha_t: x_hat -> c x_hat + (1 - c) z_t / alpha_t, the mean-square-
optimal mix of a network that denoises imperfectly at low noise and of z_t itself, whose error is
pure noise. It lowers every term of the diffusion integral it touches and so lets gamma_0 go lower.
The samplers keep the network's own x_hat: the mix carries z_t's noise, which the eye sees as grain.

All three run the network in float32 (`VDM.fp32`) whatever precision it trains or samples in:
every bits/dim reported and every fitted value is a float32 figure.
"""

from __future__ import annotations

import functools
import math

import torch

from vdm.model.conversions import alpha_sigma, encode
from vdm.model.diffusion import EPS_SCALE_GRID, VDM


def _fp32(fn):
    """fn(model, ...) with the model's network in float32 for the call, and without gradients."""

    @functools.wraps(fn)
    def run(model: VDM, *args, **kwargs):
        with torch.no_grad(), model.fp32():
            return fn(model, *args, **kwargs)

    return run


@_fp32
def estimate_bpd(
    model: VDM,
    images: torch.Tensor,
    time_samples: int = 1,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Bits/dim over a dataset: each image's bound averaged over K time (and noise) samples,
    then mean and standard error over images, for the total and each term.

    images: (N, C, H, W) uint8 (or NHWC numpy-backed uint8 permuted to NCHW).
    """
    per_image = {k: [] for k in ("total", "diffusion", "latent", "recon")}
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        acc = None
        for _ in range(time_samples):
            loss = model.loss(x, generator)
            terms = torch.stack([loss.total, loss.diffusion, loss.latent, loss.recon])
            acc = terms if acc is None else acc + terms
        acc = (acc / time_samples).double().cpu()
        for i, k in enumerate(per_image):
            per_image[k].append(acc[i])
    out = {}
    for k, parts in per_image.items():
        v = torch.cat(parts)
        out[k] = float(v.mean())
        out[f"{k}_se"] = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    out["images"] = len(images)
    out["time_samples"] = time_samples
    return out


@_fp32
def fit_gamma_0(
    model: VDM,
    images: torch.Tensor,
    seed: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    step: float = 0.5,
    span: float = 10.0,
) -> dict:
    """Set the schedule's gamma_0 to the value in [gamma_0, gamma_0 + span] (a grid of `step`)
    that minimises the bound of `images`; returns the learned and fitted gamma_0, the bound at
    each, and the whole curve.

    In continuous time the bound depends on the schedule only through its endpoints, and the
    network is conditioned on gamma itself, so any gamma_0 gives a valid bound for the same
    network: the diffusion integral from gamma_0 up plus the decoder's -log p(x | z_0) at gamma_0.
    A network trained with a weighting that hardly sees low noise (sigmoid, edm) denoises badly
    there, yet the weighted objective keeps pushing gamma_0 down (only the decoder term sees it);
    the fit moves gamma_0 to where denoising stops paying. Every candidate sees the same time and
    noise draws (one generator seed), so the curve is smooth. Fit on training images: the
    held-out bound stays unbiased.
    """
    schedule = model.schedule
    learned = float(schedule.endpoints[0])
    top = float(schedule.gamma_1) - 1.0
    candidates = [learned + k * step for k in range(int(span / step) + 1) if learned + k * step <= top]
    curve = []
    try:
        for g in candidates:
            schedule.endpoints[0] = g
            gen = torch.Generator(device=device).manual_seed(seed)
            curve.append(estimate_bpd(model, images, 1, batch_size, gen, device)["total"])
    finally:
        schedule.endpoints[0] = learned
    best = min(range(len(curve)), key=curve.__getitem__)
    schedule.endpoints[0] = candidates[best]
    return {
        "gamma_0_learned": learned,
        "gamma_0": candidates[best],
        "bpd_learned": curve[0],
        "bpd_fitted": curve[best],
        "curve": [[g, b] for g, b in zip(candidates, curve, strict=True)],
    }


@_fp32
def fit_eps_scale(
    model: VDM,
    images: torch.Tensor,
    seed: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict:
    """Fit the bound's eps scale: at each grid point gamma of EPS_SCALE_GRID from the schedule's
    gamma_0 up, c(gamma) = <eps, eps_hat> / <eps_hat, eps_hat> over `images` (one noise draw each,
    from `seed`), the factor that minimises ||eps - c eps_hat||^2 there, i.e. the diffusion
    integrand at that gamma, up to the first grid point at or above gamma_1 (the bound sees no
    gamma outside [gamma_0, gamma_1]); outside the scan the table keeps the end values. Returns
    the fitted gamma values and factors, and where c crosses 1/2 (None if it never does).

    The network's own eps_hat is what is scaled (the table is reset first), so fitting twice gives
    the same table. Fit on training images: the held-out bound stays unbiased.
    """
    first, last, step = EPS_SCALE_GRID
    model.eps_scale.fill_(1.0)
    start = max(0, math.floor((float(model.schedule.gamma_0) - first) / step))
    stop = min(len(model.eps_scale) - 1, max(start, math.ceil((float(model.schedule.gamma_1) - first) / step)))
    f_all = encode(images)
    gammas, scales = [], []
    for i in range(start, stop + 1):
        g = first + i * step
        gen = torch.Generator(device=device).manual_seed(seed)
        num = den = 0.0
        for b in range(0, len(f_all), batch_size):
            f = f_all[b : b + batch_size].to(device)
            gamma = torch.full((len(f),), g, device=device)
            alpha, sigma = alpha_sigma(gamma.view(-1, 1, 1, 1))
            eps = torch.randn(f.shape, generator=gen, device=device)
            z = alpha * f + sigma * eps
            x_self = model.self_estimate(z, gamma, None) if model.self_condition else None
            e_hat = model.eps_hat(z, gamma, x_self).double()
            num += float((eps.double() * e_hat).sum())
            den += float((e_hat * e_hat).sum())
        c = num / den if den > 0 else 1.0
        gammas.append(g)
        scales.append(c)
    table = torch.full_like(model.eps_scale, scales[-1])
    table[:start] = scales[0]
    table[start : stop + 1] = torch.tensor(scales, dtype=table.dtype)
    model.eps_scale.copy_(table)
    half = None
    for k in range(1, len(scales)):
        if scales[k - 1] < 0.5 <= scales[k]:
            half = gammas[k - 1] + (0.5 - scales[k - 1]) / (scales[k] - scales[k - 1]) * step
            break
    return {"gamma": gammas, "scale": scales, "gamma_half": half}
