import math

import pytest
import torch

from tests.helpers import bare_vdm
from vdm.model.schedules import SCHEDULES, make_schedule


@pytest.mark.parametrize("name", SCHEDULES)
def test_monotone_and_hits_endpoints(name):
    torch.manual_seed(0)
    s = make_schedule(name, -13.3, 5.0)
    t = torch.linspace(0, 1, 1001)
    with torch.no_grad():
        g, dg = s(t)
    assert g[0].item() == pytest.approx(-13.3, abs=1e-5) and g[-1].item() == pytest.approx(5.0, abs=1e-5)
    assert (g[1:] > g[:-1]).all() and (dg > 0).all()


@pytest.mark.parametrize("name", SCHEDULES)
def test_slope_matches_autograd(name):
    torch.manual_seed(0)
    s = make_schedule(name, -10.0, 4.0)
    t = torch.rand(64, requires_grad=True)
    g, dg = s(t)
    (auto,) = torch.autograd.grad(g.sum(), t)
    assert torch.allclose(dg, auto, rtol=1e-4, atol=1e-4)


def test_learned_schedules_receive_gradients_fixed_has_none():
    t = torch.rand(16)
    assert not list(make_schedule("fixed_linear", -13.3, 5.0).parameters())
    lin = make_schedule("learned_linear", -13.3, 5.0)
    lin(t)[0].sum().backward()
    assert lin.endpoints.grad is not None and (lin.endpoints.grad != 0).all()
    nn_ = make_schedule("learned_nn", -13.3, 5.0)
    g, dg = nn_(t)
    (g.sum() + dg.sum()).backward()
    for name, p in nn_.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("cosine", -13.3, 5.0)


class BinaryOracle(torch.nn.Module):
    """The Bayes-optimal eps predictor for data that is +-a in every dimension (a fixed,
    parameter-free toy denoiser): E[f|z] = a tanh(alpha a z / sigma^2)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, z, gamma):
        g = gamma.view(-1, 1, 1, 1)
        alpha, var = torch.sqrt(torch.sigmoid(-g)), torch.sigmoid(g)
        f_hat = self.a * torch.tanh(alpha * self.a * z / var)
        return (z - alpha * f_hat) / torch.sqrt(var)


@pytest.mark.parametrize("weighting", ["elbo", "sigmoid"])
def test_training_the_schedule_shape_lowers_the_loss_variance(weighting):
    """The learned_nn shape descends E[L^2] of the objective (VarianceGradient): with a fixed
    denoiser, the variance of the per-example objective falls, and keeps falling, while its mean
    stays. With a weighting that gives the shape no gradient through w(gamma_t) (the weight taken as
    a constant), the shape would instead drift to high noise at a held rate and the variance grow
    tenfold (the "fold" of docs/results.md): the mean is shape-invariant only with w in the path."""
    torch.manual_seed(0)
    a = 255 / 256
    weights = {"loss_weighting": weighting, "sigmoid_bias": -2.0}
    model = bare_vdm(BinaryOracle(a), make_schedule("learned_nn", -13.3, 5.0), antithetic=False, **weights)
    model.schedule.endpoints.requires_grad_(False)  # endpoints: trained by the bound, not here
    x = (torch.rand(256, 3, 4, 4) < 0.5).to(torch.uint8) * 255

    def stats():
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            d = torch.cat([model.loss(x, g).objective for _ in range(20)])
        return d.var().item(), d.mean().item()

    var0, mean0 = stats()
    opt = torch.optim.Adam([p for p in model.schedule.parameters() if p.requires_grad], lr=3e-2, eps=1e-12)
    gen = torch.Generator().manual_seed(1)
    variances = []
    for _ in range(3):
        for _ in range(200):
            opt.zero_grad()
            model.loss(x, gen).objective.mean().backward()
            opt.step()
        variances.append(stats()[0])
    var1, mean1 = stats()
    assert var1 < 0.5 * var0 and variances == sorted(variances, reverse=True), (var0, variances)
    assert mean1 == pytest.approx(mean0, rel=0.05)  # same objective, estimated with less noise


def test_the_gamma_1_cap_is_the_identity_below_it():
    """Below the cap a capped schedule computes the uncapped one's values and gradients to the bit,
    so a cap that never binds changes no run."""
    t = torch.rand(32, generator=torch.Generator().manual_seed(0))
    runs = []
    for cap in (math.inf, 8.0):
        torch.manual_seed(0)
        s = make_schedule("learned_nn", -13.3, 5.0, cap)
        g, dg = s(t)
        (g.square().sum() + dg.sum() + s.gamma_1).backward()
        runs.append((g, dg, [p.grad for p in s.parameters()]))
    (g_free, dg_free, grads_free), (g_cap, dg_cap, grads_cap) = runs
    assert torch.equal(g_free, g_cap) and torch.equal(dg_free, dg_cap)
    assert all(torch.equal(a, b) for a, b in zip(grads_free, grads_cap, strict=True))


@pytest.mark.parametrize("name", ["learned_linear", "learned_nn"])
def test_the_gamma_1_cap_holds_a_learned_gamma_1_pushed_past_it(name):
    torch.manual_seed(0)
    s = make_schedule(name, -13.3, 5.0, 6.0)
    opt = torch.optim.Adam(s.parameters(), lr=0.1)
    t = torch.linspace(0, 1, 65)
    for _ in range(30):  # push gamma_1 up: descend -gamma(1)
        opt.zero_grad()
        (-s(t)[0][-1] - s.gamma_1).backward()
        opt.step()
    assert s.endpoints[1].item() > 6.5  # the parameter went past the cap ...
    with torch.no_grad():
        g, dg = s(t)
    assert s.gamma_1.item() == 6.0 and g[-1].item() == pytest.approx(6.0, abs=1e-5)  # ... the schedule did not
    assert (g[1:] > g[:-1]).all() and (dg > 0).all() and g[0].item() == pytest.approx(s.gamma_0.item(), abs=1e-5)
