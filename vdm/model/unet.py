"""The denoising network: a UNet from (z_t, gamma_t) to what the model section predicts (x, eps or v).

    z_t ─ Fourier features (sin/cos of 2^n * 2pi * z_t, concatenated to z_t)
        [─ with self-conditioning: the previous estimate of x concatenated too]
        ─ space-to-depth stem (patch p: p x p pixels -> one position with p*p times the channels)
        ─ down levels (res blocks [+ attention], stride-2 conv) ─ middle (res, attn, res)
        ─ up levels (res blocks on skip concatenations [+ attention], nearest upsample + conv)
        ─ GroupNorm, SiLU, zero-initialised conv ─ depth-to-space ─ the prediction

Every res block is conditioned on gamma_t through a sinusoidal embedding and an MLP. With
`model.magnitude_preserving` the same layout is built from vdm.model.magnitude's blocks (normalised
weights, no GroupNorm, no biases; EDM2's layers) instead of the standard ones.
Attention runs only at the feature-map sizes listed in `attention_resolutions`, with
torch.nn.functional.scaled_dot_product_attention. Which image sizes, stems, levels and attention
sizes fit together is vdm.core.params.unet_sizes: the net is built from it, and params.yaml is checked
against it before any stage runs.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from vdm.core.params import ModelParams, unet_sizes
from vdm.model import fused
from vdm.model.magnitude import SILU_STD, MPAttention, MPConv, MPResBlock, MPUpsample, attend, mp_cat


def _heads(channels: int, head_dim: int = 64) -> int:
    """About head_dim channels a head, the channels split evenly over the heads."""
    return max(h for h in range(1, max(1, channels // head_dim) + 1) if channels % h == 0)


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class GroupNorm(nn.GroupNorm):
    """GroupNorm (with `silu`, the SiLU that follows it too) for float32 and bf16 inputs; in float32
    nothing changes. Training in bf16 on a CPU, a channels-last input goes through the fused kernel
    (vdm/model/fused.py: float32 arithmetic, bf16 in and out, 2.5-4x the float32 round trip forward and
    backward); without it the norm is computed in float32 and handed back in bf16 (the CPU's bf16
    backward kernel took twice the float32 one's time). Without gradients (sampling) on a CPU a bf16
    input goes through the bf16 kernel (statistics in float32, float32 weights) and a SiLU in place,
    2-10x faster than the casts to float32 and back; below 32x32 maps that kernel took 4-9x longer
    on a channels-last input than on an NCHW one, so there the input is laid out NCHW for it."""

    def __init__(self, num_groups: int, num_channels: int, silu: bool = False):
        super().__init__(num_groups, num_channels)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and fused.applies(x, self.weight):  # training in bf16 on a CPU
            return fused.GroupNormSiLU.apply(x, self.weight, self.bias, self.num_groups, self.eps, self.silu)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled():
            relayout = x.shape[-2] * x.shape[-1] < 1024 and x.is_contiguous(memory_format=torch.channels_last)
            y = F.group_norm(x.contiguous() if relayout else x, self.num_groups, self.weight, self.bias, self.eps)
            y = F.silu(y, inplace=True) if self.silu else y
            return y.contiguous(memory_format=torch.channels_last) if relayout else y
        y = super().forward(x.float())
        return (F.silu(y) if self.silu else y).to(x.dtype)


def _without_autocast(device_type: str):
    """A block where autocast (if on for this device type) is off."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def fourier_features(z: torch.Tensor, n_min: int, n_max: int) -> torch.Tensor:
    """Concatenate sin and cos of 2^n * 2pi * z for n in [n_min, n_max] to z (channel axis).

    Levels in [-1, 1] are 2/256 = 1/128 apart: frequencies up to 2^7 * 2pi and beyond
    resolve them (the paper uses n = 6, 7, 8 with gamma_min = -13.3).
    """
    if n_max < n_min:
        return z
    freqs = (2.0 ** torch.arange(n_min, n_max + 1, device=z.device, dtype=z.dtype)) * (2 * math.pi)
    h = z[:, :, None] * freqs[None, None, :, None, None]  # (B, C, F, H, W)
    h = h.flatten(1, 2)
    return torch.cat([z, torch.sin(h), torch.cos(h)], dim=1)


def gamma_embedding(gamma: torch.Tensor, dim: int, gamma_min: float, gamma_max: float) -> torch.Tensor:
    """Sinusoidal embedding of gamma rescaled to [0, 1000] over the schedule's range."""
    t = (gamma - gamma_min) / (gamma_max - gamma_min) * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=gamma.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm(_groups(c_in), c_in, silu=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = GroupNorm(_groups(c_out), c_out, silu=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))  # the norms apply SiLU
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, heads: int = 1, qk_norm: bool = False):
        super().__init__()
        self.qk_norm, self.heads = qk_norm, heads
        self.norm = GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
        if self.qk_norm:  # logits sqrt(d) cos(q, k): bounded, however large the activations grow
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            out = attend(q, k, v, scale=math.sqrt(q.shape[-1]))
        else:
            out = attend(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    def __init__(self, model: ModelParams, image_size: int, in_channels: int = 3):
        """The net that params.yaml's `model` section describes, for image_size x image_size inputs."""
        super().__init__()
        channels, channel_mult, patch_size = model.channels, tuple(model.channel_mult), model.patch_size
        attention_resolutions, dropout = tuple(model.attention_resolutions), model.dropout
        fourier_min, fourier_max, self_condition = model.fourier_min, model.fourier_max, model.self_condition
        self.checkpointing, self.self_condition = model.checkpointing, self_condition
        unet_sizes(model, image_size, in_channels)  # the shape rules params.yaml is checked against
        self.patch, self.fourier, self.image_size = patch_size, (fourier_min, fourier_max), image_size
        self.gamma_range = (model.gamma_min, model.gamma_max)
        self.emb_dim = channels - channels % 2  # sin/cos pairs
        n_fourier = max(0, fourier_max - fourier_min + 1)
        c_stem = in_channels * (1 + 2 * n_fourier + (1 if self_condition else 0)) * patch_size**2
        self.mp = mp = model.magnitude_preserving
        emb_dim = 4 * channels
        if mp:  # one normalised linear layer; the stem sees a constant channel in place of biases
            self.emb_mlp = MPConv(self.emb_dim, emb_dim, 0)
            self.stem = MPConv(c_stem + 1, channels, 3)
        else:
            self.emb_mlp = nn.Sequential(nn.Linear(self.emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.stem = nn.Conv2d(c_stem, channels, 3, padding=1)
        # colour-conditioned (vdm/model/colour.py): one embedding per class and one for none, added to
        # the noise level's, zero at first, so the net starts as the unconditioned one; magnitude-
        # preserving: a normalised linear layer of the class's one-hot vector, times a gain from zero
        self.colour_classes = model.colour_classes
        if self.colour_classes and mp:
            self.colour_emb = MPConv(self.colour_classes + 1, emb_dim, 0)
            self.colour_gain = nn.Parameter(torch.zeros([]))
        elif self.colour_classes:
            self.colour_emb = nn.Embedding(self.colour_classes + 1, emb_dim)
            nn.init.zeros_(self.colour_emb.weight)

        def res_block(c_in: int, c_out: int, encoder: bool) -> nn.Module:
            if mp:
                return MPResBlock(c_in, c_out, emb_dim, dropout, encoder)
            return ResBlock(c_in, c_out, emb_dim, dropout)

        def attention(c: int) -> nn.Module:
            return MPAttention(c, _heads(c)) if mp else Attention(c, _heads(c), qk_norm=model.qk_norm)

        res = image_size // patch_size
        chans = [channels]
        c = channels
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(model.num_res_blocks):
                blocks = nn.ModuleList([res_block(c, channels * mult, encoder=True)])
                c = channels * mult
                if res in attention_resolutions:
                    blocks.append(attention(c))
                self.down.append(blocks)
                chans.append(c)
            if level != len(channel_mult) - 1:
                down = MPConv(c, c, 3, stride=2) if mp else nn.Conv2d(c, c, 3, stride=2, padding=1)
                self.down.append(nn.ModuleList([down]))
                chans.append(c)
                res //= 2
        if res in attention_resolutions:
            self.mid = nn.ModuleList([res_block(c, c, False), attention(c), res_block(c, c, False)])
        else:
            self.mid = nn.ModuleList([res_block(c, c, False)])  # no attention at this size
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(model.num_res_blocks + 1):
                blocks = nn.ModuleList([res_block(c + chans.pop(), channels * mult, encoder=False)])
                c = channels * mult
                if res in attention_resolutions:
                    blocks.append(attention(c))
                if level != 0 and i == model.num_res_blocks:
                    if mp:
                        blocks.append(MPUpsample(c))
                    else:
                        blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                        blocks.append(nn.Conv2d(c, c, 3, padding=1))
                    res *= 2
                self.up.append(blocks)
        if mp:  # the output's gain starts at zero, as the standard net's zero-initialised conv
            self.out = MPConv(c, in_channels * patch_size**2, 3)
            self.out_gain = nn.Parameter(torch.zeros([]))
        else:
            self.out_norm = GroupNorm(_groups(c), c, silu=True)
            self.out = _zero(nn.Conv2d(c, in_channels * patch_size**2, 3, padding=1))

    def _block(self, m: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not isinstance(m, BLOCKS):
            return m(h)
        args = (h, emb) if isinstance(m, (ResBlock, MPResBlock)) else (h,)
        if self.checkpointing and torch.is_grad_enabled():
            # keep only block inputs for backward; recompute the rest (less memory, ~1/3 more compute)
            return torch.utils.checkpoint.checkpoint(m, *args, use_reentrant=False)
        return m(*args)

    def forward(
        self,
        z: torch.Tensor,
        gamma: torch.Tensor,
        x_self: torch.Tensor | None = None,
        colour: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """eps (or v, or x) at (z_t, gamma_t); x_self: the previous estimate of x in [-1, 1] (self-
        conditioning; zeros when there is none yet), ignored by a net built without it; colour: (B,)
        colour classes, model.colour_classes for none (None: none), ignored by a net built without them."""
        emb = gamma_embedding(gamma, self.emb_dim, *self.gamma_range)
        if self.mp:  # sin/cos have variance 1/2; the block's linear layers see mp_silu's output
            emb = F.silu(self.emb_mlp(emb, gain=math.sqrt(2))) / SILU_STD
        else:
            emb = self.emb_mlp(emb)
        if self.colour_classes:
            if colour is None:
                colour = torch.full((z.shape[0],), self.colour_classes, dtype=torch.long, device=z.device)
            if self.mp:  # a one-hot vector has norm 1: the gain sqrt(n) gives the layer unit-variance output
                n = self.colour_classes + 1
                one_hot = F.one_hot(colour, n).to(emb.dtype)
                emb = emb + self.colour_gain * self.colour_emb(one_hot, gain=math.sqrt(n))
            else:
                emb = emb + self.colour_emb(colour).to(emb.dtype)
        h = fourier_features(z, *self.fourier)
        if self.self_condition:
            h = torch.cat([h, torch.zeros_like(z) if x_self is None else x_self.to(z.dtype)], dim=1)
        if self.patch > 1:
            h = F.pixel_unshuffle(h, self.patch)
        if self.mp:
            h = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
        h = self.stem(h)
        skips = [h]
        for blocks in self.down:
            for m in blocks:
                h = self._block(m, h, emb)
            skips.append(h)
        for m in self.mid:
            h = self._block(m, h, emb)
        for blocks in self.up:
            h = mp_cat(h, skips.pop()) if self.mp else torch.cat([h, skips.pop()], dim=1)
            for m in blocks:
                h = self._block(m, h, emb)
        with _without_autocast(h.device.type):  # the prediction in float32 under bf16 autocast
            h = self.out(h.float(), gain=self.out_gain) if self.mp else self.out(self.out_norm(h.float()))
        if self.patch > 1:
            h = F.pixel_shuffle(h, self.patch)
        return h


BLOCKS = (ResBlock, Attention, MPResBlock, MPAttention)


def deepest_blocks(net: UNet) -> set[str]:
    """Names of the net's blocks (ResBlocks and attentions) whose output has the smallest feature
    map: the attention level and the middle, where a learning rate held too high blows up first
    (docs/results.md, "Why a held learning rate diverges"). Found by one forward pass of zeros."""
    sides, hooks = {}, []
    for name, m in net.named_modules():
        if isinstance(m, BLOCKS):
            hooks.append(m.register_forward_hook(lambda _m, _i, out, name=name: sides.__setitem__(name, out.shape[-1])))
    device = next(net.parameters()).device
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, net.image_size, net.image_size, device=device), torch.zeros(1, device=device))
    finally:
        for h in hooks:
            h.remove()
    low = min(sides.values())
    return {name for name, side in sides.items() if side == low}
