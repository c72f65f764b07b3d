"""The Variational Diffusion Model: its denoiser and its loss in bits/dim. The conversions
between data, levels and noise are vdm/model/conversions.py, the decoder term's window
vdm/model/decoder.py, the bound over a dataset and the post-training fits vdm/model/bound.py, the samplers
vdm/sampling/samplers.py.

With f the data's level centres in [-1, 1], alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 =
sigmoid(gamma_t) and z_t = alpha_t f + sigma_t eps:

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

The network computes in `net_dtype`: float32, or bfloat16 under autocast (train.precision and
sample.precision; vdm/core/runtime.py) with its output layer in float32. Everything around it (the
schedule, the loss, the decoder) is float32, and the bound (vdm/model/bound.py) runs the network in
float32 too (`VDM.fp32`), so every reported bits/dim is a float32 figure.

In eval mode the bound's eps estimate carries a per-noise-level scale c(gamma), a table over
`EPS_SCALE_GRID` (all ones until vdm/model/bound.py's `fit_eps_scale` fits it).

The network trains on the bound, or on the bound with the diffusion integrand weighted by
w(gamma_t) (Kingma & Gao, 2023): the weightings (sigmoid, min_snr, edm, ...) are a registry in
vdm/model/weightings.py. The reported bits/dim (`Loss.total`, every metric) is always the unweighted bound.

The schedule's shape gets its gradient from the variance of the objective, not from its mean
(see vdm/model/schedules.py): `Schedule.__call__(t, slot)` hands back gamma_t whose backward multiplies
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

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from vdm.core.errors import UserError
from vdm.core.params import ModelParams
from vdm.model.colour import colour_class
from vdm.model.conversions import alpha_sigma, encode, eps_from_x, x_from_eps
from vdm.model.decoder import ReconWindow, decoder_nll, recon_stride
from vdm.model.schedules import GradScale, Schedule
from vdm.model.weightings import WEIGHTINGS

# gamma values at which the bound's eps scale is tabulated (linear in between, the end values outside)
EPS_SCALE_GRID = (-20.0, 10.0, 0.5)  # first, last, step


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
    def __init__(self, model: ModelParams, net: nn.Module, schedule: Schedule):
        """The model that params.yaml's `model` section describes, around `net(z_t, gamma_t)` (which
        predicts model.prediction) and `schedule`; build_vdm makes both from the section too."""
        super().__init__()
        self.net, self.schedule = net, schedule
        self.antithetic, self.timesteps = model.antithetic, model.timesteps
        self.prediction, self.loss_weighting = model.prediction, model.loss_weighting
        self.sigmoid_bias, self.weight_floor = model.sigmoid_bias, model.weight_floor
        WEIGHTINGS[self.loss_weighting]  # a UserError naming the registered ones, if it is not one
        # x-prediction's skip: x_hat = c_skip z_t / alpha_t + c_out F, switching from F (the net's
        # estimate) to z_t / alpha_t where the noise-to-signal ratio e^(gamma/2) falls below x_skip_noise
        self.log_skip2 = 2 * math.log(model.x_skip_noise) if model.x_skip_noise > 0 else -math.inf
        self.recon_window = ReconWindow()
        # the bound's eps_hat scale c(gamma) on EPS_SCALE_GRID (all ones: none; see fit_eps_scale)
        first, last, step = EPS_SCALE_GRID
        self.register_buffer("eps_scale", torch.ones(round((last - first) / step) + 1))
        # colour-conditioned (vdm/model/colour.py; as self-conditioning, a property of the net, built
        # with model.colour_classes): the classes of the training images seen, counted as they are drawn
        # (the whole global batch's, in every process), which a walk draws its sprites' classes from (a
        # buffer: saved with the weights)
        self.colour_classes, self.colour_drop = int(getattr(net, "colour_classes", 0)), model.colour_drop
        if self.colour_classes:
            self.register_buffer("colour_counts", torch.zeros(self.colour_classes))
        # the network's compute dtype (see the module docstring); not saved with the weights
        self.net_dtype = torch.float32

    @contextlib.contextmanager
    def fp32(self):
        """The network in float32 inside the block (the bound and the fits), whatever net_dtype says."""
        kept, self.net_dtype = self.net_dtype, torch.float32
        try:
            yield self
        finally:
            self.net_dtype = kept

    @property
    def self_condition(self) -> bool:
        return bool(getattr(self.net, "self_condition", False))

    def _net(
        self, z: torch.Tensor, gamma: torch.Tensor, x_self: torch.Tensor | None, colour: torch.Tensor | None = None
    ) -> torch.Tensor:
        low = self.net_dtype != torch.float32
        extra = {"colour": colour} if self.colour_classes else {}
        with torch.autocast(z.device.type, dtype=self.net_dtype, enabled=low):
            out = self.net(z, gamma, x_self, **extra) if self.self_condition else self.net(z, gamma, **extra)
        return out.float()

    def colour_shares(self) -> torch.Tensor:
        """The colour classes' shares among the training images seen (uniform before any)."""
        counts = self.colour_counts.float()
        total = counts.sum()
        return counts / total if total > 0 else torch.full_like(counts, 1.0 / len(counts))

    def _training_colour(self, x: torch.Tensor, generator, world: int, mine: slice) -> torch.Tensor:
        """The classes the net trains on: each image's own, none (colour_classes) for a share colour_drop
        of the global batch; the images' classes counted into colour_counts."""
        colour = colour_class(x, self.colour_classes)
        counts = torch.bincount(colour, minlength=self.colour_classes).to(self.colour_counts)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every process counts the global batch: replicas stay equal
        self.colour_counts += counts
        drop = torch.rand(x.shape[0] * world, generator=generator, device=x.device)[mine] < self.colour_drop
        return torch.where(drop, torch.full_like(colour, self.colour_classes), colour)

    def _x_with_skip(self, z: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """prediction x: the net's F blended with z_t / alpha_t by the skip (see the module docstring)."""
        if self.log_skip2 == -math.inf:
            return out
        c_skip = torch.sigmoid(self.log_skip2 - g)  # s_d^2 / (s^2 + s_d^2), s^2 = e^gamma
        return c_skip * z / alpha + torch.sqrt(1 - c_skip) * out  # c_out = s / sqrt(s^2 + s_d^2)

    def x_hat(
        self,
        z: torch.Tensor,
        gamma: torch.Tensor,
        x_self: torch.Tensor | None = None,
        colour: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser's estimate of the data at (z_t, gamma_t), gamma of shape (B,); not clipped.
        x_self: the earlier estimate of x for a self-conditioned net (None: zeros); colour: (B,) colour
        classes for a colour-conditioned net (None: none)."""
        out = self._net(z, gamma, x_self, colour)
        g = gamma.view(-1, 1, 1, 1)
        alpha, sigma = alpha_sigma(g)
        if self.prediction == "eps":
            return x_from_eps(z, out, alpha, sigma)
        if self.prediction == "v":
            return alpha * z - sigma * out
        return self._x_with_skip(z, g, alpha, out)

    def self_estimate(
        self,
        z: torch.Tensor,
        gamma: torch.Tensor,
        generator: torch.Generator | None,
        shard: tuple[int, int] = (0, 1),
        colour: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_self for the loss: the first pass's clipped x_hat (no gradient) for a random half of the
        (global) batch in training, for all of it in eval mode; zeros elsewhere."""
        x_self = torch.zeros_like(z)
        b = z.shape[0]
        if self.training:
            rank, world = shard
            idx = torch.randperm(b * world, generator=generator, device=generator.device if generator else "cpu")
            idx = idx[: b * world // 2]
            if world > 1:  # the chosen half of the global batch, where it falls in this slice
                idx = idx[(idx >= rank * b) & (idx < (rank + 1) * b)] - rank * b
            idx = idx.to(z.device)
        else:
            idx = torch.arange(b, device=z.device)
        if len(idx):
            with torch.no_grad():
                c = None if colour is None else colour[idx]
                x_self[idx] = self.x_hat(z[idx], gamma[idx], colour=c).clamp(-1.0, 1.0)
        return x_self

    def eps_scale_at(self, gamma: torch.Tensor) -> torch.Tensor:
        """c(gamma) from the eps_scale table, linear between its grid points, its end values outside."""
        first, _, step = EPS_SCALE_GRID
        pos = ((gamma.float() - first) / step).clamp(0, len(self.eps_scale) - 1)
        lo = pos.floor().long().clamp(max=len(self.eps_scale) - 2)
        frac = pos - lo
        return self.eps_scale[lo] * (1 - frac) + self.eps_scale[lo + 1] * frac

    def eps_hat(
        self,
        z: torch.Tensor,
        gamma: torch.Tensor,
        x_self: torch.Tensor | None = None,
        colour: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The estimate of eps at (z_t, gamma_t), gamma of shape (B,), that the bound's integrand
        compares with the true eps; x_self and colour as for `x_hat`. In eval mode it carries the fitted
        scale c(gamma) (`fit_eps_scale`); in training it is the network's own."""
        out = self._net_eps_hat(z, gamma, x_self, colour)
        if self.training or bool(torch.all(self.eps_scale == 1)):
            return out
        return self.eps_scale_at(gamma).view(-1, 1, 1, 1) * out

    def _net_eps_hat(
        self, z: torch.Tensor, gamma: torch.Tensor, x_self: torch.Tensor | None, colour: torch.Tensor | None
    ) -> torch.Tensor:
        out = self._net(z, gamma, x_self, colour)
        if self.prediction == "eps":
            return out
        g = gamma.view(-1, 1, 1, 1)
        alpha, sigma = alpha_sigma(g)
        if self.prediction == "v":
            return sigma * z + alpha * out
        return eps_from_x(z, self._x_with_skip(z, g, alpha, out), alpha, sigma)

    def weight(self, gamma: torch.Tensor) -> torch.Tensor:
        """w(gamma_t) for the training objective's diffusion term (1 for the bound): the registered
        weighting `loss_weighting` (vdm/model/weightings.py), at least `weight_floor`."""
        w = WEIGHTINGS[self.loss_weighting](gamma, sigmoid_bias=self.sigmoid_bias)
        return w.clamp(min=self.weight_floor) if self.weight_floor > 0 else w

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)) -> Loss:
        """x: (B, C, H, W) integer levels 0..255 (uint8). Returns per-example bits/dim.

        shard = (rank, processes): in training under several processes, x is slice `rank` of a
        global batch and every random draw is made for the global batch, then sliced, so the global
        batch trains the same whatever the process count (the training loop passes it)."""
        b = x.shape[0]
        dims = x[0].numel()
        to_bpd = 1.0 / (dims * math.log(2))
        f = encode(x)
        rank, world = shard if self.training else (0, 1)
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
        # a colour-conditioned net trains on each image's class; the bound (eval mode) is the unconditioned one
        colour = self._training_colour(x, generator, world, mine) if self.colour_classes and self.training else None
        x_self = self.self_estimate(z_t, gamma_t.detach(), generator, shard, colour) if self.self_condition else None
        eps_hat = self.eps_hat(z_t, gamma_t, x_self, colour)
        sse = torch.square(eps - eps_hat).flatten(1).sum(1)
        if self.timesteps:
            gamma_s, _ = self.schedule(t - 1.0 / self.timesteps, slot)
            diffusion = 0.5 * self.timesteps * torch.expm1(gamma_t - gamma_s) * sse
        else:
            diffusion = 0.5 * dgamma_t * sse
        diffusion = diffusion * to_bpd
        # w(gamma_t) stays in the graph: E[w(gamma) dgamma/dt l(gamma)] over t is the same for every
        # shape only with w's own gradient in the path; taken as a constant, its missing term drives
        # the shape toward high noise at a held rate until whole gamma ranges go unsampled
        weighted = self.weight(gamma_t) * diffusion
        slot.scale = 2.0 * weighted.detach()  # the schedule's shape descends E[L^2] of the objective

        # latent term: KL(q(z_1|x) || N(0, I))
        g1 = self.schedule.gamma_1
        var_1 = torch.sigmoid(g1)
        latent = 0.5 * (var_1 + torch.sigmoid(-g1) * torch.square(f) - torch.log(var_1) - 1.0)
        latent = latent.flatten(1).sum(1) * to_bpd

        # reconstruction term: -log p(x | z_0), z_0 ~ q(z_0 | x)
        g0 = self.schedule.gamma_0
        eps_0 = randn()  # z_0 / alpha_0 = f + (sigma_0 / alpha_0) eps_0
        w = self.recon_window(g0, exact=not self.training)
        stride = recon_stride(2 * w + 1, dims) if self.training else 1
        if stride == 1:
            recon = decoder_nll(x, eps_0, g0, half_width=w).flatten(1).sum(1) * to_bpd
        else:  # every stride-th subpixel from a random offset: an unbiased estimate at 1/stride the cost
            offset = torch.randint(stride, (1,), generator=generator, device=x.device)
            idx = torch.arange(dims // stride, device=x.device) * stride + offset
            picked = decoder_nll(x.flatten(1)[:, idx], eps_0.flatten(1)[:, idx], g0, half_width=w)
            recon = picked.sum(1) * (stride * to_bpd)

        total = diffusion + latent + recon
        objective = total if self.loss_weighting == "elbo" else weighted + latent + recon
        return Loss(total, objective, diffusion, latent, recon, g0.detach().expand(b), g1.detach().expand(b))

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)
    ) -> Loss:
        return self.loss(x, generator, shard)


def on_device(model: VDM, device: torch.device) -> VDM:
    """`model` on `device`, in the memory layout its net runs fastest in there: channels_last on a
    CPU or CUDA (on the 2-core Xeon 1.2x the sampler's img/s of contiguous), contiguous for the
    magnitude-preserving net, which builds its weights each step (there 1.4x faster contiguous).
    Training and every loaded model use it, so a model samples the same sprites wherever it runs."""
    model = model.to(device)
    if device.type in ("cpu", "cuda") and not getattr(model.net, "mp", False):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_vdm(model: ModelParams, image_size: int) -> VDM:
    """The VDM that params.yaml's `model` section describes, initialised from model.seed."""
    from vdm.model.schedules import make_schedule
    from vdm.model.unet import UNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.seed)
        try:
            net = UNet(model, image_size)
        except ValueError as e:
            raise UserError(f"params.yaml: {e} (data.image_size = {image_size})") from None
        schedule = make_schedule(model.schedule, model.gamma_min, model.gamma_max, model.gamma_1_cap)
    return VDM(model, net, schedule)
