import pytest
import torch

from tests.helpers import model_params
from vdm.core.errors import UserError
from vdm.model.diffusion import build_vdm
from vdm.model.unet import UNet, fourier_features
from vdm.training.ema import make_ema, warmup_decay


@pytest.mark.parametrize("patch,channels", [(1, 16), (2, 32), (4, 96)])
def test_output_matches_input_shape_and_starts_at_zero(patch, channels):
    torch.manual_seed(0)
    net = UNet(
        model_params(
            channels=channels, channel_mult=[1, 2], attention_resolutions=[32 // patch // 2], patch_size=patch
        ),
        32,
    )
    z = torch.randn(2, 3, 32, 32)
    out = net(z, torch.tensor([-5.0, 3.0]))
    assert out.shape == z.shape
    assert out.abs().max() == 0  # zero-initialised output: eps_hat = 0 at the start


def test_learns_something_and_every_parameter_gets_gradient():
    torch.manual_seed(0)
    net = UNet(model_params(channels=32, channel_mult=[1, 2], attention_resolutions=[16, 8], patch_size=1), 16)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    z, g = torch.randn(2, 3, 16, 16), torch.tensor([0.0, 1.0])
    for _ in range(4):  # zero-initialised layers pass gradient back once they have moved
        opt.zero_grad()
        (net(z, g) - z).square().mean().backward()
        opt.step()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    net = UNet(model_params(channels=32, channel_mult=[1, 2], attention_resolutions=[8], patch_size=2), 16)
    for p in net.parameters():  # move off the zero init so the output is informative
        p.data.add_(0.01 * torch.randn_like(p))
    z, g = torch.randn(2, 3, 16, 16), torch.tensor([-3.0, 2.0])
    ref = net(z, g)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(z.contiguous(memory_format=torch.channels_last), g)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(channels=40, patch_size=4), "too few for a 4x4 stem"),
        (dict(channels=8, patch_size=2), "too few for a 2x2 stem"),
        (dict(patch_size=3), "patch_size"),
        (dict(channel_mult=[1, 2, 2, 2, 2]), "cannot be halved"),
        (dict(attention_resolutions=[7]), "not feature-map sizes"),
    ],
)
def test_configs_that_cannot_work_are_rejected_by_name(kw, match):
    with pytest.raises((UserError, ValueError), match=match):
        build_vdm(model_params(**kw), image_size=48)


def test_fourier_features_resolve_adjacent_pixel_levels():
    z = torch.tensor([0.0, 1 / 128]).view(1, 1, 2, 1)  # two adjacent levels
    h = fourier_features(z, 6, 8)
    assert h.shape == (1, 1 + 2 * 3, 2, 1)
    # at 2^7 * 2pi the features of neighbouring levels differ by a whole unit
    assert (h[0, :, 0, 0] - h[0, :, 1, 0]).abs().max() > 0.9


def test_ema_warms_up_then_averages():
    assert warmup_decay(0.999, 0) == pytest.approx(0.1) and warmup_decay(0.999, 10**6) == 0.999
    model = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(model, 0.999)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update_parameters(model)  # the first update copies
    for _ in range(50):
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema.update_parameters(model)
    w = ema.module.weight.item()
    assert 0.5 < w < 1.0  # followed the model in 50 steps; a fixed 0.999 would be at ~0.05
    assert ema.module is not model


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    net = UNet(model_params(channels=32, channel_mult=[1, 2], attention_resolutions=[8], patch_size=2), 16)
    for p in net.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    z, g = torch.randn(2, 3, 16, 16), torch.tensor([-3.0, 2.0])

    def grads():
        net.zero_grad()
        net(z, g).square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    net.checkpointing = True
    for a, b in zip(plain, grads(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_qk_norm_attention_is_softmax_of_sqrt_d_cosines():
    """model.qk_norm: logits sqrt(d) cos(q, k), the same at any scale of the queries and keys."""
    import math

    import torch.nn.functional as F

    from vdm.model.unet import Attention

    torch.manual_seed(0)
    att = Attention(64, qk_norm=True)
    torch.nn.init.normal_(att.proj.weight, std=0.1)
    torch.nn.init.zeros_(att.qkv.bias)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        got = att(x)
        qkv = att.qkv(att.norm(x)).reshape(2, 3, 64, 16).transpose(-1, -2)  # one head of 64
        q, k, v = F.normalize(qkv[:, 0], dim=-1), F.normalize(qkv[:, 1], dim=-1), qkv[:, 2]
        w = torch.softmax(math.sqrt(64) * q @ k.transpose(-1, -2), dim=-1)
        assert torch.allclose(got, x + att.proj((w @ v).transpose(-1, -2).reshape(2, 64, 4, 4)), atol=1e-5)
        att.qkv.weight.mul_(100.0)  # queries, keys and values 100x larger: the same attention weights
        big = att(x)
    assert torch.allclose(big - x, 100 * (got - x), rtol=1e-3, atol=1e-3)


def test_weight_floor_raises_the_weighting_to_at_least_the_floor():
    model = build_vdm(model_params(channels=16, channel_mult=[1], attention_resolutions=[], weight_floor=0.01), 16)
    gamma = torch.linspace(-13, 5, 50)
    w = model.weight(gamma)
    assert torch.equal(w, torch.clamp(torch.sigmoid(gamma - 2.0), min=0.01)) and float(w.min()) == pytest.approx(0.01)
    plain = build_vdm(model_params(channels=16, channel_mult=[1], attention_resolutions=[]), 16)
    assert torch.equal(plain.weight(gamma), torch.sigmoid(gamma - 2.0))
