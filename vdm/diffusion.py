"""The Variational Diffusion Model: its denoiser, its loss in bits/dim, the bpd estimator and
the gamma_0 fit. The samplers live in vdm/samplers.py.

Data x in {0..255} is mapped to the centres of 256 bins in [-1, 1]: f = (2x + 1)/256 - 1.
With alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t), z_t = alpha_t f + sigma_t eps:

    diffusion  L_inf = 1/2 E_t[ gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2 ]     (continuous time)
               L_T   = T/2 E_t[ expm1(gamma_t - gamma_s) ||eps - eps_hat||^2 ]   (T steps, s = t - 1/T)
    latent     KL(q(z_1|x) || N(0, I)) = 1/2 sum(sigma_1^2 + alpha_1^2 f^2 - log sigma_1^2 - 1)
    recon      -log p(x|z_0), p(x = k|z_0) proportional to exp(-(z_0/alpha_0 - f_k)^2 SNR_0 / 2)

each summed over dimensions and reported in bits per dimension (divided by D ln 2).

The network predicts one of three things (`prediction`); the bound is the same for each:
- x (the default): the data itself, with a skip (`x_skip_noise` = s_d): x_hat = c_skip z_t / alpha_t
  + sqrt(1 - c_skip) F, c_skip = s_d^2 / (e^gamma + s_d^2), so where the noise-to-signal ratio
  e^(gamma/2) is far below s_d the estimate is z_t / alpha_t and the net only corrects it;
- eps: the noise, x_hat = (z_t - sigma_t eps_hat) / alpha_t;
- v = alpha_t eps - sigma_t f: eps_hat = sigma_t z_t + alpha_t v_hat and x_hat = alpha_t z_t -
  sigma_t v_hat, bounded where dividing by alpha_t would amplify every error.
`VDM.x_hat` gives the estimate of x straight from the net's output (what the samplers use),
`VDM.eps_hat` the estimate of eps (what the bound's integrand measures).

After training, the bound's eps estimate can be scaled per noise level (`fit_eps_scale`, the
train stage's `train.fit_eps_scale`): eps_hat -> c(gamma) eps_hat, c the least-squares factor on
training images, a table over `EPS_SCALE_GRID` interpolated linearly. Scaling eps_hat by c is
blending x_hat with z_t / alpha_t: x_hat -> c x_hat + (1 - c) z_t / alpha_t, the mean-square-
optimal mix of a network that denoises imperfectly at low noise and of z_t itself, whose error is
pure noise. It lowers every term of the diffusion integral it touches and so lets gamma_0 go lower.
The samplers keep the network's own x_hat: the mix carries z_t's noise, which the eye sees as grain.

The network trains on the bound, or on the bound with the diffusion integrand weighted by
w(gamma_t) (Kingma & Gao, 2023): the weightings (sigmoid, min_snr, edm, ...) are a registry in
vdm/weightings.py. The reported bits/dim (`Loss.total`, every metric) is always the unweighted bound.

The schedule's shape gets its gradient from the variance of the objective, not from its mean
(see vdm/schedules.py): `Schedule.__call__(t, slot)` hands back gamma_t whose backward multiplies
the incoming gradient by `slot.scale`, which the loss sets to 2 x the per-example objective once
that is known.

With self-conditioning (`self_condition: true`, Chen et al. 2022) the net also sees an earlier
estimate of x: in training, for a random half of each batch, its own estimate from a first pass
at the same z_t (without gradient; zeros for the other half); in sampling, the estimate of the
previous step, so a colour or shape decided at high noise is carried forward instead of being
read again from the noise. For the bound (eval mode) every image takes the two passes: the
denoiser is still a function of z_t alone, so the bound stays a bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vdm.errors import UserError
from vdm.schedules import GradScale, Schedule
from vdm.weightings import WEIGHTINGS

if TYPE_CHECKING:  # only for type checkers: params.py imports vdm.samplers, which imports this module
    from vdm.params import ModelParams

LEVELS = 256
BIN = 2.0 / LEVELS  # spacing of the 256 levels in [-1, 1]
# gamma values at which the bound's eps scale is tabulated (linear in between, the end values outside)
EPS_SCALE_GRID = (-20.0, 10.0, 0.5)  # first, last, step
# Levels whose logit is more than this below the best one carry < e^-60 of the mass:
# nothing a float32 (or float64) sum can see.
_NEGLIGIBLE_LOGIT = 60.0


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


def window_half_width(gamma_0: float) -> int:
    """Levels each side of the nearest one that can carry mass, given gamma_0 = -log SNR_0.

    With s = sqrt(SNR_0) and spacing B, the nearest level is at most B/2 from z_0/alpha_0 and
    a level k steps further at least (k - 1/2) B, so its logit trails the nearest one's by at
    least (s B)^2 k (k - 1) / 2. Levels with k (k - 1) >= 2 * 60 / (s B)^2 carry < e^-60 of
    the mass: the window keeps the offsets below the smallest such k.
    """
    if not math.isfinite(gamma_0) or gamma_0 > 20:  # diverged: let the full sum show the NaN
        return LEVELS
    c = 2 * _NEGLIGIBLE_LOGIT / (math.exp(-0.5 * gamma_0) * BIN) ** 2
    k = math.ceil((1 + math.sqrt(1 + 4 * c)) / 2)  # smallest k with k (k - 1) >= c
    return k - 1


TRAIN_WINDOW = 16  # decoder levels per subpixel a training step pays for at most (see recon_stride)


def recon_stride(width: int, dims: int) -> int:
    """Training estimates the decoder term on every k-th subpixel (k a power of two dividing
    dims) when the window is wider than TRAIN_WINDOW levels, so its cost stays that of a
    TRAIN_WINDOW-level window; 1 (every subpixel, exactly) when it is not."""
    k = 1
    while width > TRAIN_WINDOW * k and dims % (2 * k) == 0:
        k *= 2
    return k


WINDOW_CHUNK = 1 << 24  # elements of the (..., window) tensor per chunk: 64 MB in float32


class ReconWindow:
    """The decoder window's half-width for the gamma_0 of each loss call, read from the host.

    Reading a CPU tensor costs nothing, so on a CPU the width is exact at every call. Reading a
    CUDA tensor makes the host wait for the GPU to finish all queued work, in the middle of every
    training step; there the width is taken from gamma_0 + `margin` (a wider window: still exact
    to float precision, since the levels it adds carry < e^-60 of the mass) and gamma_0 is read
    again only every `refresh` calls. gamma_0 moves by about lr per AdamW step, so it stays below
    the value the width was taken at, plus the margin, between two reads.
    """

    def __init__(self, refresh: int = 50, margin: float = 2.0):
        self.refresh, self.margin = refresh, margin
        self.calls, self.width = 0, None

    def __call__(self, gamma_0: torch.Tensor, exact: bool = False) -> int:
        """exact: read gamma_0 now (evaluation, where gamma_0 may be set to anything between calls)."""
        if exact or gamma_0.device.type != "cuda":
            return window_half_width(float(gamma_0.detach()))
        if self.width is None or self.calls % self.refresh == 0:
            self.width = window_half_width(float(gamma_0.detach()) + self.margin)
        self.calls += 1
        return self.width


def log_prob_levels(
    x: torch.Tensor,
    z_rescaled: torch.Tensor,
    gamma_0: torch.Tensor,
    chunk: int = WINDOW_CHUNK,
    half_width: int | None = None,
) -> torch.Tensor:
    """log p(x | z_0) per element for the 256-level discretised decoder, exactly, but without
    a (..., 256) tensor unless gamma_0 is so large that mass spreads over all levels.

    The normaliser logsumexp_k(logit_k) is taken over a window of levels around the nearest
    one, wide enough (from gamma_0) that every level outside it is below e^-60 of the peak.
    A wide window (a gamma_0 fitted to a visible noise level) is taken over the batch in pieces
    of at most `chunk` window elements: every element is independent, so the result is the
    same to the bit, and the peak memory stays bounded instead of growing with batch x window.
    `half_width` (default: from gamma_0) may be wider than needed, never narrower.
    """
    w = window_half_width(float(gamma_0.detach())) if half_width is None else half_width
    width = LEVELS if 2 * w + 1 >= LEVELS else 2 * w + 1
    per_row = z_rescaled[0].numel() * width if z_rescaled.dim() else width
    rows = max(1, chunk // max(1, per_row))
    if z_rescaled.dim() and z_rescaled.shape[0] > rows:
        return torch.cat(
            [_log_prob_window(x[i : i + rows], z_rescaled[i : i + rows], gamma_0, w) for i in range(0, len(x), rows)]
        )
    return _log_prob_window(x, z_rescaled, gamma_0, w)


def _log_prob_window(x: torch.Tensor, z_rescaled: torch.Tensor, gamma_0: torch.Tensor, w: int) -> torch.Tensor:
    scale = torch.exp(-0.5 * gamma_0)
    logit_true = -0.5 * torch.square((z_rescaled - encode(x)) * scale)
    if 2 * w + 1 >= LEVELS:
        levels = torch.arange(LEVELS, device=x.device)
    else:
        nearest = decode_nearest(z_rescaled.detach()).long()
        # window [lo, lo + 2w] clamped to stay within 0..255, so it always holds 2w + 1 levels
        lo = torch.clamp(nearest - w, 0, LEVELS - 1 - 2 * w)
        levels = lo[..., None] + torch.arange(2 * w + 1, device=x.device)
    centres = (2.0 * levels + 1.0) / LEVELS - 1.0
    logits = -0.5 * torch.square((z_rescaled[..., None] - centres) * scale)
    return logit_true - torch.logsumexp(logits, dim=-1)


def log_prob_levels_full(x: torch.Tensor, z_rescaled: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
    """Reference: the same, with the full (..., 256) tensor. For tests and benchmarks."""
    centres = encode(torch.arange(LEVELS, device=x.device))
    logits = -0.5 * torch.square((z_rescaled[..., None] - centres) * torch.exp(-0.5 * gamma_0))
    return torch.gather(torch.log_softmax(logits, dim=-1), -1, x.long()[..., None])[..., 0]


@dataclass
class Loss:
    """Per-example terms in bits/dim (shape (B,)), and the schedule's endpoints."""

    total: torch.Tensor  # the bound (what every metric reports)
    objective: torch.Tensor  # what the network trains on: the bound, diffusion term weighted
    diffusion: torch.Tensor
    latent: torch.Tensor
    recon: torch.Tensor
    gamma_0: torch.Tensor
    gamma_1: torch.Tensor

    def means(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach().float().mean()) for k in self.__dataclass_fields__}


def sample_times(batch: int, antithetic: bool, generator: torch.Generator | None, device) -> torch.Tensor:
    """t in [0, 1): i.i.d. uniform, or one uniform shifted by i/B (antithetic, low variance)."""
    if antithetic:
        u = torch.rand((), generator=generator, device=device)
        return torch.remainder(u + torch.arange(batch, device=device) / batch, 1.0)
    return torch.rand(batch, generator=generator, device=device)


class VDM(nn.Module):
    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        antithetic: bool = True,
        timesteps: int = 0,
        prediction: str = "eps",
        x_skip_noise: float = 0.0,
        loss_weighting: str = "elbo",
        sigmoid_bias: float = 0.0,
    ):
        """`net(z_t, gamma_t)` predicts eps or v; timesteps = 0 for continuous time, else T."""
        super().__init__()
        if prediction not in ("eps", "v", "x") or loss_weighting not in WEIGHTINGS:
            raise ValueError(f"prediction {prediction!r} / loss_weighting {loss_weighting!r}")
        self.net, self.schedule = net, schedule
        self.antithetic, self.timesteps = antithetic, timesteps
        self.prediction, self.loss_weighting, self.sigmoid_bias = prediction, loss_weighting, sigmoid_bias
        # x-prediction's skip: x_hat = c_skip z_t / alpha_t + c_out F, switching from F (the net's
        # estimate) to z_t / alpha_t where the noise-to-signal ratio e^(gamma/2) falls below x_skip_noise
        self.log_skip2 = 2 * math.log(x_skip_noise) if x_skip_noise > 0 else -math.inf
        self.recon_window = ReconWindow()
        # the bound's eps_hat scale c(gamma) on EPS_SCALE_GRID (all ones: none; see fit_eps_scale)
        first, last, step = EPS_SCALE_GRID
        self.register_buffer("eps_scale", torch.ones(round((last - first) / step) + 1))
        # (rank, processes): in training, this process's batch is slice `rank` of a global batch and
        # every random draw is made for the global batch, then sliced, so the global batch trains
        # the same whatever the process count (vdm/training.py sets it under several processes)
        self.shard = (0, 1)

    @property
    def self_condition(self) -> bool:
        return bool(getattr(self.net, "self_condition", False))

    def _net(self, z: torch.Tensor, gamma: torch.Tensor, x_self: torch.Tensor | None) -> torch.Tensor:
        return (self.net(z, gamma, x_self) if self.self_condition else self.net(z, gamma)).float()

    def _x_with_skip(self, z: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """prediction x: the net's F blended with z_t / alpha_t by the skip (see the module docstring)."""
        if self.log_skip2 == -math.inf:
            return out
        c_skip = torch.sigmoid(self.log_skip2 - g)  # s_d^2 / (s^2 + s_d^2), s^2 = e^gamma
        return c_skip * z / alpha + torch.sqrt(1 - c_skip) * out  # c_out = s / sqrt(s^2 + s_d^2)

    def x_hat(self, z: torch.Tensor, gamma: torch.Tensor, x_self: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's estimate of the data at (z_t, gamma_t), gamma of shape (B,); not clipped.
        x_self: the earlier estimate of x for a self-conditioned net (None: zeros)."""
        out = self._net(z, gamma, x_self)
        g = gamma.view(-1, 1, 1, 1)
        alpha, sigma = alpha_sigma(g)
        if self.prediction == "eps":
            return x_from_eps(z, out, alpha, sigma)
        if self.prediction == "v":
            return alpha * z - sigma * out
        return self._x_with_skip(z, g, alpha, out)

    def self_estimate(self, z: torch.Tensor, gamma: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """x_self for the loss: the first pass's clipped x_hat (no gradient) for a random half of the
        batch in training, for all of it in eval mode; zeros elsewhere."""
        x_self = torch.zeros_like(z)
        b = z.shape[0]
        if self.training:
            rank, world = self.shard
            idx = torch.randperm(b * world, generator=generator, device=generator.device if generator else "cpu")
            idx = idx[: b * world // 2]
            if world > 1:  # the chosen half of the global batch, where it falls in this slice
                idx = idx[(idx >= rank * b) & (idx < (rank + 1) * b)] - rank * b
            idx = idx.to(z.device)
        else:
            idx = torch.arange(b, device=z.device)
        if len(idx):
            with torch.no_grad():
                x_self[idx] = self.x_hat(z[idx], gamma[idx]).clamp(-1.0, 1.0)
        return x_self

    def eps_scale_at(self, gamma: torch.Tensor) -> torch.Tensor:
        """c(gamma) from the eps_scale table, linear between its grid points, its end values outside."""
        first, _, step = EPS_SCALE_GRID
        pos = ((gamma.float() - first) / step).clamp(0, len(self.eps_scale) - 1)
        lo = pos.floor().long().clamp(max=len(self.eps_scale) - 2)
        frac = pos - lo
        return self.eps_scale[lo] * (1 - frac) + self.eps_scale[lo + 1] * frac

    def eps_hat(self, z: torch.Tensor, gamma: torch.Tensor, x_self: torch.Tensor | None = None) -> torch.Tensor:
        """The estimate of eps at (z_t, gamma_t), gamma of shape (B,), that the bound's integrand
        compares with the true eps; x_self as for `x_hat`. In eval mode it carries the fitted scale
        c(gamma) (`fit_eps_scale`); in training it is the network's own."""
        out = self._net_eps_hat(z, gamma, x_self)
        if self.training or bool(torch.all(self.eps_scale == 1)):
            return out
        return self.eps_scale_at(gamma).view(-1, 1, 1, 1) * out

    def _net_eps_hat(self, z: torch.Tensor, gamma: torch.Tensor, x_self: torch.Tensor | None) -> torch.Tensor:
        out = self._net(z, gamma, x_self)
        if self.prediction == "eps":
            return out
        g = gamma.view(-1, 1, 1, 1)
        alpha, sigma = alpha_sigma(g)
        if self.prediction == "v":
            return sigma * z + alpha * out
        return eps_from_x(z, self._x_with_skip(z, g, alpha, out), alpha, sigma)

    def weight(self, gamma: torch.Tensor) -> torch.Tensor:
        """w(gamma_t) for the training objective's diffusion term (1 for the bound): the registered
        weighting `loss_weighting` (vdm/weightings.py)."""
        return WEIGHTINGS[self.loss_weighting](gamma, sigmoid_bias=self.sigmoid_bias)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Loss:
        """x: (B, C, H, W) integer levels 0..255 (uint8). Returns per-example bits/dim."""
        b = x.shape[0]
        dims = x[0].numel()
        to_bpd = 1.0 / (dims * math.log(2))
        f = encode(x)
        rank, world = self.shard if self.training else (0, 1)
        mine = slice(rank * b, (rank + 1) * b)  # this process's rows of the global batch's draws

        def randn() -> torch.Tensor:
            return torch.randn((b * world, *f.shape[1:]), generator=generator, device=x.device)[mine]

        # diffusion term
        slot = GradScale()  # the schedule shape's gradient scale, set below from the objective
        t = sample_times(b * world, self.antithetic, generator, x.device)[mine]
        if self.timesteps:
            t = torch.ceil(t * self.timesteps).clamp(min=1) / self.timesteps
        gamma_t, dgamma_t = self.schedule(t, slot)
        eps = randn()
        alpha_t, sigma_t = alpha_sigma(gamma_t.view(b, 1, 1, 1))
        z_t = alpha_t * f + sigma_t * eps
        x_self = self.self_estimate(z_t, gamma_t.detach(), generator) if self.self_condition else None
        eps_hat = self.eps_hat(z_t, gamma_t, x_self)
        sse = torch.square(eps - eps_hat).flatten(1).sum(1)
        if self.timesteps:
            gamma_s, _ = self.schedule(t - 1.0 / self.timesteps, slot)
            diffusion = 0.5 * self.timesteps * torch.expm1(gamma_t - gamma_s) * sse
        else:
            diffusion = 0.5 * dgamma_t * sse
        diffusion = diffusion * to_bpd
        weighted = self.weight(gamma_t.detach()) * diffusion
        slot.scale = 2.0 * weighted.detach()  # the schedule's shape descends E[L^2] of the objective

        # latent term: KL(q(z_1|x) || N(0, I))
        g1 = self.schedule.gamma_1
        var_1 = torch.sigmoid(g1)
        latent = 0.5 * (var_1 + torch.sigmoid(-g1) * torch.square(f) - torch.log(var_1) - 1.0)
        latent = latent.flatten(1).sum(1) * to_bpd

        # reconstruction term: -log p(x | z_0), z_0 ~ q(z_0 | x)
        g0 = self.schedule.gamma_0
        eps_0 = randn()
        z_0_rescaled = f + torch.exp(0.5 * g0) * eps_0  # z_0 / alpha_0 = f + (sigma_0 / alpha_0) eps
        w = self.recon_window(g0, exact=not self.training)
        stride = recon_stride(2 * w + 1, dims) if self.training else 1
        if stride == 1:
            recon = -log_prob_levels(x, z_0_rescaled, g0, half_width=w).flatten(1).sum(1) * to_bpd
        else:  # every stride-th subpixel from a random offset: an unbiased estimate at 1/stride the cost
            offset = torch.randint(stride, (1,), generator=generator, device=x.device)
            idx = torch.arange(dims // stride, device=x.device) * stride + offset
            picked = -log_prob_levels(x.flatten(1)[:, idx], z_0_rescaled.flatten(1)[:, idx], g0, half_width=w)
            recon = picked.sum(1) * (stride * to_bpd)

        total = diffusion + latent + recon
        objective = total if self.loss_weighting == "elbo" else weighted + latent + recon
        return Loss(total, objective, diffusion, latent, recon, g0.detach().expand(b), g1.detach().expand(b))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Loss:
        return self.loss(x, generator)


@torch.no_grad()
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


@torch.no_grad()
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
    top = float(schedule.endpoints[1]) - 1.0
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


@torch.no_grad()
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


def build_vdm(model: ModelParams, image_size: int) -> VDM:
    """The VDM that params.yaml's `model` section describes, initialised from model.seed."""
    from vdm.schedules import make_schedule
    from vdm.unet import UNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.seed)
        try:
            net = UNet(model, image_size)
        except ValueError as e:
            raise UserError(f"params.yaml: {e} (data.image_size = {image_size})") from None
        schedule = make_schedule(model.schedule, model.gamma_min, model.gamma_max)
    return VDM(
        net,
        schedule,
        antithetic=model.antithetic,
        timesteps=model.timesteps,
        prediction=model.prediction,
        x_skip_noise=model.x_skip_noise,
        loss_weighting=model.loss_weighting,
        sigmoid_bias=model.sigmoid_bias,
    )
