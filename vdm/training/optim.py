"""AdamW with update clipping: the training's optimiser when `train.update_clip` is on.

The stability probe (benchmarks/stability.py, docs/results.md) traces a held learning rate's
divergence to Adam's second moment: the deepest blocks' gradients sit near 1e-8 for a thousand
steps, then grow by 10-1,000x within a few steps, and while v still remembers the small ones,
m / sqrt(v) is that many times its usual size, so every deep weight moves by a quarter of its
norm at once. Update clipping bounds exactly that: per tensor, the step's rate is divided by

    max(1, sqrt(mean(g^2 / v_hat)))

where v_hat already includes this step's g (so g^2 / v_hat is at most 1 / (1 - beta2)). While
gradients are as large as v expects the factor is 1 and the step is AdamW's; a gradient k times
larger than v remembers gets a rate about 1/k, so the step stays near lr x its usual size until
v catches up. (Wortsman et al., 2023, "Stable and low-precision training for large-scale
vision-language models": AdamW with Adafactor's update clipping, there named StableAdamW.)

The state has AdamW's keys (step, exp_avg, exp_avg_sq), so checkpoints read the same way.
"""

from __future__ import annotations

import torch


class ClippedAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose per-tensor rate is divided by the update's RMS where it
    exceeds 1 (see the module). Parameter groups as torch.optim.AdamW's."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.last_clip = torch.ones(())  # the largest per-tensor divisor of the last step (for probes)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        largest = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                v_hat = v / (1 - beta2**t)
                # RMS of g^2 / v_hat, with v_hat floored at eps^2 as Adam's denominator is
                ratio = (g * g / v_hat.clamp(min=eps * eps)).mean().sqrt()
                divisor = ratio.clamp(min=1.0)
                largest.append(divisor)
                rate = lr / divisor
                if wd:
                    p.mul_(1 - rate * wd)
                denom = v_hat.sqrt_().add_(eps)
                p.sub_(m / denom * (rate / (1 - beta1**t)))
        if largest:
            self.last_clip = torch.stack(largest).max()
        return loss
