"""Colour classes: read from the image, trained on with a share shown none, drawn by a walk from
the training shares and guided (vdm/model/colour.py)."""

import warnings

import numpy as np
import pytest
import torch

from tests.helpers import model_params, walk
from vdm.core.params import ModelParams, parse_section
from vdm.model.colour import colour_class, followed
from vdm.model.conversions import decode_nearest
from vdm.model.diffusion import build_vdm
from vdm.sampling.samplers import draw_colours, gamma_grid, sample, solve, sprite_colours, vdm_denoiser
from vdm.sampling.sprites import generate


def _sprites(*fills) -> torch.Tensor:
    """(N, 3, 16, 16) uint8 white canvases, each with an 8x8 square of its fill (an RGB tuple, or a
    (rgb, rgb) pair split down the middle) and a black outline."""
    out = np.full((len(fills), 16, 16, 3), 255, np.uint8)
    for im, fill in zip(out, fills, strict=True):
        im[3:13, 3:13] = 0  # outline: no hue, not coloured
        left, right = fill if isinstance(fill[0], tuple) else (fill, fill)
        im[4:12, 4:8], im[4:12, 8:12] = left, right
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def test_the_class_is_the_sprites_main_hue_bin_or_grey():
    red, yellow, blue, violet = (220, 30, 30), (230, 220, 40), (40, 60, 220), (150, 50, 200)
    grey, dark_blue = (128, 128, 128), (10, 10, 40)  # no saturation; too dark to have a hue
    labels = colour_class(_sprites(red, yellow, blue, violet, grey, dark_blue, (blue, blue)), 13)
    # 12 bins of 30 degrees from red: red 0, yellow 58 -> 1, blue 233 -> 7, violet 283 -> 9; grey 12
    assert labels.tolist() == [0, 1, 7, 9, 12, 12, 7]
    # two hues: the one holding more pixels (a 5-column blue half against a 3-column red one)
    two = _sprites(red)
    two[:, :, 4:12, 7:12] = torch.tensor(blue, dtype=torch.uint8).view(3, 1, 1)
    assert colour_class(two, 13).tolist() == [7]
    # a blank canvas is grey; coarser bins: 4 classes = 3 hue bins of 120 degrees and grey
    blank = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    assert colour_class(blank, 13).tolist() == [12]
    assert colour_class(_sprites(red, blue, grey), 4).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="at least 2"):
        colour_class(blank, 1)


def _colour_model(train: bool, classes: int = 4):
    torch.manual_seed(0)
    model = build_vdm(model_params(channels=16, channel_mult=[1], attention_resolutions=[], colour_classes=classes), 16)
    with torch.no_grad():  # leave the zero starts (the classes' embeddings, each block's last layer, the output)
        for p in model.net.parameters():
            if not p.any():
                p.normal_(std=0.5 if p is model.net.colour_emb.weight else 0.1)
    return model.train(train)


def test_training_counts_the_classes_and_shows_a_share_of_images_none():
    model = _colour_model(train=True)
    seen = []
    forward = model.net.forward

    def recording(z, g, colour=None):
        seen.append(None if colour is None else colour.clone())
        return forward(z, g, colour=colour)

    model.net.forward = recording
    red, blue, grey = (220, 30, 30), (40, 60, 220), (128, 128, 128)
    x = _sprites(*([red] * 30 + [blue] * 20 + [grey] * 14))
    model.loss(x, torch.Generator().manual_seed(0)).objective.mean().backward()
    assert model.colour_counts.tolist() == [30.0, 20.0, 0.0, 14.0]  # every image's own class, counted
    shown = seen[0]
    none = shown == 4
    assert 1 <= int(none.sum()) <= 16  # colour_drop 0.1 of 64: a few shown none, the rest their own
    assert torch.equal(shown[~none], colour_class(x, 4)[~none])
    assert model.net.colour_emb.weight.grad.abs().sum() > 0  # the classes' embeddings train
    # the bound (eval mode) is the unconditioned model's: every image shown none, nothing counted
    seen.clear()
    model.eval()
    model.loss(x, torch.Generator().manual_seed(0))
    assert seen[0] is None and model.colour_counts.sum() == 64
    assert torch.allclose(model.colour_shares(), torch.tensor([30, 20, 0, 14]) / 64)


def test_a_walk_draws_classes_from_the_training_shares_and_guides_by_them():
    model = _colour_model(train=False)
    model.colour_counts.copy_(torch.tensor([0.0, 3.0, 0.0, 1.0]))
    drawn = draw_colours(model, 400, torch.Generator().manual_seed(0), "cpu")
    assert set(drawn.tolist()) == {1, 3} and 0.65 < float((drawn == 1).float().mean()) < 0.85

    def per_sprite():  # one generator per sprite, as generate() walks: each sprite's draw is its own
        return [torch.Generator().manual_seed(k) for k in range(3)]

    assert torch.equal(draw_colours(model, 3, per_sprite(), "cpu"), draw_colours(model, 3, per_sprite(), "cpu"))
    z, gamma = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.full((2,), -1.0)
    colour = torch.tensor([1, 3])
    with torch.no_grad():
        none, cond = model.x_hat(z, gamma), model.x_hat(z, gamma, colour=colour)
        assert not torch.allclose(none, cond)
        for w in (0.0, 1.0, 2.5):
            guided = vdm_denoiser(model, clip=False, colour=colour, guidance=w)(z, gamma)
            assert torch.allclose(guided, none + w * (cond - none), atol=1e-5)
        # without classes (an unconditioned walk, or an unconditioned model) the guidance does nothing
        assert torch.equal(vdm_denoiser(model, clip=False, colour=None, guidance=2.5)(z, gamma), none)
    draws = [
        sample(model, 2, walk(4, "ancestral", "t", colour_guidance=w), torch.Generator().manual_seed(1))[0]
        for w in (1.0, 1.0, 3.0)
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    # given latents (encode's) decode on the unconditioned ODE encode runs: no class is drawn
    z1 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    decoded = [sample(model, 4, walk(4, "ddim"), None, z=z1)[0] for _ in range(3)]
    assert all(torch.equal(decoded[0], d) for d in decoded[1:])
    ode = solve(vdm_denoiser(model, clip=True), z1, gamma_grid(model.schedule, 4, "t", "cpu"), walk(4, "ddim"))[0]
    assert torch.equal(decoded[0], decode_nearest(ode / torch.sqrt(torch.sigmoid(-model.schedule.gamma_0))))


def test_guidance_in_an_interval_acts_only_where_the_walks_t_is_inside_it():
    model = _colour_model(train=False)
    model.colour_counts.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    z, colour = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2])
    inside, above, below = (model.schedule(torch.tensor([t]))[0].float().expand(2) for t in (0.7, 0.95, 0.2))
    with torch.no_grad():
        guided = vdm_denoiser(model, False, colour, 3.0, (0.5, 0.9))
        for gamma, weight in ((inside, 3.0), (above, 1.0), (below, 1.0)):
            none, cond = model.x_hat(z, gamma), model.x_hat(z, gamma, colour=colour)
            assert torch.allclose(guided(z, gamma), none + weight * (cond - none), atol=1e-5)

    def draw(**fields):
        return sample(model, 2, walk(6, **fields), torch.Generator().manual_seed(3))[0]

    plain, everywhere = draw(), draw(colour_guidance=3.0)
    part = draw(colour_guidance=3.0, colour_guidance_interval=(0.5, 1.0))
    assert not torch.equal(part, plain) and not torch.equal(part, everywhere)
    assert torch.equal(draw(colour_guidance_interval=(0.5, 1.0)), plain)  # weight 1: no guidance anywhere
    assert torch.equal(draw(colour_guidance=3.0, colour_guidance_interval=(0, 1)), everywhere)


def test_the_classes_a_seeds_sprites_are_drawn_with_and_how_far_they_show_them():
    model = _colour_model(train=False, classes=13)
    model.colour_counts.fill_(1.0)
    seen = []
    forward = model.net.forward

    def recording(z, g, colour=None):
        seen.append(colour.clone())
        return forward(z, g, colour=colour)

    model.net.forward = recording
    generate(model, 5, walk(2, batch_size=2), 7, torch.device("cpu"))  # batches of 2, 2 and 1
    shown = torch.cat([seen[0], seen[2], seen[4]])  # each batch's first step (two steps a walk)
    assert torch.equal(sprite_colours(model, 5, 7, "cpu"), shown)
    # read back from drawn sprites: red 0, yellow 1, blue 7, grey 12
    red, yellow, blue, grey = (220, 30, 30), (230, 220, 40), (40, 60, 220), (128, 128, 128)
    images = _sprites(red, yellow, blue, grey)
    assert followed(torch.tensor([0, 1, 7, 12]), images, 13) == {
        "class_followed": 1.0,
        "class_near": 1.0,
        "grey_followed": 1.0,
    }
    # neighbouring bins (red drawn as 11, the bin before it on the circle; yellow as 2) are near, not
    # followed; a blue sprite drawn grey and a grey one drawn blue are neither
    assert followed(torch.tensor([11, 2, 12, 7]), images, 13) == {
        "class_followed": 0.0,
        "class_near": 0.5,
        "grey_followed": 0.0,
    }
    assert followed(torch.tensor([0, 1, 7, 7]), images, 13)["grey_followed"] is None


def test_an_unconditioned_model_walks_as_before_whatever_the_guidance():
    torch.manual_seed(0)
    model = build_vdm(
        model_params(channels=16, channel_mult=[1], attention_resolutions=[], colour_classes=0), 16
    ).eval()
    assert draw_colours(model, 2, torch.Generator(), "cpu") is None and not hasattr(model.net, "colour_emb")
    a = sample(model, 2, walk(3, "ancestral", "t"), torch.Generator().manual_seed(1))[0]
    b = sample(model, 2, walk(3, "ancestral", "t", colour_guidance=4.0), torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b)


def test_a_model_saved_before_the_colour_keys_loads_unconditioned():
    """(One colour class, which has no hue bin, is refused by the validate stage: tests/test_params.py.)"""
    raw = model_params().model_dump()
    older = {k: v for k, v in raw.items() if not k.startswith("colour_")}
    assert parse_section(ModelParams, older).colour_classes == 0


def test_the_hue_figure_is_the_main_hue_bins_share_of_the_coloured_pixels():
    from vdm.evaluation.metrics import hue, sprite_structure

    red, blue = (220, 30, 30), (40, 60, 220)
    one, halves, three_to_one = _sprites(red, (red, blue), red).permute(0, 2, 3, 1).numpy()
    three_to_one[4:12, 10:12] = blue  # 2 of 8 columns blue
    blank = np.full((16, 16, 3), 255, np.uint8)
    assert [hue(im) for im in (one, halves, three_to_one, blank)] == [1.0, 0.5, 0.75, 1.0]
    assert sprite_structure(np.stack([one, halves]))["hue"].tolist() == [1.0, 0.5]
    read_only = np.stack([one, halves])
    read_only.flags.writeable = False  # a memory-mapped split: scored without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sprite_structure(read_only)["hue"].tolist() == [1.0, 0.5]
