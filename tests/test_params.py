import pytest
import yaml

from tests.helpers import ROOT, raw_params
from vdm.errors import ParamError, UserError
from vdm.params import load_params, parse_params


def test_project_params_file_is_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.data.image_size == 96
    assert abs(p.data.split.train + p.data.split.val + p.data.split.test - 1) < 1e-9


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
    assert p.model.channel_mult == (1, 2) and p.model.attention_resolutions == (8,)
