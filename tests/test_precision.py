"""The network's precision: bf16 autocast where the CPU has bf16 instructions, fp32 elsewhere, and
every bound in fp32 whatever the network trains or samples in."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import model_params
from vdm.core import runtime
from vdm.core.errors import UserError
from vdm.core.runtime import cpu_has_bf16, resolve_precision
from vdm.model.bound import estimate_bpd, fit_eps_scale
from vdm.model.diffusion import build_vdm

CPU = torch.device("cpu")
FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the CPU check at a file the test writes: cpuinfo(extra flags) -> None."""
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(runtime, "CPUINFO", str(path))

    def write(extra: str) -> None:
        path.write_text(FLAGS.format(extra=extra))

    return write


@pytest.mark.parametrize(
    ("flags", "fast"),
    [("", False), ("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512_bf16x", False), ("avx_vnni", False)],
)
def test_auto_is_bf16_only_where_the_cpu_reports_bf16_instructions(cpuinfo, flags, fast):
    cpuinfo(flags)
    assert cpu_has_bf16() is fast
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if fast else torch.float32)


def test_explicit_settings_and_other_devices(cpuinfo, monkeypatch):
    cpuinfo("")  # a CPU without bf16: fp32 stays exact under auto, bf16 still runs when asked for
    assert resolve_precision("fp32", CPU) == torch.float32
    assert resolve_precision("bf16", CPU) == torch.bfloat16
    assert resolve_precision("auto", torch.device("mps")) == torch.float32
    monkeypatch.setattr(runtime, "CPUINFO", "/nonexistent/cpuinfo")
    assert cpu_has_bf16() is False and resolve_precision("auto", CPU) == torch.float32
    with pytest.raises(UserError, match=r"sample.precision = 'fp16' is not one of auto, fp32, bf16"):
        resolve_precision("fp16", CPU, "sample.precision")


def _model():
    model = build_vdm(model_params(channels=16, channel_mult=[1, 2], attention_resolutions=[12]), 24)
    torch.nn.init.normal_(model.net.out.weight, std=0.05)  # leave the zero start: the output shows the net
    return model.eval()


def _images(n=6):
    return torch.randint(0, 256, (n, 3, 24, 24), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_bf16_runs_the_net_in_bf16_and_hands_back_fp32():
    model, seen = _model(), []
    model.net.stem.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    z, g = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1)), torch.tensor([-4.0, 1.0])
    with torch.no_grad():
        exact = model.x_hat(z, g)
        model.net_dtype = torch.bfloat16
        low = model.x_hat(z, g)
    assert seen == [torch.float32, torch.bfloat16]
    assert low.dtype == torch.float32 and not torch.equal(low, exact)
    assert torch.allclose(low, exact, atol=0.02), float((low - exact).abs().max())


def test_the_norms_silu_is_the_same_in_fp32_and_one_rounding_in_bf16():
    """The ResBlocks' GroupNorm applies its SiLU in float32: in float32 exactly F.silu after the
    norm, under bf16 autocast the float32 result rounded once to bf16."""
    import torch.nn.functional as F

    from vdm.model.unet import GroupNorm

    norm = GroupNorm(4, 8, silu=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0), norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    plain = F.silu(F.group_norm(x, 4, norm.weight, norm.bias))
    assert torch.equal(norm(x), plain)
    low = norm(x.bfloat16())
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, F.silu(F.group_norm(x.bfloat16().float(), 4, norm.weight, norm.bias)).bfloat16())


@pytest.mark.parametrize("side", [6, 40])  # below 32 x 32 the norm lays its input out NCHW, above it not
def test_without_gradients_the_norm_runs_bf16_and_keeps_the_layout(side):
    """Sampling (no gradients) in bf16: the bf16 kernel and a SiLU in place, within bf16's rounding
    of the float32 result, handed back in the input's memory layout, the input untouched."""
    import torch.nn.functional as F

    from vdm.model.unet import GroupNorm

    norm = GroupNorm(4, 8, silu=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0), norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 8, side, side, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact = F.silu(F.group_norm(x.float(), 4, norm.weight, norm.bias))
    with torch.no_grad():
        for layout in (torch.channels_last, torch.contiguous_format):
            xl = x.contiguous(memory_format=layout)
            before = xl.clone()
            low = norm(xl)
            assert low.dtype == torch.bfloat16 and low.is_contiguous(memory_format=layout)
            assert torch.equal(xl, before)
            assert torch.allclose(low.float(), exact, rtol=2**-7, atol=2**-7), float((low.float() - exact).abs().max())


def test_attention_on_the_cpu_is_float32_under_bf16_autocast():
    """bf16 queries, keys and values: softmax(q k^T / sqrt(d)) v computed in float32, rounded once."""
    import torch.nn.functional as F

    from vdm.model.magnitude import attend

    q, k, v = torch.randn(3, 2, 1, 36, 16, generator=torch.Generator().manual_seed(0)).bfloat16().unbind(0)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attend(q, k, v)
    assert low.dtype == torch.bfloat16 and torch.equal(low, exact.bfloat16())
    assert torch.equal(attend(q.float(), k.float(), v.float()), exact)  # float32 as it was


def test_bf16_training_loss_is_close_to_fp32_and_deterministic():
    model, x = _model().train(), _images()
    fp32 = model.loss(x, torch.Generator().manual_seed(0)).objective.mean().detach()
    model.net_dtype = torch.bfloat16
    bf16 = [model.loss(x, torch.Generator().manual_seed(0)).objective.mean() for _ in range(2)]
    assert torch.equal(bf16[0], bf16[1])  # a rerun at one setting is bit-identical
    assert torch.isfinite(bf16[0]) and abs(float(bf16[0].detach() - fp32)) <= 0.02 * abs(float(fp32))
    bf16[0].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_the_bound_and_the_fits_are_fp32_under_bf16():
    """estimate_bpd and fit_eps_scale of a bf16 model equal the fp32 model's to the bit, and leave
    its precision as it was."""
    model, x = _model(), _images()

    def bound():
        return estimate_bpd(model, x, time_samples=2, batch_size=4, generator=torch.Generator().manual_seed(3))

    def scale():
        return fit_eps_scale(model, x, seed=3, batch_size=4)["scale"]

    exact, exact_scale = bound(), scale()
    model.eps_scale.fill_(1.0)
    model.net_dtype = torch.bfloat16
    assert bound() == exact and scale() == exact_scale
    assert model.net_dtype == torch.bfloat16


# The fused bf16 GroupNorm(+SiLU) kernel that training on a CPU uses (vdm/model/fused.py).


def test_the_fused_kernel_builds_where_a_compiler_and_ninja_are():
    import shutil

    from vdm.model import fused

    if not (shutil.which("g++") or shutil.which("c++")) or not shutil.which("ninja"):
        pytest.skip("no C++ compiler or ninja: training takes the unfused paths")
    assert fused.available()


def _norm_case(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = (torch.randn(n, c, h, w, generator=g) * 2 + 0.5).bfloat16().contiguous(memory_format=cl)
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g) - 0.5
    dy = torch.randn(n, c, h, w, generator=g).bfloat16().contiguous(memory_format=cl)
    return x, weight, bias, dy


def _fused_grads(x, weight, bias, dy, groups, silu):
    from vdm.model import fused

    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = fused.GroupNormSiLU.apply(*leaves, groups, 1e-5, silu)
    y.backward(dy)
    return y.detach(), *(t.grad for t in leaves)


@pytest.mark.parametrize(
    ("shape", "groups", "silu"),
    [((3, 12, 7, 5), 4, True), ((2, 16, 6, 6), 8, False), ((4, 48, 20, 20), 16, True), ((1, 8, 1, 1), 2, True)],
)
def test_the_fused_norm_is_float32_arithmetic_rounded_once(shape, groups, silu):
    """Forward: the float32 norm (and SiLU) rounded once to bf16, channels-last; backward: dx within
    bf16's rounding of autograd's float32 gradient, dweight and dbias within float32 summation."""
    import torch.nn.functional as F

    from vdm.model import fused

    if not fused.available():
        pytest.skip("the fused kernel did not build here")
    x, weight, bias, dy = _norm_case(*shape)
    y, dx, dw, db = _fused_grads(x, weight, bias, dy, groups, silu)
    xr, wr, br = (t.float().clone().requires_grad_() for t in (x, weight, bias))
    ref = F.group_norm(xr, groups, wr, br, 1e-5)
    ref = F.silu(ref) if silu else ref
    ref.backward(dy.float())
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)
    assert ((y.float() - ref.detach()).abs() <= ref.detach().abs() * 2**-8 * 1.01 + 1e-5).all()
    assert (y == ref.detach().bfloat16()).float().mean() > 0.98  # the same rounding nearly everywhere
    assert (dx.float() - xr.grad).abs().max() <= 2**-7 * xr.grad.abs().max() + 1e-6
    assert torch.allclose(dw, wr.grad, rtol=1e-4, atol=1e-4) and torch.allclose(db, br.grad, rtol=1e-4, atol=1e-4)


def test_the_fused_norm_is_the_same_bits_on_one_thread_and_on_two():
    from vdm.model import fused

    if not fused.available():
        pytest.skip("the fused kernel did not build here")
    case, threads, out = _norm_case(5, 24, 9, 9, seed=3), torch.get_num_threads(), []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out.append(_fused_grads(*case, 8, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*out, strict=True))


def test_training_in_bf16_takes_the_fused_norm_and_without_it_the_round_trip(monkeypatch):
    """GroupNorm with gradients on a bf16 channels-last input is the fused kernel's result exactly;
    where the kernel is not built, the float32 norm and SiLU rounded to bf16."""
    import torch.nn.functional as F

    from vdm.model import fused
    from vdm.model.unet import GroupNorm

    norm = GroupNorm(4, 16, silu=True)
    x, _, _, _ = _norm_case(2, 16, 8, 8)
    if fused.available():
        assert torch.equal(
            norm(x.requires_grad_()), fused.GroupNormSiLU.apply(x, norm.weight, norm.bias, 4, 1e-5, True)
        )
    monkeypatch.setitem(fused._state, "ok", False)
    y = norm(x)
    assert y.dtype == torch.bfloat16 and y.grad_fn is not None
    assert torch.equal(y, F.silu(F.group_norm(x.float(), 4, norm.weight, norm.bias)).bfloat16())


def test_a_kernel_that_does_not_build_says_so_in_one_line(monkeypatch, capsys):
    from torch.utils import cpp_extension

    from vdm.model import fused

    def fail(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\n(and more lines)")

    monkeypatch.setattr(cpp_extension, "load", fail)
    assert fused._load() is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not build (Ninja is required" in err[0] and "install g++ and ninja" in err[0]
    monkeypatch.setenv("VDM_FUSED_KERNELS", "0")  # off on purpose: silent
    assert fused._load() is False and capsys.readouterr().err == ""
