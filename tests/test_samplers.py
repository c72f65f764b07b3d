"""Samplers in gamma = -log SNR: exact denoisers land on the data, the deterministic samplers
converge to the probability-flow ODE's exact solution at their order, and the ancestral sampler
is the paper's p(z_s | z_t)."""

import math

import pytest
import torch

from tests.helpers import bare_vdm, model_params, walk
from vdm.core.errors import UserError
from vdm.model.conversions import decode_nearest, encode
from vdm.model.diffusion import build_vdm
from vdm.sampling.samplers import gamma_grid, sample, solve, vdm_denoiser
from vdm.sampling.steps import SAMPLERS


def _alpha_sigma(g):
    return torch.sqrt(torch.sigmoid(-g)), torch.sqrt(torch.sigmoid(g))


# the samplers that use the network's estimates as they are (the sprite sampler repaints them)
AS_IS = tuple(name for name, s in SAMPLERS.items() if not s.repaints)


@pytest.mark.parametrize("sampler", AS_IS)
def test_exact_denoiser_lands_on_the_data_point(sampler):
    x0 = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    f = encode(x0)
    gammas = torch.linspace(5.0, -16.0, 13)  # sigma / alpha at the end: e^-8 = 3e-4, a tenth of a level's half-width

    def exact(z, gamma):  # the data is the single point f
        return f

    z1 = torch.randn(f.shape, generator=torch.Generator().manual_seed(1))
    z, _ = solve(exact, z1, gammas, walk(len(gammas) - 1, sampler), torch.Generator().manual_seed(2))
    alpha_end = math.sqrt(float(torch.sigmoid(-gammas[-1])))
    assert torch.equal(decode_nearest(z / alpha_end), x0)


def _gaussian_case(mu=0.3, s=0.5):
    """Data x ~ N(mu, s^2) per element: the exact denoiser E[x | z_t] and the exact
    probability-flow map z_1 -> z_0 (it keeps the standardised value of z_t constant)."""

    def denoise(z, gamma):
        g = gamma.view(-1, *([1] * (z.dim() - 1)))
        a, sg = _alpha_sigma(g)
        return mu + a * s**2 * (z - a * mu) / (a**2 * s**2 + sg**2)

    def flow(z, g_from, g_to):
        a1, s1 = _alpha_sigma(torch.tensor(g_from, dtype=torch.float64))
        a0, s0 = _alpha_sigma(torch.tensor(g_to, dtype=torch.float64))
        u = (z - a1 * mu) / torch.sqrt(a1**2 * s**2 + s1**2)
        return a0 * mu + torch.sqrt(a0**2 * s**2 + s0**2) * u

    return denoise, flow


@pytest.mark.parametrize(("sampler", "order"), [("ddim", 1), ("dpmpp_2m", 2)])
def test_deterministic_samplers_converge_to_the_ode_at_their_order(sampler, order):
    denoise, flow = _gaussian_case()
    g1, g0 = 5.0, -8.0
    z1 = torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = flow(z1, g1, g0)
    errors = []
    for steps in (10, 20, 40, 80):
        gammas = torch.linspace(g1, g0, steps + 1, dtype=torch.float64)
        z, _ = solve(denoise, z1, gammas, walk(steps, sampler))
        errors.append(float((z - exact).abs().max()))
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    # halving the step size divides the error by 2^order (within 25% at these step counts)
    assert all(0.75 * 2**order < r < 1.25 * 2**order for r in ratios), (errors, ratios)
    assert errors[-1] < 0.05


def test_ancestral_sampling_at_many_steps_matches_the_data_distribution():
    denoise, _ = _gaussian_case(mu=0.3, s=0.5)
    z1 = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gammas = torch.linspace(5.0, -10.0, 201, dtype=torch.float64)
    z, _ = solve(denoise, z1, gammas, walk(200), torch.Generator().manual_seed(1))
    x = z / math.sqrt(float(torch.sigmoid(torch.tensor(10.0))))
    assert float(x.mean()) == pytest.approx(0.3, abs=0.02) and float(x.std()) == pytest.approx(0.5, abs=0.02)


def _tiny_model():
    torch.manual_seed(0)
    return build_vdm(model_params(channels=16, channel_mult=[1], attention_resolutions=[]), 8).eval()


def test_ancestral_is_the_papers_p_zs_given_zt():
    """One ancestral step is the paper's p(z_s | z_t) written with eps_hat: mean
    (alpha_s / alpha_t) (z_t - c sigma_t eps_hat), variance sigma_s^2 c, c = 1 - SNR_t / SNR_s."""
    model = _tiny_model()
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    gt, gs = torch.tensor(-1.0), torch.tensor(-2.5)
    a, _ = solve(vdm_denoiser(model, clip=False), z, torch.stack([gt, gs]), walk(1), torch.Generator().manual_seed(5))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eps_hat = model.eps_hat(z, gt.expand(3))
    c = -torch.expm1(gs - gt)
    mean = torch.sqrt(torch.sigmoid(-gs) / torch.sigmoid(-gt)) * (z - c * torch.sqrt(torch.sigmoid(gt)) * eps_hat)
    assert torch.allclose(a, mean + torch.sqrt(torch.sigmoid(gs) * c) * noise, atol=1e-5)


def test_grids_and_trajectory():
    model = _tiny_model()
    g = gamma_grid(model.schedule, 4, "t", "cpu")
    assert torch.allclose(g, model.schedule(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))[0])
    lg = gamma_grid(model.schedule, 4, "logsnr", "cpu")
    assert torch.allclose(lg[[0, -1]], g[[0, -1]]) and torch.allclose(lg.diff(), lg.diff()[0].expand(4))
    steps_seen = []
    x, traj = sample(
        model,
        2,
        walk(4, "dpmpp_2m", "logsnr"),
        torch.Generator().manual_seed(0),
        trajectory_points=3,
        on_step=steps_seen.append,
    )
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 8, 8)
    assert len(traj) == 3 and all(t.shape == (2, 3, 8, 8) for t in traj) and steps_seen == [1, 2, 3, 4]
    again, _ = sample(model, 2, walk(4, "dpmpp_2m", "logsnr"), torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    with pytest.raises(UserError, match="unknown sampler"):
        sample(model, 1, walk(2, "euler"))


class _OnePoint(torch.nn.Module):
    """An eps-net that is exact for a data set of one image f: eps_hat = (z - alpha f) / sigma."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.image_size = f.shape[-1]

    def forward(self, z, gamma):
        a, s = _alpha_sigma(gamma.view(-1, 1, 1, 1))
        return (z - a * self.f) / s


@pytest.mark.parametrize("sampler", AS_IS)
def test_denoise_last_removes_the_noise_a_high_gamma_0_leaves(sampler):
    from vdm.model.schedules import make_schedule

    x0 = torch.randint(0, 256, (1, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    model = bare_vdm(
        _OnePoint(encode(x0)), make_schedule("fixed_linear", -5.0, 5.0)
    )  # sigma_0 / alpha_0 = 0.08: 10 levels
    noisy, _ = sample(model, 4, walk(16, sampler, clip_denoised=False), generator=torch.Generator().manual_seed(1))
    clean, _ = sample(
        model, 4, walk(16, sampler, clip_denoised=False, denoise_last=True), generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(clean, x0.expand_as(clean))
    if sampler == "ancestral":  # its last step leaves sigma_0 of fresh noise in z_0: the decoder keeps it
        assert (noisy.float() - x0.float()).abs().mean() > 3


def test_temperature_scales_only_the_ancestral_steps_fresh_noise():
    """With x_hat = 0 and z_1 = 0 the ancestral walk's end is a linear sum of its fresh noise: a
    temperature T ends at exactly T times the T = 1 walk of the same draws. The deterministic
    samplers draw no noise, so T does not change them."""
    gammas = torch.linspace(5.0, -6.0, 9)
    zero = torch.zeros(2, 3, 4, 4)

    def run(sampler, temperature, z=zero, denoise=lambda z, g: torch.zeros_like(z)):
        options = walk(len(gammas) - 1, sampler, temperature=temperature)
        return solve(denoise, z, gammas, options, torch.Generator().manual_seed(0))[0]

    hot, cold = run("ancestral", 1.0), run("ancestral", 0.5)
    assert hot.abs().max() > 0.1 and torch.allclose(cold, 0.5 * hot, atol=1e-6)
    z1 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    for sampler in ("ddim", "dpmpp_2m"):
        shrink = lambda z, g: 0.5 * z  # noqa: E731
        assert torch.equal(run(sampler, 1.0, z1, shrink), run(sampler, 0.3, z1, shrink))


def test_autoguidance_extrapolates_away_from_the_guide():
    from vdm.sampling.samplers import guided_denoiser

    model, guide = _tiny_model(), _tiny_model()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.eval(), guide.eval()
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gamma = torch.full((2,), -1.0)
    with torch.no_grad():
        main, weak = model.x_hat(z, gamma), guide.x_hat(z, gamma)
        assert not torch.allclose(main, weak)
        guided = guided_denoiser(model, guide, 2.5, clip=False)(z, gamma)
        assert torch.allclose(guided, weak + 2.5 * (main - weak), atol=1e-6)
        clipped = guided_denoiser(model, guide, 2.5, clip=True)(z, gamma)
        assert torch.equal(clipped, guided.clamp(-1, 1))
        # weight 1, or the model guiding itself, is the model's own denoiser
        assert torch.equal(guided_denoiser(model, guide, 1.0, clip=False)(z, gamma), main)
        assert torch.allclose(guided_denoiser(model, model, 3.0, clip=False)(z, gamma), main, atol=1e-6)
    draws = [
        sample(model, 2, walk(4, "ancestral", "t"), torch.Generator().manual_seed(1), guide=g, guidance=w)[0]
        for g, w in ((None, 1.0), (guide, 1.0), (guide, 2.0))
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_the_deterministic_samplers_and_an_unknown_one():
    """(Which names params.yaml may choose: tests/test_layout.py, for every registry.)"""
    from vdm.sampling.steps import deterministic_samplers

    assert deterministic_samplers() == ("ddim", "dpmpp_2m")  # what encoding and interpolation accept
    with pytest.raises(UserError, match="unknown sampler 'euler': use one of ancestral"):
        solve(lambda z, g: z, torch.zeros(1, 3, 2, 2), torch.linspace(1.0, -1.0, 3), walk(2, "euler"))


def test_a_new_sampler_is_one_registered_step_function(monkeypatch):
    from vdm.sampling import steps

    def halfway(s):  # moves z halfway to x_hat each step
        return 0.5 * (s.z + s.x_hat)

    monkeypatch.setitem(steps.SAMPLERS, "halfway", steps.Sampler(halfway, deterministic=True))
    z1 = torch.full((1, 3, 2, 2), 4.0)
    z, _ = solve(lambda z, g: torch.zeros_like(z), z1, torch.linspace(1.0, -1.0, 4), walk(3, "halfway"))
    assert torch.equal(z, z1 / 8) and "halfway" in steps.deterministic_samplers()


def _flat_sprite(size=24):
    """A (1, 3, size, size) uint8 sprite: a red disc with a dark outline and a yellow patch, on white."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    img = torch.full((3, size, size), 255, dtype=torch.uint8)
    img[:, r < size * 0.4] = torch.tensor([20, 20, 30], dtype=torch.uint8)[:, None]
    img[:, r < size * 0.33] = torch.tensor([200, 40, 40], dtype=torch.uint8)[:, None]
    img[:, (r < size * 0.33) & (yy < size / 2)] = torch.tensor([240, 200, 40], dtype=torch.uint8)[:, None]
    return img[None]


def _colours(images: torch.Tensor) -> list[int]:
    return [len(torch.unique(im.flatten(1), dim=1).T) for im in images]


def test_palette_pull_is_off_above_its_start_and_whole_below_its_end():
    from vdm.sampling import steps

    f = encode(_flat_sprite().expand(3, -1, -1, -1))
    speckled = (f + 0.03 * torch.randn(f.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert torch.equal(steps.palette_pull(speckled, torch.tensor(steps.PALETTE_START + 1.0)), speckled)
    full = steps.palette_pull(speckled, torch.tensor(steps.PALETTE_FULL - 1.0))
    assert max(_colours(full)) <= steps.PALETTE_COLOURS + 1  # the palette and white
    assert bool((full[:, :, 0, 0] == f[:, :, 0, 0]).all())  # the background snapped to white
    assert (full - f).abs().mean() < 0.2 * (speckled - f).abs().mean()  # the speckle gone, the sprite kept
    half = steps.palette_pull(speckled, torch.tensor((steps.PALETTE_START + steps.PALETTE_FULL) / 2))
    assert torch.allclose(half, torch.lerp(speckled, full, 0.5), atol=1e-6)


def test_the_sprite_sampler_draws_flat_colours_where_ancestral_keeps_noise():
    """A denoiser that knows the sprite but leaves 3 levels of speckle in its estimate (as a small
    net does at low noise): the ancestral walk keeps it, the sprite sampler paints flat colours."""
    from vdm.model.schedules import make_schedule

    f = encode(_flat_sprite())

    class Speckled(torch.nn.Module):  # x-prediction: x_hat = f + speckle
        image_size = f.shape[-1]

        def forward(self, z, gamma):
            return f + 0.025 * torch.randn(z.shape, generator=torch.Generator().manual_seed(int(gamma[0] * 100) % 997))

    model = bare_vdm(Speckled(), make_schedule("fixed_linear", -10.0, 5.0), prediction="x")
    drawn = {}
    for name in ("ancestral", "sprite"):
        drawn[name], _ = sample(model, 2, walk(24, name, denoise_last=True), generator=torch.Generator().manual_seed(1))
    assert min(_colours(drawn["ancestral"])) > 100
    assert max(_colours(drawn["sprite"])) <= 5  # white, outline, red, yellow (and at most one more)
