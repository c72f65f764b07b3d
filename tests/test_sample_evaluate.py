"""The sample and evaluate stages on a tiny trained model, and the real torch-fidelity path
with an Inception weights file the test makes (random weights of the right architecture)."""

import json

import numpy as np
import pytest
import torch

from tests.helpers import BASE_PARAMS, outs, tiny, walk
from vdm.core.params import SamplingOptions, parse_params
from vdm.data.preprocess import preprocess
from vdm.data.sources import fetch
from vdm.evaluation.evaluate import evaluate
from vdm.evaluation.metrics import INCEPTION_FILE, inception_weights, memorisation, nearest
from vdm.model.checkpoint import load_model
from vdm.sampling.sprites import generate, write_samples
from vdm.training.loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    p = parse_params(tiny(steps=2, eval_every=0, sample_every=0))
    fetch(p.data, root / "raw")
    preprocess(p.data, root / "raw", root / "data/processed", root / "data.json", workers=1)
    train(p, root / "data/processed", outs(root))
    return root


def sample_into(root, count=12, seed=0):
    model, _ = load_model(root / "models", "ema")
    samples, strip, secs = generate(model, count, walk(3, batch_size=5), seed, torch.device("cpu"), 2, 3)
    write_samples(
        root / "samples",
        samples,
        strip,
        {"count": count, "sampler": "ancestral", "steps": 3, "img_per_s": count / secs, "device": "cpu"},
    )
    return samples, strip


def test_sample_outputs_are_seeded_and_complete(trained):
    a, strip = sample_into(trained)
    b, _ = sample_into(trained)
    assert np.array_equal(a, b) and a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
    files = sorted(p.name for p in (trained / "samples").iterdir())
    assert files[:3] == ["grid.png", "info.json", "sample-0000.png"] and "strip.png" in files
    assert len([f for f in files if f.startswith("sample-")]) == 12
    assert strip.shape[0] > strip.shape[1] / 4  # 2 rows of 3 snapshots + the final image
    assert not np.array_equal(a, sample_into(trained, seed=1)[0])


def test_memorisation_distances():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    copies = train[[3, 7]]
    d, i = nearest(copies, train)
    assert np.allclose(d, 0) and list(i) == [3, 7]
    m = memorisation(np.concatenate([copies, test[:2]]), train, test)
    assert (m["ratio"][:2] < 1e-6).all() and (m["ratio"][2:] > 1).all()  # copies of train vs. test images
    assert m["copies"] == 0.5  # two of the four
    near = np.clip(train[[5]].astype(int) + rng.integers(-3, 4, (1, 8, 8, 3)), 0, 255).astype(np.uint8)
    assert memorisation(np.concatenate([near, test[3:6]]), train, test)["copies"] == 0.25  # a near copy counts


def test_missing_inception_weights_give_null_metrics_and_a_hint(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    sample_into(trained)
    raw = {**BASE_PARAMS, "data": tiny()["data"]}
    ep = parse_params({**raw, "evaluate": {**raw["evaluate"], "filter_colours": 8}}).evaluate
    r = evaluate(
        ep,
        trained / "models",
        trained / "samples",
        trained / "data/processed",
        trained / "eval",
        trained / "metrics/eval.json",
    )
    assert r["fid"] is None and r["kid"] is None and r["inception_score"] is None
    # a short code in the metrics (a column of `dvc exp show`), the whole hint printed once
    assert r["fidelity_skipped"] == "no_inception_weights"
    out = capsys.readouterr().out.splitlines()
    hint = [line for line in out if "FID/KID/IS skipped" in line]
    assert len(hint) == 1 and INCEPTION_FILE in hint[0] and "evaluate.inception_weights" in hint[0]
    # where the stage's time went, on stdout only (eval.json is compared whole below)
    timing = [line for line in out if line.startswith("evaluate: ") and " s: " in line]
    assert len(timing) == 1 and "c2st" in timing[0] and "the filtered samples" in timing[0]
    assert r["test_bpd"] > 0 and r["test_bpd_se"] > 0 and r["sample_count"] == 12
    assert (
        0 <= r["memorisation_copies"] <= 1
        and r["memorisation_median_ratio"] > 0
        and (trained / "eval/closest_pairs.png").is_file()
    )
    # sample quality beside its real floor, each with a bootstrap standard error
    assert r["swd"] > 0 and r["swd_se"] > 0 and r["swd_floor"] > 0 and r["swd_floor_se"] > 0
    assert r["swd_ratio"] == pytest.approx(r["swd"] / r["swd_floor"])
    assert r["graininess"] > 0 and r["graininess_test"] > 0
    # the same figures of the samples filtered to evaluate.filter_colours colours, under their own names
    assert r["filtered_colours"] == 8 and r["filtered_palette"] <= 8
    assert r["filtered_flatness"] >= r["flatness"] and r["filtered_swd"] > 0 and r["filtered_swd_se"] > 0
    assert (trained / "eval/grid-filtered.png").is_file()
    assert json.loads((trained / "metrics/eval.json").read_text()) == r


def test_pickled_weights_file_is_refused(tmp_path):
    bad = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1), "f": print}, bad)  # a global that weights_only refuses
    path, code, why = inception_weights(str(bad))
    assert path is None and code == "weights_file_refused" and "refusing" in why


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights, saved as a plain state dict."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    orig_load, orig_url = cls.load_state_dict, fe.load_state_dict_from_url
    try:
        cls.load_state_dict = lambda self, sd, *a, **k: None
        fe.load_state_dict_from_url = lambda *a, **k: {}
        torch.manual_seed(0)
        model = cls("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        cls.load_state_dict, fe.load_state_dict_from_url = orig_load, orig_url
    path = tmp_path_factory.mktemp("w") / "inception.pth"
    torch.save(model.state_dict(), path)
    return path


def test_fid_kid_is_through_torch_fidelity_with_a_weights_file(trained, random_inception_weights):
    sample_into(trained, count=12)
    ep = parse_params(
        {
            **BASE_PARAMS,
            "data": tiny()["data"],
            "evaluate": {**BASE_PARAMS["evaluate"], "inception_weights": str(random_inception_weights)},
        }
    )
    r = evaluate(
        ep.evaluate,
        trained / "models",
        trained / "samples",
        trained / "data/processed",
        trained / "eval",
        trained / "metrics/eval.json",
    )
    assert r["fidelity_skipped"] is None
    for k in ("fid", "kid", "inception_score"):
        assert isinstance(r[k], float) and np.isfinite(r[k]), k
    assert r["fid"] > 0 and r["inception_score"] >= 1.0 - 1e-9  # IS = exp(E KL) >= 1, up to rounding


def test_the_test_bound_is_the_sampling_models_and_the_eps_scaled_one_is_reported_beside_it(trained):
    from vdm.evaluation.evaluate import test_bounds

    model, _ = load_model(trained / "models", "ema")
    test = np.load(trained / "data/processed/test.npy")
    ep = parse_params({**BASE_PARAMS, "data": tiny()["data"]}).evaluate
    own, scaled = test_bounds(model, test, ep, torch.device("cpu"))
    assert scaled is None and own["total"] > 0  # no table (tiny() trains without the eps-scale fit)
    with torch.no_grad():
        model.eps_scale.fill_(0.5)
    own_again, scaled = test_bounds(model, test, ep, torch.device("cpu"))
    assert own_again["total"] == own["total"]  # the table does not change the sampling model's bound
    assert scaled is not None and scaled["total"] != own["total"]
    assert bool((model.eps_scale == 0.5).all())  # and the model keeps its table


def test_the_sample_stage_draws_the_sprites_vdm_generate_draws_for_a_seed(trained):
    from vdm.app.api import load

    model, _ = load_model(trained / "models", "ema", "cpu", "auto")  # as the stage loads it (sample.precision)
    options = SamplingOptions().replace(steps=3, batch_size=2)  # the defaults: params.yaml's sample section
    stage, _, _ = generate(model, 5, options, 11, torch.device("cpu"), 0, 2)
    api = load(trained / "models").generate(5, seed=11, steps=3, batch_size=2)  # same batches: same rounding
    assert np.array_equal(stage, api)
    # sprite k of a seed does not depend on how many are drawn
    fewer, _, _ = generate(model, 2, options, 11, torch.device("cpu"), 0, 2)
    assert np.array_equal(fewer, stage[:2])
