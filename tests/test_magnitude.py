"""model.magnitude_preserving: normalised weights held at their length, unit-variance activations."""

import math

import pytest
import torch

from tests.helpers import model_params
from vdm.model.magnitude import MPConv, mp_cat, normalise, pixel_norm
from vdm.model.unet import UNet


def unit_rms(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(1).square().mean(1).sqrt()


@pytest.mark.parametrize("kernel", [0, 1, 3])
def test_a_layer_keeps_unit_variance_and_its_stored_weights_their_length(kernel):
    torch.manual_seed(0)
    conv = MPConv(96, 64, kernel)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(64, *[1] * (conv.weight.ndim - 1)) * 10 + 0.5)  # rows of any length
    x = torch.randn(8, 96) if kernel == 0 else torch.randn(8, 96, 16, 16)
    y = conv(x)  # training mode, gradient on: the stored weights are normalised in place
    assert torch.allclose(unit_rms(conv.weight.detach()), torch.ones(64), atol=1e-3)
    inner = y if kernel == 0 else y[:, :, 1:-1, 1:-1]  # away from the zero padding
    assert inner.std().item() == pytest.approx(1.0, abs=0.05)
    assert conv(x, gain=0.5).std().item() == pytest.approx(0.5 * y.std().item(), rel=1e-4)
    conv.eval()
    with torch.no_grad():
        conv.weight.mul_(3.0)  # evaluation uses the normalised weight but leaves the stored one alone
        assert torch.allclose(conv(x), y, atol=2e-3)
    assert torch.allclose(unit_rms(conv.weight), torch.full((64,), 3.0), atol=1e-3)


def test_the_gradient_cannot_lengthen_a_weight():
    """The weight is used normalised, so its gradient is orthogonal to it (per output unit)."""
    torch.manual_seed(0)
    conv = MPConv(32, 16, 3)
    conv(torch.randn(4, 32, 8, 8)).square().mean().backward()
    w, g = conv.weight.detach().flatten(1), conv.weight.grad.flatten(1)
    cos = (w * g).sum(1) / (w.norm(dim=1) * g.norm(dim=1))
    assert cos.abs().max() < 1e-3  # (a plain conv under this loss: cos near 1, the gradient lengthens w)


def test_pixel_norm_and_concatenation_keep_unit_variance():
    torch.manual_seed(0)
    x = torch.randn(4, 48, 8, 8) * 7
    assert torch.allclose(pixel_norm(x).square().mean(1), torch.ones(4, 8, 8), atol=1e-3)
    a, b = torch.randn(4, 96, 8, 8), torch.randn(4, 32, 8, 8)
    c = mp_cat(a, b, t=0.5)
    assert c.shape[1] == 128 and c.var().item() == pytest.approx(1.0, abs=0.03)
    # each part carries its share (1 - t)^2 : t^2 of the energy, whatever its channel count
    assert c[:, :96].square().sum().item() / c[:, 96:].square().sum().item() == pytest.approx(1.0, rel=0.05)
    assert torch.allclose(normalise(torch.full((3, 5), 2.0)), torch.ones(3, 5), atol=1e-3)


def mp_net(colour_classes: int = 0):
    """(Without colour classes by default: the class layer's rows are 14 wide, so one step of the
    absurd rate below moves their length by more than the tolerance that holds for the wide layers.)"""
    return UNet(
        model_params(
            channels=32,
            channel_mult=[1, 2],
            attention_resolutions=[8],
            patch_size=2,
            magnitude_preserving=True,
            colour_classes=colour_classes,
        ),
        32,
    )


def test_the_net_has_no_group_norm_no_biases_and_starts_at_zero():
    torch.manual_seed(0)
    for net in (mp_net(), mp_net(colour_classes=13)):
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
        assert all(p.ndim >= 2 or p.ndim == 0 for p in net.parameters())  # weights and scalar gains only
        z = torch.randn(2, 3, 32, 32)
        assert net(z, torch.tensor([-5.0, 3.0])).abs().max() == 0  # the output's gain starts at zero
    # the classes' normalised layer enters through a gain from zero: the net starts unconditioned
    torch.nn.init.normal_(net.out_gain)
    with torch.no_grad():
        assert torch.equal(
            net(z, torch.tensor([-5.0, 3.0]), colour=torch.tensor([2, 7])), net(z, torch.tensor([-5.0, 3.0]))
        )


def test_weights_stay_at_their_length_whatever_the_step():
    """The property a held learning rate needs: however large a step, no weight (so no activation and
    attention logit) grows but through the few scalar gains; the standard net's activations explode
    under the same steps."""
    torch.manual_seed(1)
    z, g = torch.randn(4, 3, 32, 32), torch.tensor([-8.0, -2.0, 0.0, 3.0])

    def train(net):
        opt = torch.optim.Adam(net.parameters(), lr=0.5)  # absurdly large steps
        acts = []
        hook = net.mid[0].register_forward_hook(lambda _m, _i, out: acts.append(out.detach().std().item()))
        for _ in range(6):
            opt.zero_grad()
            (net(z, g) - z).square().mean().backward()
            opt.step()
        hook.remove()
        return acts

    torch.manual_seed(0)
    net = mp_net()
    acts = train(net)
    for name, p in net.named_parameters():
        if p.ndim >= 2:
            assert torch.allclose(unit_rms(p.detach()), torch.ones(p.shape[0]), atol=0.35), name  # one step's drift
    assert max(acts) < 10 * acts[0]
    torch.manual_seed(0)
    plain = UNet(model_params(channels=32, channel_mult=[1, 2], attention_resolutions=[8], patch_size=2), 32)
    plain_acts = train(plain)
    assert max(plain_acts) > 1000 * plain_acts[0]


def test_every_parameter_gets_gradient_and_the_net_learns():
    torch.manual_seed(0)
    net = mp_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    z, g = torch.randn(2, 3, 32, 32), torch.tensor([0.0, 1.0])
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = (net(z, g) - z).square().mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing and losses[-1] < 0.95 * losses[0]


def test_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    net = mp_net()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        for m in net.modules():
            if hasattr(m, "emb_gain"):
                m.emb_gain.fill_(0.5)
    net.eval()
    z, g = torch.randn(2, 3, 32, 32), torch.tensor([-5.0, 1.0])
    with torch.no_grad():
        ref = net(z, g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(z, g)
    assert low.dtype == torch.float32
    assert (low - ref).square().mean().sqrt() < 0.05 * ref.square().mean().sqrt()
    assert math.isfinite(ref.abs().max().item())


def test_a_magnitude_preserving_run_trains_reruns_identically_loads_and_samples(tmp_path, processed):
    from tests.helpers import outs, same_weights, tiny, walk, weights
    from vdm.core.params import parse_params
    from vdm.model.checkpoint import load_model
    from vdm.sampling.samplers import sample
    from vdm.training.loop import train
    from vdm.training.step import build_training

    raw = tiny(steps=3, eval_every=0, sample_every=0, lr=0.01, adam_eps=1e-12, device="cpu")
    raw["model"]["magnitude_preserving"] = True
    p = parse_params(raw)
    model, _, _, _ = build_training(p, torch.device("cpu"))
    assert model.net.stem.weight.is_contiguous()  # trained contiguous, not channels_last
    for run in ("a", "b"):
        train(p, processed, outs(tmp_path / run))
    assert same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    stored = {k: v for k, v in weights(tmp_path / "a").items() if k.startswith("net.") and v.ndim >= 2}
    drifted = [k for k, w in stored.items() if not torch.allclose(unit_rms(w), torch.ones(w.shape[0]), atol=0.05)]
    assert stored and not drifted  # every UNet weight at unit length, but for the last step's move
    model, cfg = load_model(tmp_path / "a/models")
    assert cfg["params"]["model"]["magnitude_preserving"] and isinstance(model.net.stem, MPConv)
    x, _ = sample(model, 2, walk(2), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
