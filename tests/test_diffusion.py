import math

import numpy as np
import pytest
import torch

from tests.helpers import bare_vdm, model_params, walk
from vdm.model.bound import estimate_bpd
from vdm.model.conversions import encode
from vdm.model.decoder import decoder_nll, log_prob_levels_full, recon_stride, window_half_width
from vdm.model.diffusion import build_vdm
from vdm.model.schedules import make_schedule
from vdm.sampling.samplers import sample, solve, vdm_denoiser

LN2 = math.log(2)


class Zero(torch.nn.Module):
    def forward(self, z, gamma):
        return torch.zeros_like(z)


class Linear(torch.nn.Module):
    """eps_hat = c * z_t: a fixed denoiser whose expected loss has a closed form per t."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, z, gamma):
        return self.c * z


def images(n=4, size=8, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("gamma_0", [-13.3, -12.0, -10.0, -8.0, -7.0, -6.0, -5.0, -3.0, 1.0])
def test_windowed_reconstruction_equals_the_full_256_level_sum(gamma_0):
    """decoder_nll (a window of levels, written in q's draw, its own derivative) is -log p(x | z_0)
    of the full 256-level softmax through autograd: values and d/d gamma_0, at any gamma_0."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    x[0, 0, 0, :4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)  # window clamped at the edges
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    eps[1, 0, 0, :4] = torch.tensor([6.0, -6.0, 0.5 / 0.19, -0.5 / 0.19])  # far tails; midway between levels
    g0 = torch.tensor(gamma_0, dtype=torch.float64, requires_grad=True)
    fast = decoder_nll(x, eps, g0)
    full = -log_prob_levels_full(x, encode(x).double() + torch.exp(0.5 * g0) * eps, g0)
    (d_fast,), (d_full,) = torch.autograd.grad(fast.sum(), g0), torch.autograd.grad(full.sum(), g0)
    assert torch.allclose(fast, full, rtol=0, atol=1e-9), (fast - full).abs().max()
    assert torch.allclose(d_fast, d_full, rtol=1e-9), (d_fast, d_full)
    # float32, as in training: the same to float precision
    g32 = g0.detach().float().requires_grad_()
    fast32 = decoder_nll(x, eps.float(), g32)
    (d32,) = torch.autograd.grad(fast32.sum(), g32)
    assert torch.allclose(fast32.double(), full.detach(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(d32.double(), d_full, rtol=1e-4)


@pytest.mark.parametrize("gamma_0", [-13.3, -5.5, -2.0])
def test_a_wide_window_taken_in_pieces_is_the_same_to_the_bit(gamma_0):
    """Chunking over the batch bounds the memory of a wide window and changes no bit of the values."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (7, 3, 8, 8), generator=g, dtype=torch.uint8)
    g0 = torch.tensor(gamma_0, requires_grad=True)
    eps = torch.randn(x.shape, generator=g)
    whole = decoder_nll(x, eps, g0)
    (dg,) = torch.autograd.grad(whole.sum(), g0)
    for chunk in (1, 3 * 8 * 8 * 5, 10**9):  # one row at a time, a few rows, all at once
        part = decoder_nll(x, eps, g0, chunk=chunk)
        assert torch.equal(part, whole)
        (pg,) = torch.autograd.grad(part.sum(), g0)
        # d/d gamma_0 is a float32 sum of 1,344 terms in another order, with cancellation (terms up to
        # ~50x the total): its last ~4 digits depend on the order and the CPU's vector width
        assert torch.allclose(pg, dg, rtol=1e-4)


def test_window_is_small_at_gamma_min_and_widens_to_the_full_sum():
    assert 2 * window_half_width(-13.3) + 1 == 5
    widths = [window_half_width(g) for g in np.linspace(-13.3, -5, 9)]
    assert widths == sorted(widths) and 2 * window_half_width(-2.0) + 1 >= 256


def test_latent_term_equals_the_closed_form_kl():
    model = bare_vdm(Zero(), make_schedule("fixed_linear", -13.3, 2.0))
    x = images()
    loss = model.loss(x, torch.Generator().manual_seed(0))
    g1 = torch.tensor(2.0)
    q = torch.distributions.Normal(torch.sqrt(torch.sigmoid(-g1)) * encode(x), torch.sqrt(torch.sigmoid(g1)))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(loss.latent, kl / (x[0].numel() * LN2), rtol=1e-5)


@pytest.mark.parametrize("schedule", ["fixed_linear", "learned_nn"])
def test_diffusion_estimator_matches_a_numerical_integral(schedule):
    torch.manual_seed(0)
    c = 0.6
    model = bare_vdm(Linear(c), make_schedule(schedule, -10.0, 6.0), antithetic=True)
    x = images(n=64, size=4)
    f = encode(x)
    d = x[0].numel()
    # E_eps ||eps - c z_t||^2 = D (1 - c sigma)^2 + c^2 alpha^2 ||f||^2; integrate over t numerically
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    with torch.no_grad():
        gam, dgam = (v.double() for v in model.schedule(t.float()))
    alpha, sigma = torch.sqrt(torch.sigmoid(-gam)), torch.sqrt(torch.sigmoid(gam))
    f2 = (f.double() ** 2).flatten(1).sum(1).mean()
    integrand = 0.5 * dgam * (d * (1 - c * sigma) ** 2 + c**2 * alpha**2 * f2)
    exact = torch.trapezoid(integrand, t) / (d * LN2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        est = torch.cat([model.loss(x, g).diffusion for _ in range(200)]).mean()
    assert est.item() == pytest.approx(exact.item(), rel=0.01)


def test_discrete_time_loss_with_a_zero_denoiser_matches_its_formula():
    t_steps, g0, g1 = 10, -10.0, 6.0
    model = bare_vdm(Zero(), make_schedule("fixed_linear", g0, g1), timesteps=t_steps)
    x = images(n=4096, size=4)
    with torch.no_grad():
        est = model.loss(x, torch.Generator().manual_seed(0)).diffusion.mean().item()  # +-0.3% (1 s.e.)
    # each step: gamma_t - gamma_s = (g1 - g0)/T; E||eps||^2 = D
    exact = 0.5 * t_steps * math.expm1((g1 - g0) / t_steps) / LN2
    assert est == pytest.approx(exact, rel=0.01)
    continuous = 0.5 * (g1 - g0) / LN2
    assert exact > continuous  # T steps bound the continuous-time loss from above


def test_oracle_denoiser_drives_the_diffusion_term_to_zero():
    x = images()
    f = encode(x)

    class Oracle(torch.nn.Module):
        def forward(self, z, gamma):
            g = gamma.view(-1, 1, 1, 1)
            return (z - torch.sqrt(torch.sigmoid(-g)) * f) / torch.sqrt(torch.sigmoid(g))

    loss = bare_vdm(Oracle(), make_schedule("learned_nn", -13.3, 5.0)).loss(x, torch.Generator().manual_seed(0))
    assert loss.diffusion.abs().max().item() < 1e-3
    assert loss.total.min().item() > 0


@pytest.mark.parametrize("gamma_min", [-15.0, -13.3, -10.0, -7.0, -5.0])
def test_all_terms_finite_across_gamma_min(gamma_min):
    model = build_vdm(model_params(gamma_min=gamma_min), image_size=16)
    loss = model.loss(images(size=16), torch.Generator().manual_seed(0))
    for k, v in loss.means().items():
        assert math.isfinite(v), k
    loss.total.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_same_seed_same_loss_and_samples():
    def run():
        model = build_vdm(model_params(), image_size=16)
        x = images(size=16)
        loss = model.loss(x, torch.Generator().manual_seed(5)).total
        samples, traj = sample(model, 3, walk(8), generator=torch.Generator().manual_seed(7), trajectory_points=4)
        return loss, samples, traj

    (l1, s1, t1), (l2, s2, t2) = run(), run()
    assert torch.equal(l1, l2) and torch.equal(s1, s2)
    assert s1.dtype == torch.uint8 and s1.shape == (3, 3, 16, 16)
    assert len(t1) == 4 and all(a.shape == (3, 3, 16, 16) and a.dtype == torch.uint8 for a in t1)
    assert all(torch.equal(a, b) for a, b in zip(t1, t2, strict=True))
    other, _ = sample(build_vdm(model_params(), 16), 3, walk(8), generator=torch.Generator().manual_seed(8))
    assert not torch.equal(s1, other)


def test_sampler_batches_give_the_same_images_per_seed_stream():
    model = build_vdm(model_params(), image_size=16)
    a, _ = sample(model, 4, walk(4), generator=torch.Generator().manual_seed(0))
    assert a.shape == (4, 3, 16, 16) and int(a.max()) <= 255


def test_sampler_of_an_exact_denoiser_reproduces_the_data_point():
    """With eps_hat exact for a single data point, ancestral sampling lands on it."""
    x = images(n=1, size=4)
    f = encode(x)

    class PointOracle(torch.nn.Module):
        def forward(self, z, gamma):
            g = gamma.view(-1, 1, 1, 1)
            return (z - torch.sqrt(torch.sigmoid(-g)) * f) / torch.sqrt(torch.sigmoid(g))

    model = bare_vdm(PointOracle(), make_schedule("fixed_linear", -13.3, 5.0))
    model.net.image_size = 4
    out, _ = sample(model, 2, walk(50), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x.expand(2, -1, -1, -1))


def test_estimate_bpd_mean_and_standard_error():
    model = bare_vdm(Zero(), make_schedule("fixed_linear", -13.3, 5.0))
    x = images(n=10, size=4)
    r1 = estimate_bpd(model, x, time_samples=1, batch_size=4, generator=torch.Generator().manual_seed(0))
    r8 = estimate_bpd(model, x, time_samples=8, batch_size=4, generator=torch.Generator().manual_seed(0))
    expected = 0.5 * 18.3 / LN2  # zero denoiser, linear schedule: E[diffusion] = (g1 - g0) / (2 ln 2)
    assert r8["diffusion"] == pytest.approx(expected, rel=0.02)
    assert r8["total"] == pytest.approx(r8["diffusion"] + r8["latent"] + r8["recon"], rel=1e-6)
    assert 0 < r8["total_se"] < r1["total_se"]  # more time samples per image, less noise
    assert r1["images"] == 10 and r8["time_samples"] == 8


class Oracle(torch.nn.Module):
    """Returns whatever tensor the test put in `out` (a perfect prediction, or garbage)."""

    out = None

    def forward(self, z, gamma):
        return self.out


def test_v_and_x_prediction_recover_eps():
    """A net that outputs the true v = alpha eps - sigma f (or the true f) gives eps_hat = eps."""
    g = torch.Generator().manual_seed(0)
    f = encode(images(n=3))
    eps = torch.randn(f.shape, generator=g)
    gamma = torch.tensor([-10.0, 0.0, 4.0])
    a, s = torch.sqrt(torch.sigmoid(-gamma)).view(-1, 1, 1, 1), torch.sqrt(torch.sigmoid(gamma)).view(-1, 1, 1, 1)
    z = a * f + s * eps
    net = Oracle()
    net.out = a * eps - s * f
    model = bare_vdm(net, make_schedule("fixed_linear", -13.3, 5.0), prediction="v")
    assert torch.allclose(model.eps_hat(z, gamma), eps, atol=1e-5)
    net.out = f
    x_model = bare_vdm(net, make_schedule("fixed_linear", -13.3, 5.0), prediction="x")
    assert torch.allclose(x_model.eps_hat(z, gamma), eps, atol=1e-4)
    # x with a skip below noise-to-signal 0.02: the net's F is blended with z_t / alpha_t
    skip = bare_vdm(net, make_schedule("fixed_linear", -13.3, 5.0), prediction="x", x_skip_noise=0.02)
    c_skip = torch.sigmoid(2 * math.log(0.02) - gamma).view(-1, 1, 1, 1)
    net.out = (f - c_skip * z / a) / torch.sqrt(1 - c_skip)
    assert torch.allclose(skip.eps_hat(z, gamma), eps, atol=1e-3)
    net.out = torch.zeros_like(z[:2])  # F = 0: x_hat = z / alpha at very high SNR, 0 (the net's F) at low SNR
    g = torch.tensor([-13.3, 0.0])
    a2, s2 = torch.sqrt(torch.sigmoid(-g)).view(-1, 1, 1, 1), torch.sqrt(torch.sigmoid(g)).view(-1, 1, 1, 1)
    x_hat = (z[:2] - s2 * skip.eps_hat(z[:2], g)) / a2
    assert torch.allclose(x_hat[0], z[0] / a2[0], rtol=0.01) and x_hat[1].abs().max() < 5e-3
    net.out = torch.zeros_like(z)  # an untrained v-net: eps_hat = sigma z, i.e. x_hat = alpha z (bounded)
    assert torch.allclose(model.eps_hat(z, gamma), s * z)
    # the same net read as an eps-predictor predicts eps = 0
    assert torch.equal(bare_vdm(net, make_schedule("fixed_linear", -13.3, 5.0)).eps_hat(z, gamma), net.out)


@pytest.mark.parametrize("prediction", ["eps", "v", "x"])
def test_sigmoid_weighting_changes_the_objective_never_the_reported_bound(prediction):
    x = images(n=8)
    losses = {}
    for name, weighting, bias in [("elbo", "elbo", 0.0), ("w~1", "sigmoid", 25.0), ("w~0", "sigmoid", -25.0)]:
        torch.manual_seed(0)
        model = bare_vdm(
            Linear(0.5),
            make_schedule("learned_nn", -13.3, 5.0),
            antithetic=False,
            prediction=prediction,
            loss_weighting=weighting,
        )
        model.sigmoid_bias = bias  # +-25: beyond params.yaml's range, so w ~ 1 or ~ 0 over the whole schedule
        losses[name] = model.loss(x, torch.Generator().manual_seed(3))
    elbo = losses["elbo"]
    assert torch.equal(elbo.objective, elbo.total)
    for name in ("w~1", "w~0"):  # same draws: the bound is identical whatever the weighting
        assert torch.allclose(losses[name].total, elbo.total)
    assert torch.allclose(losses["w~1"].objective, elbo.total, rtol=1e-4)  # sigmoid(gamma + 25) ~ 1
    assert torch.allclose(losses["w~0"].objective, elbo.latent + elbo.recon, rtol=1e-4)  # ~ 0: no diffusion term


def test_clipping_keeps_a_wild_model_inside_the_data_range():
    """A net whose x_hat is far outside [-1, 1]: unclipped, one step throws z_s far outside
    anything the data can produce; clipped, z_s is what x = -1 (black) would give."""
    net = Oracle()
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    net.out = torch.full_like(z, 50.0)  # v = 50: x_hat = alpha z - 50 sigma
    model = bare_vdm(net, make_schedule("fixed_linear", -13.3, 5.0), prediction="v")
    gammas = torch.tensor([-4.0, -4.5])

    def step(clip: bool) -> torch.Tensor:  # one ancestral step from gamma -4 to -4.5, the same noise each time
        return solve(vdm_denoiser(model, clip), z, gammas, walk(1), torch.Generator().manual_seed(3))[0]

    wild, tame = step(clip=False), step(clip=True)
    assert wild.mean() < -2  # pulled towards x_hat = z - 6.7
    # clipped: exactly the step of a net whose x_hat is -1 everywhere
    a, s = math.sqrt(torch.sigmoid(torch.tensor(4.0))), math.sqrt(torch.sigmoid(torch.tensor(-4.0)))
    net.out = (a * z + 1.0) / s  # alpha z - sigma v = -1
    assert torch.allclose(tame, step(clip=False), atol=1e-4)
    net.out = torch.full_like(z, 50.0)
    net.image_size = 8
    x, _ = sample(model, 4, walk(8, clip_denoised=True), generator=torch.Generator().manual_seed(1))
    assert (x == 0).all()  # every step's x_hat was clipped to -1: black


def test_overfits_a_few_sprites():
    """A tiny model on 8 synthetic sprites: train bits/dim clearly falls within 200 CPU steps."""
    from vdm.core.images import decode, png_bytes
    from vdm.data.synthetic import draw_sprite

    x = torch.from_numpy(np.stack([decode(png_bytes(draw_sprite(0, k)), 32).pixels for k in range(8)]))
    x = x.permute(0, 3, 1, 2).contiguous()
    # trained on the bound itself (the weighted objective trades bits/dim for sample quality)
    config = model_params(
        channels=32, channel_mult=[1, 2], attention_resolutions=[], prediction="eps", loss_weighting="elbo"
    )
    model = build_vdm(config, image_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)

    def bpd():
        with torch.no_grad():
            return estimate_bpd(model, x, time_samples=16, generator=torch.Generator().manual_seed(9))["total"]

    before = bpd()
    for _ in range(200):
        opt.zero_grad()
        model.loss(x, gen).total.mean().backward()
        opt.step()
    after = bpd()
    print(f"bits/dim before {before:.3f}, after {after:.3f}")
    assert after < 0.6 * before, (before, after)


class BadBelow(torch.nn.Module):
    """The exact eps of a data set of one image, plus an error of 3 wherever gamma < `below`."""

    def __init__(self, f, below):
        super().__init__()
        self.f, self.below = f, below

    def forward(self, z, gamma):
        g = gamma.view(-1, 1, 1, 1)
        exact = (z - torch.sqrt(torch.sigmoid(-g)) * self.f) / torch.sqrt(torch.sigmoid(g))
        return exact + 3.0 * (g < self.below).float()


@pytest.mark.parametrize("below, expected", [(-math.inf, -13.0), (-6.0, -6.0), (-6.2, -6.0)])
def test_fit_gamma_0_moves_the_endpoint_to_where_denoising_stops_paying(below, expected):
    from vdm.model.bound import fit_gamma_0

    x = images(n=64).clone()
    x[:] = x[:1]  # one image: the exact denoiser is known in closed form
    model = bare_vdm(BadBelow(encode(x[:1]), below), make_schedule("learned_linear", -13.0, 5.0))
    fit = fit_gamma_0(model, x, seed=0, batch_size=64)  # antithetic times: 64 strata of t per batch
    # exact above `below`: the bound is the decoder term alone, which only grows with gamma_0; below it
    # an eps error of 3 costs 0.5 * 9 / ln 2 = 6.5 bits per dim per unit of gamma, more than the decoder saves
    assert fit["gamma_0"] == expected and model.schedule.gamma_0.item() == expected
    assert fit["gamma_0_learned"] == -13.0 and model.schedule.gamma_1.item() == 5.0
    curve = dict((g, b) for g, b in fit["curve"])
    assert fit["bpd_fitted"] == min(curve.values()) == curve[expected]
    assert fit["bpd_learned"] == curve[-13.0] and fit["bpd_fitted"] <= fit["bpd_learned"]
    if below > -math.inf:
        assert fit["bpd_learned"] > fit["bpd_fitted"] + 6.0  # 7 units of gamma at 6.5 bits each, less the decoder
    # the fitted model's own bound, with the same draws, is the curve's value
    again = estimate_bpd(model, x, 1, 64, torch.Generator().manual_seed(0))["total"]
    assert again == pytest.approx(fit["bpd_fitted"], rel=1e-6)


class TimesBelow(torch.nn.Module):
    """The exact eps of a data set of one image, multiplied by `factor` wherever gamma < `below`."""

    def __init__(self, f, below, factor):
        super().__init__()
        self.f, self.below, self.factor = f, below, factor

    def forward(self, z, gamma):
        g = gamma.view(-1, 1, 1, 1)
        exact = (z - torch.sqrt(torch.sigmoid(-g)) * self.f) / torch.sqrt(torch.sigmoid(g))
        return exact * torch.where(g < self.below, self.factor, 1.0)


def test_fit_eps_scale_undoes_a_known_error_and_leaves_the_samplers_estimate_alone():
    from vdm.model.bound import fit_eps_scale
    from vdm.model.diffusion import EPS_SCALE_GRID

    x = images(n=64).clone()
    x[:] = x[:1]
    model = bare_vdm(TimesBelow(encode(x[:1]), -6.0, 4.0), make_schedule("learned_linear", -13.0, 5.0)).eval()
    before = estimate_bpd(model, x, 1, 64, torch.Generator().manual_seed(0))["total"]
    z, gamma = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([-9.0, -2.0])
    x_hat_before = model.x_hat(z, gamma)
    fit = fit_eps_scale(model, x, seed=0)
    # from the grid point at gamma_0 = -13 up to the one at gamma_1 = 5
    assert fit["gamma"] == [-13.0 + 0.5 * k for k in range(37)]
    for g, c in zip(fit["gamma"], fit["scale"], strict=True):  # 4x too large below -6: the factor is 1/4
        assert c == pytest.approx(0.25 if g < -6.0 else 1.0, abs=1e-5), g
    assert fit["gamma_half"] == pytest.approx(-6.5 + 0.5 * (0.25 / 0.75), abs=1e-4)
    first, _, step = EPS_SCALE_GRID
    table, lo, hi = model.eps_scale, round((-13.0 - first) / step), round((5.0 - first) / step)
    assert torch.all(table[:lo] == table[lo]) and torch.all(table[hi + 1 :] == table[hi])  # the end values outside
    assert model.eps_scale_at(torch.tensor([-8.0, -6.25, 3.0])).tolist() == pytest.approx([0.25, 0.625, 1.0], abs=1e-5)
    # the bound: an eps error of 3 over 7 units of gamma (6.5 bits/dim each) is gone, up to the one
    # grid cell (-6.5, -6) where the interpolated factor meets the jump
    after = estimate_bpd(model, x, 1, 64, torch.Generator().manual_seed(0))["total"]
    assert after < before - 40.0, (before, after)
    # the samplers' x_hat is the network's own; in training mode the bound's eps_hat is too
    assert torch.equal(model.x_hat(z, gamma), x_hat_before)
    model.train()
    assert torch.equal(model.eps_hat(z, gamma), model.net(z, gamma))
    model.eval()
    assert torch.allclose(model.eps_hat(z, gamma)[0], 0.25 * model.net(z, gamma)[0])
    again = fit_eps_scale(model, x, seed=0)  # the table is reset before each fit
    assert again["scale"] == fit["scale"]


def test_fit_eps_scale_finds_the_mean_square_mix_of_x_hat_and_z():
    """A net whose x_hat errs by independent noise of variance v: the best mix of x_hat and z_t / alpha_t
    (error variance s^2 = e^gamma) weighs x_hat by s^2 / (s^2 + v), which is the fitted eps factor."""
    from vdm.model.bound import fit_eps_scale
    from vdm.model.conversions import alpha_sigma, eps_from_x

    x = images(n=64, size=16).clone()
    x[:] = x[:1]
    f = encode(x[:1])
    v = math.exp(-6.0)

    class NoisyX(torch.nn.Module):
        def forward(self, z, gamma):
            g = gamma.view(-1, 1, 1, 1)
            alpha, sigma = alpha_sigma(g)
            err = torch.randn(z.shape, generator=torch.Generator().manual_seed(int(z.abs().sum() * 1e3) % 2**31))
            return eps_from_x(z, f + math.sqrt(v) * err, alpha, sigma)

    model = bare_vdm(NoisyX(), make_schedule("learned_linear", -9.0, 5.0)).eval()
    fit = fit_eps_scale(model, x, seed=0)
    for g, c in zip(fit["gamma"], fit["scale"], strict=True):
        s2 = math.exp(g)
        assert c == pytest.approx(s2 / (s2 + v), abs=0.01), g
    assert fit["gamma_half"] == pytest.approx(-6.0, abs=0.05)


def test_edm_weighting_is_its_log_normal_density_times_its_loss_weight():
    from vdm.model.weightings import EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_DATA

    model = bare_vdm(Zero(), make_schedule("fixed_linear", -13.3, 5.0), loss_weighting="edm")
    gamma = torch.linspace(-12.0, 6.0, 37, dtype=torch.float64)
    w = model.weight(gamma)
    sigma = torch.exp(gamma / 2)  # noise-to-signal ratio
    # EDM: E over ln sigma ~ N(P_mean, P_std^2) of (sigma^2 + sd^2)/(sigma sd)^2 ||x - x_hat||^2, and
    # ||x - x_hat||^2 = sigma^2 ||eps - eps_hat||^2; per unit of gamma = 2 ln sigma the density halves
    density = torch.exp(-0.5 * ((torch.log(sigma) - EDM_P_MEAN) / EDM_P_STD) ** 2) / 2
    edm = density * (sigma**2 + EDM_SIGMA_DATA**2) / (sigma * EDM_SIGMA_DATA) ** 2 * sigma**2
    ratio = w / edm
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)  # the same up to one constant
    assert model.weight(torch.tensor([2 * EDM_P_MEAN])).item() == pytest.approx(1.0)
    assert w.max() > 1.0 and w[0] < 1e-3  # peaks in eps-space above EDM's mean noise; ~0 at low noise


def test_training_estimates_a_wide_decoder_window_on_a_subset_without_bias():
    """Where gamma_0 is high enough that the decoder's window spans many levels, a training loss
    takes the decoder term on every k-th subpixel from a random offset (k a power of two): the
    mean over offsets is the exact term, evaluation stays exact, and a narrow window is exact."""
    assert recon_stride(2 * window_half_width(-13.3) + 1, 27648) == 1
    assert recon_stride(2 * window_half_width(-6.0) + 1, 27648) == 16
    assert recon_stride(1000, 3 * 5 * 5) == 1  # no power of two divides the dims
    model = build_vdm(model_params(gamma_min=-6.0), 16)
    x = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)

    def recon(train, seed):
        model.train(train)
        with torch.no_grad():
            return model.loss(x, torch.Generator().manual_seed(seed)).recon

    assert torch.equal(recon(False, 0), recon(False, 0))
    # the same seed draws the same z_0 in both modes: the difference is the subset's alone
    diffs = torch.stack([recon(True, s) - recon(False, s) for s in range(64)])
    assert diffs.abs().max() > 1e-3  # a subset: not the exact figure
    mean, se = diffs.mean(0), diffs.std(0) / 8
    assert (mean.abs() < 4 * se).all(), (mean, se)


def _model_benchmark():
    """benchmarks/model.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_model_benchmarks_naive_reconstruction_is_the_same_bound(monkeypatch):
    """benchmarks/model.py's naive row swaps in the full 256-level decoder: same numbers, any gamma_0."""
    import vdm.model.decoder
    import vdm.model.diffusion

    bench = _model_benchmark()
    x = images(n=4, size=16)
    model = build_vdm(model_params(), image_size=16).eval()
    with torch.no_grad():
        model.schedule.endpoints[0] = -6.0  # a window wider than one chunk's levels

    def bound():
        return model.loss(x, torch.Generator().manual_seed(0)).total

    windowed = bound()
    monkeypatch.setattr(vdm.model.diffusion, "decoder_nll", vdm.model.diffusion.decoder_nll)  # restored after
    bench.apply_naive({"recon"})
    assert vdm.model.diffusion.decoder_nll is not vdm.model.decoder.decoder_nll
    assert torch.allclose(bound(), windowed, rtol=1e-5)


def test_every_registered_loss_weighting_is_a_function_of_gamma():
    """(Which names params.yaml may choose: tests/test_layout.py, for every registry.)"""
    from vdm.model.weightings import WEIGHTINGS

    gamma = torch.linspace(-12.0, 6.0, 7)
    for name, fn in WEIGHTINGS.items():
        w = fn(gamma, sigmoid_bias=-2.0)
        assert w.shape == gamma.shape and bool((w > 0).all()) and bool(torch.isfinite(w).all()), name
    assert torch.equal(WEIGHTINGS["elbo"](gamma), torch.ones(7))
    assert torch.equal(WEIGHTINGS["sigmoid"](gamma, sigmoid_bias=-2.0), torch.sigmoid(gamma - 2.0))


def test_on_device_lays_the_standard_net_out_channels_last_and_the_magnitude_preserving_one_contiguous():
    """Training and every loaded model run the net in one layout per net and device (so a model
    draws the same sprites in the sample stage, `vdm generate` and the benchmarks), and the output
    does not depend on it beyond float rounding."""
    from vdm.model.diffusion import on_device

    cpu = torch.device("cpu")
    standard = build_vdm(model_params(channels=16, channel_mult=[1, 2], attention_resolutions=[]), image_size=16)
    z, g = torch.randn(2, 3, 16, 16), torch.tensor([0.5, -3.0])
    before = standard.net(z, g)
    standard = on_device(standard, cpu)
    convs = [m.weight for m in standard.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
    assert torch.allclose(standard.net(z, g), before, atol=1e-5)
    mp = on_device(build_vdm(model_params(channels=16, channel_mult=[1, 2], magnitude_preserving=True), 16), cpu)
    assert all(p.is_contiguous() for p in mp.parameters())


def test_the_model_benchmarks_shape_rows_keep_a_presets_recipe():
    """benchmarks/model.py --preset long: the shape rows change the width and depth of the preset's
    net (magnitude-preserving there) and nothing else; without a preset they are params.yaml's net."""
    bench = _model_benchmark()
    cpu = torch.device("cpu")
    long, _, _ = bench.row_params("default", cpu, "long")
    wide, _, _ = bench.row_params("c64-b2", cpu, "long")
    plain, _, _ = bench.row_params("c64", cpu)
    assert long.model.magnitude_preserving and long.train.lr == 0.01
    assert (wide.model.channels, wide.model.num_res_blocks) == (64, 2)
    assert wide.model.model_copy(update={"channels": long.model.channels, "num_res_blocks": 1}) == long.model
    assert wide.train == long.train
    assert not plain.model.magnitude_preserving and plain.model.channels == 64
    assert bench.row_params("mp", cpu)[0].model.magnitude_preserving


def test_the_model_benchmark_refuses_a_missing_preset_and_interleave_over_a_preset_in_one_line():
    import subprocess
    import sys

    from tests.helpers import ROOT

    script = str(ROOT / "benchmarks" / "model.py")
    for args, message in [
        (["--preset", "nope"], "error: no preset "),
        (["--preset", "long", "--interleave", "2", "--rows", "fp32,bf16"], "error: --interleave times params.yaml's"),
    ]:
        p = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.startswith(message) and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_the_model_benchmarks_repeated_rows_report_each_figures_median():
    """benchmarks/model.py --repeat: a row's figure is the median over its runs, counts stay whole."""
    bench = _model_benchmark()
    runs = [
        {"row": "bf16", "batch": 16, "train_img_s": 30.0, "sample_t64_img_s": 2.1},
        {"row": "bf16", "batch": 16, "train_img_s": 34.0, "sample_t64_img_s": 1.9},
        {"row": "bf16", "batch": 16, "train_img_s": 31.0, "sample_t64_img_s": 2.0},
    ]
    row = bench.median_row(runs)
    assert row == {"row": "bf16", "batch": 16, "train_img_s": 31.0, "sample_t64_img_s": 2.0, "runs": 3}
    assert isinstance(row["batch"], int)
    assert bench.median_row(runs[:2])["train_img_s"] == 32.0


def test_the_model_benchmarks_interleaved_rows_time_each_precision_in_one_process(tmp_path, monkeypatch):
    """benchmarks/model.py --interleave: fp32, bf16 without and with the fused norm alternated on one
    model, the fused kernel taken only in the bf16 row's steps and on again afterwards."""
    from pathlib import Path

    import yaml

    from vdm.model import fused

    if not fused.available():
        pytest.skip("the fused kernel did not build here")
    bench = _model_benchmark()
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["data"]["image_size"] = 24
    raw["model"].update(channels=16, channel_mult=[1, 2], attention_resolutions=[6])
    raw["train"]["batch_size"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    calls, apply = {True: 0, False: 0}, fused.GroupNormSiLU.apply

    def counted(*args):
        calls[fused._state.get("use", True)] += 1
        return apply(*args)

    monkeypatch.setattr(fused.GroupNormSiLU, "apply", counted)
    out = bench.interleave(
        ["fp32", "bf16-unfused", "bf16"], blocks=1, per_block=1, params_path=tmp_path / "params.yaml"
    )
    assert set(out["rows"]) == {"fp32", "bf16-unfused", "bf16"} and out["rows"]["fp32"]["x_fp32"] == 1.0
    assert all(r["train_img_s"] > 0 for r in out["rows"].values())
    assert calls[True] > 0 and calls[False] == 0 and fused._state.get("use", True)  # on again afterwards
