"""Self-conditioning: the net sees an earlier estimate of x, in training, in the bound and in sampling."""

import torch

from tests.helpers import model_params, walk
from vdm.model.diffusion import build_vdm
from vdm.model.unet import UNet
from vdm.sampling.samplers import sample, vdm_denoiser


def _unet(self_condition: bool) -> UNet:
    torch.manual_seed(0)
    net = UNet(
        model_params(
            channels=16, channel_mult=[1], attention_resolutions=[], patch_size=2, self_condition=self_condition
        ),
        16,
    )
    torch.nn.init.normal_(net.out.weight, std=0.1)  # leave the zero start, so the output shows its input
    return net


def test_unet_reads_the_estimate_and_none_means_zeros():
    net = _unet(True)
    z, g = torch.randn(2, 3, 16, 16), torch.tensor([0.0, 1.0])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(net(z, g), net(z, g, torch.zeros_like(z)))
    assert not torch.allclose(net(z, g, x), net(z, g))
    plain = _unet(False)
    assert plain.stem.in_channels == net.stem.in_channels - 3 * 2 * 2  # 3 more channels per pixel


class Recording(torch.nn.Module):
    """Wraps a net and keeps every x_self it is given (None as None)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []
        self.self_condition, self.image_size = net.self_condition, net.image_size

    def forward(self, z, gamma, x_self=None):
        self.seen.append(None if x_self is None else x_self.clone())
        return self.net(z, gamma, x_self)


def _model(train: bool):
    model = build_vdm(
        model_params(self_condition=True, channels=16, channel_mult=[1], attention_resolutions=[], colour_classes=0), 8
    )
    torch.nn.init.normal_(model.net.out.weight, std=0.1)
    model.net = Recording(model.net)
    return model.train(train)


def test_training_conditions_half_of_each_batch_on_its_own_first_pass():
    model = _model(train=True)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    model.loss(x, torch.Generator().manual_seed(0))
    first, second = model.net.seen
    assert first is None  # the first pass: no estimate yet, on 3 of the 6 images
    given = second.flatten(1).abs().sum(1) > 0
    assert int(given.sum()) == 3 and second.abs().max() <= 1  # the other half: zeros; clipped estimates


def test_the_bound_takes_two_passes_for_every_image():
    model = _model(train=False)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    a = model.loss(x, torch.Generator().manual_seed(1)).total
    first, second = model.net.seen
    assert first is None and bool((second.flatten(1).abs().sum(1) > 0).all())
    b = model.loss(x, torch.Generator().manual_seed(1)).total
    assert torch.equal(a, b)  # a deterministic function of z_t: the same draws give the same bound


def test_sampling_feeds_each_step_the_previous_estimate():
    model = _model(train=False)
    denoise = vdm_denoiser(model, clip=True)
    z, g = torch.randn(2, 3, 8, 8), torch.tensor([2.0, 2.0])
    x1 = denoise(z, g)
    x2 = denoise(z, g - 1)
    assert model.net.seen[0] is None and torch.equal(model.net.seen[1], x1)
    assert not torch.equal(x1, x2)
    model.net.seen.clear()
    out, _ = sample(model, 2, walk(3, "ancestral", "t", denoise_last=True), torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8) and len(model.net.seen) == 4  # 3 steps + the final denoising call
    assert model.net.seen[0] is None and all(s is not None for s in model.net.seen[1:])
    model.net.seen.clear()
    again, _ = sample(model, 2, walk(3, "ancestral", "t", denoise_last=True), torch.Generator().manual_seed(0))
    assert model.net.seen[0] is None and torch.equal(out, again)  # a new walk starts from no estimate


def test_a_model_saved_before_the_key_existed_loads_without_it(tmp_path):
    import copy

    from tests.helpers import BASE_PARAMS
    from vdm.core.params import parse_params
    from vdm.model.checkpoint import load_model, save_model

    raw = copy.deepcopy(BASE_PARAMS)
    raw["data"]["image_size"] = 16
    p = parse_params(raw)
    model = build_vdm(p.model, p.data.image_size)
    del raw["model"]["self_condition"]
    save_model(tmp_path / "models", model, model, {"params": raw, "steps": 1, "config_hash": "x", "run_name": "t"})
    loaded, _ = load_model(tmp_path / "models")
    assert loaded.self_condition is False
    with_it = copy.deepcopy(raw)
    with_it["model"]["self_condition"] = True
    sc = build_vdm(parse_params(with_it).model, p.data.image_size)
    save_model(tmp_path / "sc", sc, sc, {"params": with_it, "steps": 1, "config_hash": "x", "run_name": "t"})
    assert load_model(tmp_path / "sc")[0].self_condition is True
