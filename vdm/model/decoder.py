"""The 256-level discretised decoder -log p(x | z_0) and the window of levels it sums over.

p(x = k | z_0) is proportional to exp(-(z_0/alpha_0 - f_k)^2 SNR_0 / 2), f_k the centre of level
k (vdm/model/conversions.py). Only a few neighbouring levels carry mass at a low gamma_0, so the
normaliser is taken over a window around the nearest level, never a (..., 256) tensor unless
gamma_0 is so large that mass spreads over all levels; a test proves it equals the full sum.
"""

from __future__ import annotations

import math

import torch

from vdm.model.conversions import BIN, LEVELS, decode_nearest, encode

# Levels whose logit is more than this below the best one carry < e^-60 of the mass:
# nothing a float32 (or float64) sum can see.
_NEGLIGIBLE_LOGIT = 60.0


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


def decoder_nll(
    x: torch.Tensor,
    eps_0: torch.Tensor,
    gamma_0: torch.Tensor,
    chunk: int = WINDOW_CHUNK,
    half_width: int | None = None,
) -> torch.Tensor:
    """-log p(x | z_0) per element for the 256-level discretised decoder, z_0 drawn from q(z_0 | x)
    with the noise eps_0: z_0 / alpha_0 = f_x + e^(gamma_0 / 2) eps_0. Exact, but without a (..., 256)
    tensor unless gamma_0 is so large that mass spreads over all levels.

    Written in the draw: with d = B e^(-gamma_0 / 2) (B the level spacing), level x - m has logit
    -(eps_0 + m d)^2 / 2, so, the true level's logit taken out, -log p = log sum_m exp(-m d (eps_0 +
    m d / 2)) over the offsets m of the levels in a window around the nearest one, wide enough (from
    gamma_0) that every level outside it is below e^-60 of the peak. Nothing cancels (z_0 / alpha_0
    is never compared with the centres), and gamma_0, the only input with a gradient, gets its
    derivative from the same pass over the (..., window) tensor (`_OffsetLogSumExp`).
    A wide window is taken over the batch in pieces of at most `chunk` window elements: every
    element is independent, so the values are the same to the bit and the peak memory stays
    bounded. `half_width` (default: from gamma_0) may be wider than needed, never narrower.
    """
    w = window_half_width(float(gamma_0.detach())) if half_width is None else half_width
    d = BIN * torch.exp(-0.5 * gamma_0)
    with torch.no_grad():
        if 2 * w + 1 >= LEVELS:
            width, lo = LEVELS, torch.zeros_like(eps_0)
        else:  # window [lo, lo + 2w] clamped to stay within 0..255, so it always holds 2w + 1 levels
            width = 2 * w + 1
            nearest = decode_nearest(encode(x) + torch.exp(0.5 * gamma_0) * eps_0)
            lo = torch.clamp(nearest.to(eps_0.dtype) - w, 0, LEVELS - width)
        first = x.to(eps_0.dtype) - lo  # the offset m of the window's first level
        offsets = torch.arange(width, dtype=eps_0.dtype, device=eps_0.device)
    rows = max(1, chunk // max(1, eps_0[0].numel() * width)) if eps_0.dim() else 1
    if eps_0.dim() and eps_0.shape[0] > rows:
        return torch.cat(
            [
                _OffsetLogSumExp.apply(d, eps_0[i : i + rows], first[i : i + rows, ..., None] - offsets)
                for i in range(0, len(eps_0), rows)
            ]
        )
    return _OffsetLogSumExp.apply(d, eps_0, first[..., None] - offsets)


class _OffsetLogSumExp(torch.autograd.Function):
    """log sum_m exp(-m d (eps + m d / 2)) over the last axis of the offsets m, with its derivative in
    the scalar d, sum_m p_m (-m (eps + m d)), taken in the forward pass: the backward is one product.
    (Autograd through the logits kept five (..., window) tensors for the backward pass: this is 2.7x
    faster in a training step's decoder term at gamma_0 = -13, window 5, on a CPU.)"""

    @staticmethod
    def forward(ctx, d: torch.Tensor, eps: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        md = m * d
        # each term <= e^(eps^2 / 2) (no overflow), and the nearest level's >= 1, so a term below e^-80
        # is below float64's precision of the sum: it is taken as e^-80, since exp below about -88
        # (a subnormal or zero result) runs 20-30x slower than in range on x86 CPUs
        e = torch.add(eps[..., None], md, alpha=0.5).mul_(md).neg_().clamp_(min=-80.0).exp_()
        total = e.sum(-1)
        slope = torch.add(eps[..., None], md).mul_(m).mul_(e).sum(-1).div_(total).neg_()
        ctx.save_for_backward(slope)
        return total.log_()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slope,) = ctx.saved_tensors
        return (grad * slope).sum().reshape(()), None, None


def log_prob_levels_full(x: torch.Tensor, z_rescaled: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
    """Reference: log p(x | z_0) per element for any z_0 / alpha_0 = z_rescaled, from the full
    (..., 256) tensor and autograd (-decoder_nll for q's draws). For tests and benchmarks."""
    centres = encode(torch.arange(LEVELS, device=x.device))
    logits = -0.5 * torch.square((z_rescaled[..., None] - centres) * torch.exp(-0.5 * gamma_0))
    return torch.gather(torch.log_softmax(logits, dim=-1), -1, x.long()[..., None])[..., 0]
