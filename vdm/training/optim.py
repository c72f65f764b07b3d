"""AdamW with update clipping: the training's optimiser when `train.update_clip` is above 0.

The stability probe (benchmarks/stability.py, docs/results.md) traces a held learning rate's
divergence to Adam's second moment: the deepest blocks' gradients sit near 1e-8 for a thousand
steps, then grow by 10-1,000x within a few steps, and while v still remembers the small ones,
m / sqrt(v) is that many times its usual size, so every deep weight moves by a quarter of its
norm at once. Update clipping bounds exactly that: per tensor, the step's rate is divided by

    max(1, sqrt(mean(g^2 / v_hat)) / c),     c = train.update_clip (the threshold)

where v_hat already includes this step's g (so g^2 / v_hat is at most 1 / (1 - beta2)). While
gradients are as large as v expects the factor is 1 and the step is AdamW's; a gradient k > c
times larger than v remembers gets a rate about c/k, so the step stays near c x lr x its usual
size until v catches up. (Wortsman et al., 2023, "Stable and low-precision training for large-scale
vision-language models": AdamW with Adafactor's update clipping, there named StableAdamW.)

The state has AdamW's keys (step, exp_avg, exp_avg_sq), so checkpoints read the same way. On a CPU,
with the fused kernels built (vdm/model/fused.py), one kernel does a group's step in two passes over
memory; elsewhere the foreach ops below do the same arithmetic.
"""

from __future__ import annotations

import math

import torch

from vdm.model import fused


class ClippedAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose per-tensor rate is divided by the update's RMS / threshold
    where that exceeds 1 (see the module). Parameter groups as torch.optim.AdamW's; the arithmetic is
    foreach ops over each group, with one read of the per-tensor rates per group and step."""

    def __init__(
        self,
        params,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        threshold: float = 1.0,
    ):
        if not threshold > 0:
            raise ValueError(f"update clipping's threshold must be > 0, not {threshold}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.threshold = threshold  # the update's RMS a tensor may reach before its rate is divided
        self.last_clip = 1.0  # the largest per-tensor divisor of the last step (for probes)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        largest = 1.0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["step"] = torch.zeros((), dtype=torch.float32)
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            torch._foreach_add_([s["step"] for s in states], 1)
            t = [float(s["step"]) for s in states]  # on the CPU, as AdamW keeps it
            divisors = fused.clipped_adamw_(params, grads, m, v, t, lr, beta1, beta2, eps, wd, self.threshold)
            if divisors is not None:  # the CPU kernel did the step: the same arithmetic in two passes
                largest = max(largest, *divisors)
                continue
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            root = torch._foreach_sqrt(v)  # sqrt(v_hat) = sqrt(v) / sqrt(1 - beta2^t)
            torch._foreach_div_(root, [math.sqrt(1 - beta2**n) for n in t])
            # sqrt(mean(g^2 / v_hat)), with sqrt(v_hat) floored at eps as Adam's denominator is
            norms = torch._foreach_norm(torch._foreach_div(grads, torch._foreach_clamp_min(root, eps)))
            sizes = torch.tensor([math.sqrt(p.numel()) for p in params], device=norms[0].device)
            divisors = (torch.stack(norms) / (sizes * self.threshold)).clamp(min=1.0).tolist()
            largest = max(largest, *divisors)
            if wd:
                torch._foreach_mul_(params, [1 - lr / d * wd for d in divisors])
            torch._foreach_add_(root, eps)
            torch._foreach_addcdiv_(
                params, m, root, [-lr / d / (1 - beta1**n) for d, n in zip(divisors, t, strict=True)]
            )
        self.last_clip = largest
        return loss
