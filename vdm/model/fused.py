"""Fused CPU kernels for training: GroupNorm and its SiLU in bf16 (csrc/group_norm_silu.cpp), and
AdamW's step with update clipping (csrc/clipped_adamw.cpp, used by vdm/training/optim.py).

Training in bf16 on a CPU, the UNet's norms were a float32 round trip: the bf16 input cast to
float32, GroupNorm, SiLU, and a cast back to bf16, each a pass over memory, and as many again
backward, where the float32 copies are what autograd keeps. The kernel reads the bf16 input, does
the same arithmetic in float32 and writes bf16 once, forward and backward; autograd keeps only the
bf16 input and the per-group statistics.

The optimiser's kernel does the foreach path's arithmetic in two passes over memory instead of
eleven. The kernels are compiled together on first use with the machine's C++ compiler
(torch.utils.cpp_extension, about 13 s; cached under ~/.cache/torch_extensions, one build per CPU
type and source, since they are compiled for this CPU's instructions). Where no compiler or ninja
is found, `available()` is False, one line says so, and training takes the unfused paths: the same
arithmetic, other roundings, so such a machine trains other bits.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("group_norm_silu.cpp", "clipped_adamw.cpp")]
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
_state: dict[str, object] = {}


def _cpu_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags (a build per CPU type)."""
    info = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info = "\n".join(
            sorted({ln for ln in lines if ln.startswith(("flags", "model name", "cpu family", "model\t"))})
        )
    except OSError:
        pass
    return hashlib.sha256(info.encode()).hexdigest()[:10]


def available() -> bool:
    """Whether the fused kernels are built and loaded (they are built on the first call)."""
    if "ok" not in _state:
        _state["ok"] = _load()
    return bool(_state["ok"])


def use(on: bool) -> None:
    """Take the kernels where they apply (the default) or the unfused paths (`on` False), in this
    process: `benchmarks/model.py --interleave` alternates the two."""
    _state["use"] = on


def _load() -> bool:
    if os.environ.get("VDM_FUSED_KERNELS", "1") == "0":  # the unfused paths, for comparisons
        return False
    import logging

    quiet = logging.getLogger("torch.utils.cpp_extension")  # its import warns that this CPU build has no CUDA
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        source_hash = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES)).hexdigest()[:10]
        cpp_extension.load(
            name=f"vdm_fused_{_cpu_tag()}_{source_hash}",
            sources=[str(p) for p in _SOURCES],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],  # libgomp.so.1: the one torch has loaded already
            is_python_module=False,
            verbose=False,
        )
        return True
    except Exception as e:  # no compiler, no ninja, a failed build: the unfused norms and optimiser instead
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(
            f"note: the fused training kernels did not build ({first[:160]}); training takes the slower "
            "path for its norms and optimiser (install g++ and ninja for the kernels)",
            file=sys.stderr,
        )
        return False
    finally:
        quiet.setLevel(level)


class GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x)) (or the norm alone) for a bf16 channels-last CPU tensor x."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, silu: bool):
        y, mean, rstd = torch.ops.vdm_fused.group_norm_silu_forward(x, weight, bias, groups, eps, silu)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        dx, dw, db = torch.ops.vdm_fused.group_norm_silu_backward(dy, x, mean, rstd, weight, bias, ctx.groups, ctx.silu)
        return dx, dw, db, None, None, None


def applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether the fused kernel computes this norm: a 4-D bf16 channels-last CPU input with
    float32 affine weights, and the kernel built."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.dim() == 4
        and weight is not None
        and weight.dtype == torch.float32
        and x.is_contiguous(memory_format=torch.channels_last)
        and _state.get("use", True)
        and available()
    )


def clipped_adamw_(params, grads, exp_avg, exp_avg_sq, steps, lr, beta1, beta2, eps, weight_decay, threshold):
    """One clipped AdamW step in place over the lists (the arithmetic of vdm/training/optim.py):
    each tensor's divisor of the rate, or None, having changed nothing, where the kernel is off or
    not built or a tensor is not float32 on the CPU in a dense layout its gradient and moments share."""
    if not (params and params[0].device.type == "cpu" and _state.get("use", True) and available()):
        return None
    out = torch.ops.vdm_fused.clipped_adamw_(
        params, grads, exp_avg, exp_avg_sq, steps, lr, beta1, beta2, eps, weight_decay, threshold
    )
    return out or None
