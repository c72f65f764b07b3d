"""Noise schedules gamma(t) = -log SNR(t) = log(sigma_t^2 / alpha_t^2), t in [0, 1].

Every schedule is written as  gamma(t) = gamma_0 + (gamma_1 - gamma_0) * shape(t)  with a
monotone shape: shape(0) = 0, shape(1) = 1. So gamma is increasing by construction and hits
its endpoints exactly.

    fixed_linear    shape(t) = t; endpoints fixed
    learned_linear  shape(t) = t; endpoints learned
    learned_nn      shape(t) = normalised monotone network (the paper's gamma_eta:
                    positive-weight dense layers l1, l2 (1024 sigmoid units), l3);
                    endpoints learned

In continuous time the bound depends on the schedule only through its endpoints, so the
shape gets no signal from the bound. As in the paper, the shape is trained to minimise the
variance of the loss estimator instead: `forward` returns the shape through
`VarianceGradient`, which multiplies the gradient reaching the shape by 2 * L (the
per-example diffusion loss, set by the diffusion model once it is known). The shape's
parameters thus descend E[L^2], while the endpoints and the network descend E[L].

A learned gamma_1 is held at or below `gamma_1_cap` (model.gamma_1_cap). The bound always gains
from a higher gamma_1: per unit, the prior term falls by about 0.5 e^-gamma_1 E[x^2] and the
diffusion term grows by 0.5 e^-gamma_1 times x_hat's squared error there, which is below E[x^2]
for any net better than 0. So gamma_1 climbs without end while its gain vanishes (above 8 there is
at most 0.5 e^-8 E[x^2] nats/dim to gain, about 2e-4 bits/dim for sprites), and Adam with a tiny
epsilon moves it at the full rate all the same. The clamp is the identity below the cap, its
gradient included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("fixed_linear", "learned_linear", "learned_nn")


class VarianceGradient(torch.autograd.Function):
    """Identity in the forward pass; backward multiplies the gradient by `box.scale` (per example)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, box: GradScale) -> torch.Tensor:
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale = ctx.box.scale
        if scale is None:
            raise RuntimeError("VarianceGradient: the diffusion loss never set the gradient scale")
        return grad * scale.reshape(scale.shape + (1,) * (grad.dim() - scale.dim())), None


class GradScale:
    """A slot for the per-example scale that `VarianceGradient` applies in backward."""

    scale: torch.Tensor | None = None


class Schedule(nn.Module):
    def __init__(self, gamma_min: float, gamma_max: float, learn_endpoints: bool, gamma_1_cap: float = math.inf):
        super().__init__()
        self.gamma_1_cap = gamma_1_cap
        g = torch.tensor([gamma_min, gamma_max], dtype=torch.float32)
        if learn_endpoints:
            self.endpoints = nn.Parameter(g)
        else:
            self.register_buffer("endpoints", g)

    def shape(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape(t), d shape / dt); linear unless overridden."""
        return t, torch.ones_like(t)

    @property
    def gamma_0(self) -> torch.Tensor:
        return self.endpoints[0]

    @property
    def gamma_1(self) -> torch.Tensor:
        g1 = self.endpoints[1]
        return g1.clamp(max=self.gamma_1_cap) if self.gamma_1_cap < math.inf else g1

    def forward(self, t: torch.Tensor, box: GradScale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), d gamma / dt). With `box`, the shape's gradient is scaled by box.scale."""
        s, ds = self.shape(t)
        if box is not None and s.requires_grad:
            s, ds = VarianceGradient.apply(s, box), VarianceGradient.apply(ds, box)
        g0, g1 = self.endpoints[0], self.gamma_1
        return g0 + (g1 - g0) * s, (g1 - g0) * ds


class FixedLinear(Schedule):
    def __init__(self, gamma_min: float, gamma_max: float, gamma_1_cap: float = math.inf):
        super().__init__(gamma_min, gamma_max, learn_endpoints=False, gamma_1_cap=gamma_1_cap)


class LearnedLinear(Schedule):
    def __init__(self, gamma_min: float, gamma_max: float, gamma_1_cap: float = math.inf):
        super().__init__(gamma_min, gamma_max, learn_endpoints=True, gamma_1_cap=gamma_1_cap)


class PositiveLinear(nn.Module):
    """A dense layer whose weights are kept positive with softplus (so it is monotone)."""

    def __init__(self, n_in: int, n_out: int, init_weight: float, bias: bool = True):
        super().__init__()
        inv_softplus = float(torch.log(torch.expm1(torch.tensor(init_weight))))
        self.weight = nn.Parameter(torch.full((n_out, n_in), inv_softplus) + 0.1 * torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def positive_weight(self) -> torch.Tensor:
        return F.softplus(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.positive_weight(), self.bias)


class LearnedNN(Schedule):
    """gamma_tilde(t) = l1(t) + l3(sigmoid(l2(l1(t)))), normalised to [gamma_0, gamma_1].

    The derivative is computed in closed form, so no second autograd pass is needed.
    """

    def __init__(self, gamma_min: float, gamma_max: float, gamma_1_cap: float = math.inf, hidden: int = 1024):
        super().__init__(gamma_min, gamma_max, learn_endpoints=True, gamma_1_cap=gamma_1_cap)
        self.l1 = PositiveLinear(1, 1, 1.0)
        self.l2 = PositiveLinear(1, hidden, 1.0)
        self.l3 = PositiveLinear(hidden, 1, 1.0 / hidden, bias=False)  # a bias would cancel out

    def _tilde(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.l1.positive_weight()[0, 0]
        u = self.l1(t[:, None])  # (B, 1)
        h = torch.sigmoid(self.l2(u))  # (B, hidden)
        out = u + self.l3(h)
        dh = h * (1 - h) * self.l2.positive_weight()[:, 0] * w1  # dh/dt
        dout = w1 + dh @ self.l3.positive_weight()[0]
        return out[:, 0], dout

    def shape(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ends, _ = self._tilde(torch.tensor([0.0, 1.0], device=t.device, dtype=t.dtype))
        val, slope = self._tilde(t.reshape(-1))
        span = ends[1] - ends[0]
        return ((val - ends[0]) / span).reshape(t.shape), (slope / span).reshape(t.shape)


def make_schedule(name: str, gamma_min: float, gamma_max: float, gamma_1_cap: float = math.inf) -> Schedule:
    kinds = {"fixed_linear": FixedLinear, "learned_linear": LearnedLinear, "learned_nn": LearnedNN}
    if name not in kinds:
        raise ValueError(f"unknown schedule {name!r}; one of {', '.join(SCHEDULES)}")
    return kinds[name](gamma_min, gamma_max, gamma_1_cap)
