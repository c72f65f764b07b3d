"""Magnitude-preserving layers (Karras et al., 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models"): the UNet's blocks when `model.magnitude_preserving` is true.

Every weight is used normalised: each output unit's weight vector has unit length, so a layer keeps
the magnitude of unit-variance inputs, and while training the stored weights are reset to that
length before every use (forced weight normalisation). No weight can grow, so no activation and no
attention logit can either, and Adam's step is a fixed fraction of each weight (about the learning
rate per element): the growth of the deepest level that makes a held rate diverge in the standard
net (docs/results.md, "Why a held learning rate diverges") has nothing to grow from. There are no
biases and no GroupNorm: offsets come from a constant channel at the stem, the encoder's blocks
normalise each pixel's channel vector, SiLU, sums and concatenations are rescaled to keep unit
variance, and the few gains that must start at zero (the embedding's modulation, the output) are
scalar parameters. The constant factors (SiLU's 1/0.596, the sums' weights) are folded into the
next convolution's normalised weight, which costs nothing, instead of passes over the activations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SILU_STD = 0.596  # the standard deviation of silu(x) for x ~ N(0, 1)
RESIDUAL_T = 0.3  # a block's share of its residual sum
CONCAT_T = 0.5  # the skip's share of a decoder's concatenation


def normalise(w: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """w with each output unit's (first axis) elements at unit mean square."""
    rms = torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True) / math.sqrt(w[0].numel())
    return w / (eps + rms)


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-4) -> torch.Tensor:
    """x with each vector along `dim` at unit mean square."""
    rms = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32) / math.sqrt(x.shape[dim])
    return x * (1 / (eps + rms)).to(x.dtype)


def sum_weights(t: float = RESIDUAL_T) -> tuple[float, float]:
    """The weights of a and b in (1 - t) a + t b rescaled to unit variance (independent unit-variance
    a and b): the magnitude-preserving sum."""
    norm = math.sqrt((1 - t) ** 2 + t**2)
    return (1 - t) / norm, t / norm


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = CONCAT_T) -> torch.Tensor:
    """[a, b] on the channel axis, b weighted t and a (1 - t) whatever their channel counts, at unit
    variance overall."""
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(na)), b * (c * t / math.sqrt(nb))], dim=1)


class MPConv(nn.Module):
    """A bias-free convolution (kernel > 0) or linear layer (kernel 0) with normalised weights."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__()
        shape = (c_out, c_in, kernel, kernel) if kernel else (c_out, c_in)
        self.weight = nn.Parameter(torch.randn(shape))
        self.stride = stride

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.float()
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():  # forced weight normalisation: the stored weight keeps its length
                self.weight.copy_(normalise(w))
        w = (normalise(w) * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return F.linear(x, w)
        return F.conv2d(x, w, stride=self.stride, padding=w.shape[-1] // 2)


class MPResBlock(nn.Module):
    """A residual block: [encoder: 1x1 conv to c_out if the width changes, pixel norm], SiLU, 3x3 conv,
    modulated by (1 + gain * linear(emb)), SiLU, 3x3 conv, and the residual sum at t = 0.3
    [decoder: the 1x1 conv to c_out on the skip path]."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, encoder: bool):
        super().__init__()
        self.encoder = encoder
        self.skip = MPConv(c_in, c_out, 1) if c_in != c_out else None
        self.conv1 = MPConv(c_out if encoder else c_in, c_out, 3)
        self.emb = MPConv(emb_dim, c_out, 0)
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.dropout = nn.Dropout(dropout)
        self.conv2 = MPConv(c_out, c_out, 3)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.encoder:
            if self.skip is not None:
                x = self.skip(x)
            x = pixel_norm(x)
        w_x, w_h = sum_weights()
        h = self.conv1(F.silu(x), gain=1 / SILU_STD)  # conv1(mp_silu(x))
        c = self.emb(emb, gain=self.emb_gain) + 1
        h = self.conv2(self.dropout(F.silu(h * c[:, :, None, None].to(h.dtype))), gain=w_h / SILU_STD)
        if not self.encoder and self.skip is not None:
            x = self.skip(x)
        return torch.add(h, x, alpha=w_x)  # mp_sum(x, conv2(mp_silu(h c)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T scale) v over (B, heads, tokens, d), in the inputs' dtype. On a CPU it is computed
    in float32 whatever autocast says: at the net's few tokens (36) the CPU's bf16 attention kernel
    took 8x the float32 one's time (its backward), for a share of the FLOPs too small to gain."""
    if q.device.type != "cpu" or q.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    return out.to(q.dtype)


class MPAttention(nn.Module):
    """Self-attention on pixel-normalised queries, keys and values (logits q.k / sqrt(d), at most
    sqrt(d)), its output added at t = 0.3."""

    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        self.heads = heads
        self.qkv = MPConv(channels, 3 * channels, 1)
        self.proj = MPConv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (pixel_norm(qkv[:, i], dim=2).transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
        out = attend(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        w_x, w_out = sum_weights()
        return torch.add(self.proj(out, gain=w_out), x, alpha=w_x)


class MPUpsample(nn.Module):
    """Nearest-neighbour doubling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = MPConv(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
