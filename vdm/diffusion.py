"""The Variational Diffusion Model: its loss in bits/dim, the sampler, the bpd estimator.

Data x in {0..255} is mapped to the centres of 256 bins in [-1, 1]: f = (2x + 1)/256 - 1.
With alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t), z_t = alpha_t f + sigma_t eps:

    diffusion  L_inf = 1/2 E_t[ gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2 ]     (continuous time)
               L_T   = T/2 E_t[ expm1(gamma_t - gamma_s) ||eps - eps_hat||^2 ]   (T steps, s = t - 1/T)
    latent     KL(q(z_1|x) || N(0, I)) = 1/2 sum(sigma_1^2 + alpha_1^2 f^2 - log sigma_1^2 - 1)
    recon      -log p(x|z_0), p(x = k|z_0) proportional to exp(-(z_0/alpha_0 - f_k)^2 SNR_0 / 2)

each summed over dimensions and reported in bits per dimension (divided by D ln 2).

The network may predict eps directly (`prediction: eps`) or v = alpha_t eps - sigma_t f
(`prediction: v`), from which eps_hat = sigma_t z_t + alpha_t v_hat: at low SNR eps_hat is then
z_t plus a small correction, so an untrained net already gets the identity right instead of
having to learn to copy z_t through its stem, and x_hat = alpha_t z_t - sigma_t v_hat stays
bounded where dividing by alpha_t would amplify every error. The bound is the same either way.

The network trains on the bound, or (`loss_weighting: sigmoid`) on the bound with the
diffusion integrand weighted by w(gamma_t) = sigmoid(gamma_t + b) (Kingma & Gao, 2023): w is
about 1 at low SNR and e^(gamma_t + b) at high SNR, which moves the network's effort from
imperceptible high-SNR detail to the coarse structure that sampling needs first. The
reported bits/dim (`Loss.total`, every metric) is always the unweighted bound.

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

import torch
from torch import nn

from vdm.errors import UserError
from vdm.params import ModelParams
from vdm.schedules import GradScale, Schedule

LEVELS = 256
WEIGHTINGS = ("elbo", "sigmoid", "edm")
# EDM's training distribution of the noise level (Karras et al. 2022): ln(sigma) ~ N(-1.2, 1.2^2),
# sigma the noise-to-signal ratio e^(gamma/2), and its data standard deviation
EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_DATA = -1.2, 1.2, 0.5
BIN = 2.0 / LEVELS  # spacing of the 256 levels in [-1, 1]
# Levels whose logit is more than this below the best one carry < e^-60 of the mass:
# nothing a float32 (or float64) sum can see.
_NEGLIGIBLE_LOGIT = 60.0


def encode(x: torch.Tensor) -> torch.Tensor:
    """uint8 levels {0..255} -> bin centres in [-1, 1] (float32)."""
    return (2.0 * x.float() + 1.0) / LEVELS - 1.0


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


WINDOW_CHUNK = 1 << 24  # elements of the (..., window) tensor per chunk: 64 MB in float32


def log_prob_levels(
    x: torch.Tensor, z_rescaled: torch.Tensor, gamma_0: torch.Tensor, chunk: int = WINDOW_CHUNK
) -> torch.Tensor:
    """log p(x | z_0) per element for the 256-level discretised decoder, exactly, but without
    a (..., 256) tensor unless gamma_0 is so large that mass spreads over all levels.

    The normaliser logsumexp_k(logit_k) is taken over a window of levels around the nearest
    one, wide enough (from gamma_0) that every level outside it is below e^-60 of the peak.
    A wide window (a gamma_0 fitted to a visible noise level) is taken over the batch in pieces
    of at most `chunk` window elements: every element is independent, so the result is the
    same to the bit, and the peak memory stays bounded instead of growing with batch x window.
    """
    w = window_half_width(float(gamma_0.detach()))
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

    @property
    def self_condition(self) -> bool:
        return bool(getattr(self.net, "self_condition", False))

    def x_hat(self, z: torch.Tensor, gamma: torch.Tensor, x_self: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's estimate of the data at (z_t, gamma_t), not clipped."""
        g = gamma.view(-1, 1, 1, 1)
        return (z - torch.sqrt(torch.sigmoid(g)) * self.eps_hat(z, gamma, x_self)) / torch.sqrt(torch.sigmoid(-g))

    def self_estimate(self, z: torch.Tensor, gamma: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """x_self for the loss: the first pass's clipped x_hat (no gradient) for a random half of the
        batch in training, for all of it in eval mode; zeros elsewhere."""
        x_self = torch.zeros_like(z)
        b = z.shape[0]
        if self.training:
            idx = torch.randperm(b, generator=generator, device=generator.device if generator else "cpu")
            idx = idx[: b // 2].to(z.device)
        else:
            idx = torch.arange(b, device=z.device)
        if len(idx):
            with torch.no_grad():
                x_self[idx] = self.x_hat(z[idx], gamma[idx]).clamp(-1.0, 1.0)
        return x_self

    def eps_hat(self, z: torch.Tensor, gamma: torch.Tensor, x_self: torch.Tensor | None = None) -> torch.Tensor:
        """The network's prediction of eps at (z_t, gamma_t), gamma of shape (B,); x_self the earlier
        estimate of x for a self-conditioned net (None: zeros)."""
        out = (self.net(z, gamma, x_self) if self.self_condition else self.net(z, gamma)).float()
        if self.prediction == "eps":
            return out
        g = gamma.view(-1, 1, 1, 1)
        if self.prediction == "v":
            return torch.sqrt(torch.sigmoid(g)) * z + torch.sqrt(torch.sigmoid(-g)) * out
        alpha, sigma = torch.sqrt(torch.sigmoid(-g)), torch.sqrt(torch.sigmoid(g))
        x_hat = out
        if self.log_skip2 > -math.inf:
            c_skip = torch.sigmoid(self.log_skip2 - g)  # s_d^2 / (s^2 + s_d^2), s^2 = e^gamma
            x_hat = c_skip * z / alpha + torch.sqrt(1 - c_skip) * out  # c_out = s / sqrt(s^2 + s_d^2)
        return (z - alpha * x_hat) / sigma

    def weight(self, gamma: torch.Tensor) -> torch.Tensor:
        """w(gamma_t) for the training objective's diffusion term (1 for the bound).

        edm: EDM's objective as a weighting of the bound's integrand over gamma (Kingma & Gao
        2023): its log-normal density of sigma, times its loss weight (sigma^2 + sigma_data^2) /
        (sigma sigma_data)^2 turned from x-space into eps-space (a factor sigma^2). As a density
        over gamma = 2 ln sigma it is N(gamma; 2 P_mean, (2 P_std)^2); scaled to peak at 1 there.
        """
        if self.loss_weighting == "elbo":
            return torch.ones_like(gamma)
        if self.loss_weighting == "edm":
            mean, std, sd2 = 2 * EDM_P_MEAN, 2 * EDM_P_STD, EDM_SIGMA_DATA**2
            density = torch.exp(-0.5 * torch.square((gamma - mean) / std))
            return density * (torch.exp(gamma) + sd2) / (math.exp(mean) + sd2)
        return torch.sigmoid(gamma + self.sigmoid_bias)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Loss:
        """x: (B, C, H, W) integer levels 0..255 (uint8). Returns per-example bits/dim."""
        b = x.shape[0]
        dims = x[0].numel()
        to_bpd = 1.0 / (dims * math.log(2))
        f = encode(x)

        # diffusion term
        box = GradScale()
        t = sample_times(b, self.antithetic, generator, x.device)
        if self.timesteps:
            t = torch.ceil(t * self.timesteps).clamp(min=1) / self.timesteps
        gamma_t, dgamma_t = self.schedule(t, box)
        eps = torch.randn(f.shape, generator=generator, device=x.device)
        g = gamma_t.view(b, 1, 1, 1)
        z_t = torch.sqrt(torch.sigmoid(-g)) * f + torch.sqrt(torch.sigmoid(g)) * eps
        x_self = self.self_estimate(z_t, gamma_t.detach(), generator) if self.self_condition else None
        eps_hat = self.eps_hat(z_t, gamma_t, x_self)
        sse = torch.square(eps - eps_hat).flatten(1).sum(1)
        if self.timesteps:
            gamma_s, _ = self.schedule(t - 1.0 / self.timesteps, box)
            diffusion = 0.5 * self.timesteps * torch.expm1(gamma_t - gamma_s) * sse
        else:
            diffusion = 0.5 * dgamma_t * sse
        diffusion = diffusion * to_bpd
        weighted = self.weight(gamma_t.detach()) * diffusion
        box.scale = 2.0 * weighted.detach()  # the schedule's shape descends E[L^2] of the objective

        # latent term: KL(q(z_1|x) || N(0, I))
        g1 = self.schedule.gamma_1
        var_1 = torch.sigmoid(g1)
        latent = 0.5 * (var_1 + torch.sigmoid(-g1) * torch.square(f) - torch.log(var_1) - 1.0)
        latent = latent.flatten(1).sum(1) * to_bpd

        # reconstruction term: -log p(x | z_0), z_0 ~ q(z_0 | x)
        g0 = self.schedule.gamma_0
        eps_0 = torch.randn(f.shape, generator=generator, device=x.device)
        z_0_rescaled = f + torch.exp(0.5 * g0) * eps_0  # z_0 / alpha_0 = f + (sigma_0 / alpha_0) eps
        recon = -log_prob_levels(x, z_0_rescaled, g0).flatten(1).sum(1) * to_bpd

        total = diffusion + latent + recon
        objective = total if self.loss_weighting == "elbo" else weighted + latent + recon
        return Loss(total, objective, diffusion, latent, recon, g0.detach().expand(b), g1.detach().expand(b))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Loss:
        return self.loss(x, generator)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        shape: tuple[int, int, int],
        steps: int,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        trajectory_points: int = 0,
        batch_size: int | None = None,
        clip_denoised: bool = True,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Ancestral sampling with the paper's p(z_s | z_t) over `steps` steps.

        p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)); with clip_denoised, x_hat is clipped to the
        data range [-1, 1] first (and eps_hat recomputed from it), which keeps an imperfect
        model's early, low-SNR steps from pushing z outside anything the data can produce.

        Returns (n, C, H, W) uint8 images and, if trajectory_points > 0, that many snapshots
        of z_t at evenly spaced t from 1 to 0 (each (n, C, H, W) uint8, z_t clipped to [-1, 1]).
        """
        batch_size = batch_size or n
        outs, trajs = [], []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            x, traj = self._sample_batch(
                m, shape, steps, generator, torch.device(device), trajectory_points, clip_denoised
            )
            outs.append(x)
            trajs.append(traj)
        traj = [torch.cat([t[i] for t in trajs]) for i in range(len(trajs[0]))] if trajectory_points else []
        return torch.cat(outs), traj

    def step(self, z, gamma_t, gamma_s, noise, clip_denoised: bool = True) -> torch.Tensor:
        """One ancestral step: z_s ~ p(z_s | z_t) = q(z_s | z_t, x_hat), gamma of shape (B,)."""
        eps_hat = self.eps_hat(z, gamma_t)
        gt, gs = gamma_t.view(-1, 1, 1, 1), gamma_s.view(-1, 1, 1, 1)
        if clip_denoised:
            alpha_t, sigma_t = torch.sqrt(torch.sigmoid(-gt)), torch.sqrt(torch.sigmoid(gt))
            x_hat = ((z - sigma_t * eps_hat) / alpha_t).clamp(-1.0, 1.0)
            eps_hat = (z - alpha_t * x_hat) / sigma_t
        c = -torch.expm1(gs - gt)  # 1 - SNR(t)/SNR(s)
        alpha_ratio = torch.sqrt(torch.sigmoid(-gs) / torch.sigmoid(-gt))
        mean = alpha_ratio * (z - c * torch.sqrt(torch.sigmoid(gt)) * eps_hat)
        return mean + torch.sqrt(torch.sigmoid(gs) * c) * noise

    def _sample_batch(self, n, shape, steps, generator, device, trajectory_points, clip_denoised):
        z = torch.randn((n, *shape), generator=generator, device=device)
        keep = set()
        if trajectory_points:
            keep = {round(i * steps / max(1, trajectory_points - 1)) for i in range(trajectory_points)}
        traj = []

        def snap(z):
            return ((z.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

        for i in range(steps, 0, -1):
            if steps - i in keep:
                traj.append(snap(z))
            gamma_t, _ = self.schedule(torch.full((n,), i / steps, device=device))
            gamma_s, _ = self.schedule(torch.full((n,), (i - 1) / steps, device=device))
            noise = torch.randn(z.shape, generator=generator, device=device)
            z = self.step(z, gamma_t, gamma_s, noise, clip_denoised)
        if steps in keep:
            traj.append(snap(z))
        g0 = self.schedule.gamma_0
        x = decode_nearest(z / torch.sqrt(torch.sigmoid(-g0)))
        return x.cpu(), traj


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


def build_vdm(model: ModelParams, image_size: int) -> VDM:
    """The VDM that params.yaml's `model` section describes, initialised from model.seed."""
    from vdm.schedules import make_schedule
    from vdm.unet import UNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.seed)
        try:
            net = UNet(
                image_size=image_size,
                channels=model.channels,
                channel_mult=tuple(model.channel_mult),
                num_res_blocks=model.num_res_blocks,
                attention_resolutions=tuple(model.attention_resolutions),
                dropout=model.dropout,
                patch_size=model.patch_size,
                fourier_min=model.fourier_min,
                fourier_max=model.fourier_max,
                gamma_min=model.gamma_min,
                gamma_max=model.gamma_max,
                checkpointing=model.checkpointing,
                self_condition=model.self_condition,
            )
        except ValueError as e:
            raise UserError(f"params.yaml: model: {e} (data.image_size = {image_size})") from None
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
