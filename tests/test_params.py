import sys

import pytest
import yaml

from tests.helpers import ROOT, copy_project, raw_params, run
from vdm.core.errors import ParamError, UserError
from vdm.core.params import load_params, parse_params, read_preset


def test_project_params_file_is_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.data.image_size == 96
    assert abs(p.data.split.train + p.data.split.val + p.data.split.test - 1) < 1e-9


def test_a_preset_lays_its_settings_over_params_yaml_and_names_a_key_params_yaml_lacks(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params()))
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets/wide.yaml").write_text("model:\n  channels: 64\ntrain:\n  lr: 0.01\n")
    preset, raw = read_preset("wide", tmp_path / "params.yaml")
    assert preset == {"model": {"channels": 64}, "train": {"lr": 0.01}}
    p = load_params(tmp_path / "params.yaml", "wide")
    assert (p.model.channels, p.train.lr) == (64, 0.01)
    assert p.data == load_params(tmp_path / "params.yaml").data  # the rest is params.yaml's
    (tmp_path / "presets/typo.yaml").write_text("train:\n  learning_rate: 0.01\n")
    with pytest.raises(UserError, match=r"typo.yaml: train.learning_rate is not a key of .*params.yaml"):
        read_preset("typo", tmp_path / "params.yaml")
    with pytest.raises(UserError, match=r"no preset .*nope.yaml; presets: typo, wide"):
        load_params(tmp_path / "params.yaml", "nope")


def test_valid_params_parse_to_typed_values():
    p = parse_params(raw_params())
    assert p.data.split.val == 0.2 and isinstance(p.data.split.seed, int)


def _err(raw) -> ParamError:
    with pytest.raises(ParamError) as e:
        parse_params(raw)
    return e.value


def test_unknown_key_is_named_with_the_allowed_keys():
    raw = raw_params()
    raw["data"]["imagesize"] = 64
    e = _err(raw)
    assert e.key == "data.imagesize" and "image_size" in str(e)


def test_missing_key_is_named():
    raw = raw_params()
    del raw["data"]["split"]["seed"]
    assert _err(raw).key == "data.split.seed"


def test_split_fractions_must_sum_to_one():
    raw = raw_params(split={"train": 0.7, "val": 0.2, "test": 0.2, "seed": 0})
    assert "sum to 1" in str(_err(raw))


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1])
def test_a_split_fraction_that_empties_a_split_is_refused(frac):
    raw = raw_params(split={"train": 1 - frac, "val": frac, "test": 0.0 + 0, "seed": 0})
    with pytest.raises(ParamError):
        parse_params(raw)


def test_unknown_source_names_the_alternatives(tmp_path):
    e = _err(raw_params(source="kagle"))
    assert e.key == "data.source"
    for name in ("auto", "kaggle", "pokeapi", "synthetic", "path"):
        assert name in str(e)


def test_source_may_be_an_existing_path(tmp_path):
    assert parse_params(raw_params(source=str(tmp_path))).data.source == str(tmp_path)


def test_float_written_in_exponent_form_is_accepted():
    # PyYAML reads 2e-1 (no dot) as a string; it must still mean 0.2.
    raw = yaml.safe_load("train: 6e-1\nval: 2e-1\ntest: 2e-1\nseed: 0\n")
    assert parse_params(raw_params(split=raw)).data.split.val == pytest.approx(0.2)


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


# --- what a params file may hold -------------------------------------------------------------


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Nine levels of nine aliases: 1.5 KB that safe_load would expand into 9^9 list items."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in range(1, 10):
        lines.append(f"a{k}: &a{k} [" + ",".join([f"*a{k - 1}"] * 9) + "]")
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="anchors and aliases") as e:
        load_params(path)
    assert len(str(e.value)) < 400


def test_a_key_given_twice_is_refused_as_dvc_refuses_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text() + "\ntrain:\n  lr: 0.1\n")
    with pytest.raises(UserError, match="key 'train' appears twice"):
        load_params(path)


def test_a_huge_params_file_is_refused_unread(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(UserError, match="more than 1048576 allowed"):
        load_params(path)


@pytest.mark.parametrize(("section", "value"), [("train", 2**64), ("sample", 2**63), ("model", -1)])
def test_seeds_outside_what_torch_and_numpy_take_are_refused(section, value):
    raw = raw_params()
    raw[section]["seed"] = value
    e = _err(raw)
    assert e.key == f"{section}.seed" and "2**63 - 1" in str(e)


@pytest.mark.parametrize("device", ["cuda:²", "cuda:٣", "cuda:", "CPU", " cpu", "cuda:0 "])
def test_device_strings_are_matched_exactly(device):
    raw = raw_params()
    raw["train"]["device"] = device
    assert _err(raw).key == "train.device"


def test_a_huge_value_is_cut_short_in_the_message():
    raw = raw_params()
    raw["data"]["source"] = "x" * 100_000
    assert len(str(_err(raw))) < 400


def test_every_problem_is_reported_at_once_one_line_each():
    raw = raw_params()
    raw["train"]["lr"] = "fast"  # wrong type
    raw["model"]["channel_mult"] = ["a", 0]  # two bad items of one list: one line
    raw["data"]["imagesize"] = 64  # unknown key
    del raw["sample"]["seed"]  # missing key
    raw["data"]["split"] = {"train": 0.5, "val": 0.2, "test": 0.2, "seed": 0}  # does not sum to 1
    e = _err(raw)
    lines = str(e).splitlines()
    keys = ["data.imagesize", "data.split.train/val/test", "model.channel_mult", "train.lr", "sample.seed"]
    assert sorted(line.split(" = ")[0].removeprefix("params.yaml: ") for line in lines) == sorted(keys)
    assert [err.key for err in e.errors] == [line.split(" = ")[0].removeprefix("params.yaml: ") for line in lines]
    assert e.key == e.errors[0].key
    assert "a learning rate in (0, 1]" in str(e) and "this key is required" in str(e) and "image_size" in str(e)


def test_sections_are_frozen_and_strict():
    p = parse_params(raw_params())
    with pytest.raises(Exception, match="frozen"):
        p.train.lr = 0.1  # type: ignore[misc]
    raw = raw_params()
    raw["train"]["steps"] = 6.0  # a float is not a step count, even a whole one
    assert _err(raw).key == "train.steps"
    assert p.model.channel_mult == (1, 2) and p.model.attention_resolutions == ()


def test_sampling_options_default_to_params_yamls_sample_section_and_are_checked_when_changed():
    from vdm.core.params import SamplingOptions

    defaults = SamplingOptions()
    assert load_params(ROOT / "params.yaml").sample.options == defaults  # the code's defaults are params.yaml's
    changed = defaults.replace(steps=8, sampler="ddim", temperature=None)  # None keeps a value
    assert (changed.steps, changed.sampler, changed.temperature) == (8, "ddim", defaults.temperature)
    assert defaults.steps == 64 and defaults.replace() == defaults  # a frozen copy, not a change
    for change, words in [
        ({"steps": 0}, "steps = 0 is invalid: an integer from 1 to 100000"),
        ({"batch_size": 4097}, "batch_size = 4097 is invalid: an integer from 1 to 4096"),
        ({"temperature": 2}, "temperature = 2 is invalid: a number above 0 and at most 1"),
        ({"sampler": "Bad Name"}, "sampler = 'Bad Name' is invalid"),
    ]:
        with pytest.raises(UserError) as e:
            defaults.replace(**change)
        assert words in str(e.value) and "params.yaml" not in str(e.value), str(e.value)
    raw = raw_params()
    del raw["sample"]["temperature"]  # the sample section states every option: no default from code
    assert _err(raw).key == "sample.temperature"


# --- what the train stage would refuse, refused up front ---------------------------------------
# The UNet's shape rules (vdm.core.params.unet_sizes, which vdm/model/unet.py builds from) and how the
# training processes split the batch: checked with the rest of params.yaml, so `python -m
# stages.validate` stops the pipeline before DVC deletes models/.


def with_changes(changes: dict) -> dict:
    raw = raw_params()
    for key, value in changes.items():
        section, leaf = key.split(".")
        raw[section][leaf] = value
    return raw


# BASE_PARAMS: 96x96 images, patch 2, channels 32, channel_mult [1, 2], train.batch_size 4
REFUSED = {
    "stem that does not divide the image": (
        {"data.image_size": 98, "model.patch_size": 4},
        "model.patch_size = 4",
        "a stem that divides data.image_size = 98: 1 or 2",
    ),
    "too few channels for the stem": (
        {"model.channels": 8, "model.patch_size": 4},
        "model.channels = 8",
        "at least 48 with model.patch_size = 4: 8 is too few for a 4x4 stem",
    ),
    "a level whose feature map cannot be halved": (
        {"data.image_size": 90, "model.channel_mult": [1, 1, 2, 4]},
        "model.channel_mult = [1, 1, 2, 4]",
        "at most 1 level for data.image_size = 90 with model.patch_size = 2: the 45x45 feature map",
    ),
    "attention at a size the net never has": (
        {"model.attention_resolutions": [5]},
        "model.attention_resolutions = [5]",
        "sizes from [48, 24] (data.image_size / model.patch_size / 2^level), or [] for none",
    ),
    "several processes on one GPU": (
        {"train.processes": 2, "train.device": "cuda:0"},
        "train.processes = 2",
        "1 with train.device = cuda:0 (every process would share one GPU)",
    ),
    "a gamma_1 cap below the initial gamma_1": (
        {"model.gamma_1_cap": 4.0},
        "model.gamma_1_cap = 4.0",
        "a number from gamma_max (5.0) to 30",
    ),
    "a decay longer than the steps after the warm-up": (
        {"train.steps": 50, "train.warmup_steps": 10, "train.decay_steps": 41},
        "train.decay_steps = 41",
        "at most train.steps - train.warmup_steps = 40 (the decay follows the warm-up), or 0",
    ),
    "one colour class": (
        {"model.colour_classes": 1},
        "model.colour_classes = 1",
        "0 (none) or an integer from 2 to 64",
    ),
    "a colour guidance interval the wrong way round": (
        {"sample.colour_guidance_interval": [0.9, 0.5]},
        "sample.colour_guidance_interval = [0.9, 0.5]",
        "two numbers [a, b] with 0 <= a < b <= 1 (the walk's t: 1 is pure noise, 0 the image)",
    ),
    "a batch that does not split over the processes": (
        {"train.processes": 3},
        "train.batch_size = 4",
        "a multiple of 3: the global batch is split evenly over 3 training processes",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_train_stage_cannot_take_is_refused_naming_key_value_and_what_is_allowed(case):
    changes, key_value, allowed = REFUSED[case]
    e = _err(with_changes(changes))
    assert e.key == key_value.split(" = ")[0]
    assert str(e).startswith(f"params.yaml: {key_value} is invalid: {allowed}"), str(e)
    assert len(str(e).splitlines()) == 1


@pytest.mark.parametrize("case", ["too few channels for the stem", "attention at a size the net never has"])
def test_the_validate_stage_refuses_them_in_one_line_and_writes_nothing(tmp_path, case):
    changes, key_value, _ = REFUSED[case]
    proj = copy_project(tmp_path / "p")  # the project's own params.yaml, with the change
    params = yaml.safe_load((proj / "params.yaml").read_text())
    for key, value in changes.items():
        section, leaf = key.split(".")
        params[section][leaf] = value
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = sorted(p.relative_to(proj) for p in proj.rglob("*"))
    p = run([sys.executable, "-m", "stages.validate"], proj, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line == f"error: {_err(params)}" and line.startswith(f"error: params.yaml: {key_value} is invalid: ")
    assert sorted(p.relative_to(proj) for p in proj.rglob("*")) == before  # no params.ok


# Values at the edges of what validation accepts: odd widths (the noise-level embedding is sin/cos
# pairs), widths that 64-channel attention heads do not divide, images smaller than the quality
# metrics' pyramid, attention at the full and at the smallest feature map.
ACCEPTED = [
    dict(image_size=96, channels=48, channel_mult=[1, 1, 2, 4], patch_size=2, attention_resolutions=[6]),
    dict(image_size=16, channels=13, channel_mult=[1, 2], patch_size=1, attention_resolutions=[16, 8]),
    dict(image_size=16, channels=50, channel_mult=[1, 4], patch_size=1, attention_resolutions=[8]),  # 200 wide
    dict(image_size=16, channels=43, channel_mult=[1, 3], patch_size=1, attention_resolutions=[8]),  # 129 wide
    dict(image_size=9, channels=3, channel_mult=[1], patch_size=1, attention_resolutions=[9]),
    dict(image_size=8, channels=12, channel_mult=[1, 1, 1], patch_size=2, attention_resolutions=[1]),
    dict(image_size=512, channels=48, channel_mult=[1] * 6, patch_size=4, attention_resolutions=[4]),
    dict(image_size=90, channels=16, channel_mult=[1, 2], patch_size=1, attention_resolutions=[45]),
]


def _net_output_shape(p):
    import torch

    from vdm.model.unet import UNet

    s = p.data.image_size
    with torch.device("meta"):  # shapes only: a shape that does not fit fails here as it would in training
        return tuple(UNet(p.model, s)(torch.zeros(2, 3, s, s), torch.zeros(2)).shape)


@pytest.mark.parametrize("net", ACCEPTED, ids=lambda n: f"{n['image_size']}px-c{n['channels']}-p{n['patch_size']}")
def test_a_net_validation_accepts_is_built_and_runs(net):
    net = dict(net)
    raw = with_changes({"data.image_size": net.pop("image_size")} | {f"model.{k}": v for k, v in net.items()})
    p = parse_params(raw)
    assert _net_output_shape(p) == (2, 3, p.data.image_size, p.data.image_size)


def test_validation_accepts_exactly_the_nets_that_can_be_built():
    """Over image sizes, stems, depths and attention sizes: what parses builds and runs; what is
    refused is refused by the shape rules, naming a model key."""
    accepted = 0
    for size in (16, 24, 90, 96):
        for patch in (1, 2, 4):
            for levels in (1, 2, 3, 4):
                for attention in ([], [size // patch // 2 ** (levels - 1)], [5]):
                    raw = with_changes(
                        {
                            "data.image_size": size,
                            "model.channels": 48,
                            "model.patch_size": patch,
                            "model.channel_mult": [1] * levels,
                            "model.attention_resolutions": attention,
                        }
                    )
                    try:
                        p = parse_params(raw)
                    except ParamError as e:
                        assert e.key.startswith("model."), str(e)
                        continue
                    accepted += 1
                    assert _net_output_shape(p) == (2, 3, size, size)
    assert 40 < accepted < 144


def test_images_smaller_than_the_metrics_pyramid_are_scored():
    """data.image_size may be as small as 8: the evaluate stage's sample metrics take such images."""
    import numpy as np

    from vdm.evaluation.evaluate import sample_quality

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    r = sample_quality(images[:3], images, images, repeats=2, seed=0)
    assert r["swd"] > 0 and r["swd_floor"] > 0 and np.isfinite(r["swd_ratio"])


def test_the_validate_stage_splits_the_batch_over_the_processes_this_machine_runs(tmp_path, monkeypatch):
    """train.processes: auto is one process per GPU: only the machine tells how many, so the
    validate stage checks the batch against that count (here: 3 GPUs, a global batch of 16)."""
    import stages.validate
    import vdm.core.runtime

    proj = copy_project(tmp_path / "p", train={"processes": "auto", "batch_size": 16, "wandb": "disabled"})
    monkeypatch.chdir(proj)
    monkeypatch.setattr(vdm.core.runtime, "process_count", lambda setting, device: 3 if setting == "auto" else setting)
    with pytest.raises(ParamError) as e:
        stages.validate.main()
    assert str(e.value) == (
        "params.yaml: train.batch_size = 16 is invalid: a multiple of 3: the global batch is split evenly over 3 "
        "training processes (train.processes = auto)"
    )
    assert not (proj / "params.ok").exists()
    monkeypatch.setattr(vdm.core.runtime, "process_count", lambda setting, device: 2)
    stages.validate.main()
    assert (proj / "params.ok").is_file()
