"""The evaluate stage: held-out bits/dim of the model, the registered sample metrics beside
their real-vs-real floors (vdm/evaluation/metrics.py; the classifier two-sample test,
vdm/evaluation/c2st.py, the figure that decides), FID/KID/IS where Inception weights are
at hand, memorisation distances; eval/ and metrics/eval.json written together.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from vdm.core.atomic import Commit, journal_for, recover, write_json
from vdm.core.errors import UserError
from vdm.core.images import image_grid, png_bytes, reduce_colours
from vdm.core.params import EvaluateParams
from vdm.core.runtime import resolve_device
from vdm.data.splits import load_images, load_split, to_nchw
from vdm.evaluation import c2st  # noqa: F401 (registers the classifier two-sample test as a sample metric)
from vdm.evaluation.metrics import SAMPLE_METRICS, SampleSets, fidelity, inception_weights, memorisation
from vdm.model.bound import estimate_bpd
from vdm.model.checkpoint import check_keys, load_model, read_json


def sample_quality(
    samples: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    repeats: int,
    seed: int,
    per_repeat: bool = False,
    c2st_repeats: int = 3,
    seconds: dict[str, float] | None = None,
) -> dict:
    """Every registered sample metric (vdm.evaluation.metrics.SAMPLE_METRICS: SWD beside its floor,
    graininess, parts, palette, flatness, ...) of the samples, with the training and test splits as
    references.
    per_repeat adds each bootstrap repeat's SWD (`swd_per_repeat`) for paired comparisons;
    c2st_repeats: the seeds the classifier test averages (evaluate.c2st_repeats; 0 = off);
    seconds, if given, receives each metric's wall seconds under its registry name."""
    sets = SampleSets(samples, train, test, repeats, seed, per_repeat, c2st_repeats)
    out = {}
    for name, metric in SAMPLE_METRICS.items():
        t0 = time.perf_counter()
        out.update(metric(sets))
        if seconds is not None:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
    return out


# the figures of the filtered samples (evaluate.filter_colours) metrics/eval.json reports, as filtered_*
FILTERED_KEYS = (
    "c2st",
    "c2st_se",
    "parts",
    "parts_se",
    "palette",
    "palette_se",
    "flatness",
    "flatness_se",
    "hue",
    "hue_se",
    "graininess",
    "swd",
    "swd_se",
)
SAMPLES_FIX = "Restore it with `dvc checkout samples`, or redraw it with `dvc repro sample`"
# what evaluate reads of samples/info.json (the sample stage writes these and more)
INFO_KEYS = {"count": int, "sampler": str, "steps": int, "img_per_s": (int, float), "device": str}


def _load_samples(samples_dir, size: int) -> tuple[np.ndarray, dict]:
    """samples/samples.npy and info.json, checked: the sprites at the model's image size, the
    settings evaluate records, and the two from the same run (the same count)."""
    d = Path(samples_dir)
    samples = load_images(d / "samples.npy", SAMPLES_FIX)
    info = read_json(d / "info.json", SAMPLES_FIX)
    if not isinstance(info, dict):
        raise UserError(f"{d / 'info.json'} holds no object of sampling settings. {SAMPLES_FIX}")
    check_keys(d / "info.json", info, {**dict.fromkeys(info, object), **INFO_KEYS}, INFO_KEYS, SAMPLES_FIX)
    if info["count"] != len(samples):
        raise UserError(
            f"{d / 'info.json'} records {info['count']} sprites but {d / 'samples.npy'} holds {len(samples)}: the two "
            f"come from different runs. {SAMPLES_FIX}"
        )
    if samples.shape[1] != size:
        raise UserError(
            f"{d / 'samples.npy'} holds {samples.shape[1]}x{samples.shape[2]} sprites but the model draws "
            f"{size}x{size}: the samples are older than the model. {SAMPLES_FIX}"
        )
    return np.array(samples), info


def _check_split_size(processed, split: str, images: np.ndarray, size: int) -> None:
    if images.shape[1] != size:
        raise UserError(
            f"{Path(processed) / f'{split}.npy'} holds {images.shape[1]}x{images.shape[2]} images but the model in "
            f"models/ was trained on {size}x{size}: the data changed after training; run `dvc repro` (train, sample "
            "and evaluate follow the data)"
        )


def _fidelity_or_none(ep: EvaluateParams, samples: np.ndarray, test: np.ndarray, device) -> tuple[dict, str | None]:
    """FID/KID/IS where Inception weights are at hand, else Nones and why they were skipped."""
    weights, skipped, why = inception_weights(ep.inception_weights)
    if weights is not None:
        return fidelity(samples, test, weights, device), None
    print(f"evaluate: FID/KID/IS skipped: {why}")
    return {"fid": None, "kid": None, "kid_std": None, "inception_score": None, "inception_score_std": None}, skipped


def test_bounds(model, test: np.ndarray, ep: EvaluateParams, device) -> tuple[dict, dict | None]:
    """The test bound of the model the samples come from (the network's own eps estimate), and,
    where the model carries a fitted eps-scale table, the bound with it (the same time and noise
    draws: the two are paired)."""
    table = model.eps_scale.clone()
    x = to_nchw(test)
    try:
        model.eps_scale.fill_(1.0)
        own = estimate_bpd(
            model, x, ep.time_samples, ep.batch_size, torch.Generator(device).manual_seed(ep.seed), device
        )
    finally:
        model.eps_scale.copy_(table)
    if bool((table == 1).all()):
        return own, None
    gen = torch.Generator(device).manual_seed(ep.seed)
    return own, estimate_bpd(model, x, ep.time_samples, ep.batch_size, gen, device)


def evaluate(
    ep: EvaluateParams,
    models="models",
    samples_dir="samples",
    processed="data/processed",
    out_dir="eval",
    metrics_path="metrics/eval.json",
) -> dict:
    """Test bits/dim (EMA; with and without the eps scale), FID/KID/IS where weights exist, memorisation,
    the sample metrics (and those of the samples filtered to evaluate.filter_colours colours, as
    filtered_*); writes eval.json, the closest pairs and the filtered grid."""
    device = resolve_device(ep.device, "evaluate.device")
    recover(journal_for(out_dir))  # an interrupted run's outputs: finish moving them into place first
    model, _ = load_model(models, "ema", device)
    size = model.net.image_size
    test, train = load_split(processed, "test"), load_split(processed, "train")
    for split, images in (("test", test), ("train", train)):
        _check_split_size(processed, split, images, size)
    samples, info = _load_samples(samples_dir, size)
    seconds, t0 = {}, time.perf_counter()
    bpd, bpd_scaled = test_bounds(model, test, ep, device)
    seconds["test bound"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    fid, skipped = _fidelity_or_none(ep, samples, test, device)
    t2 = time.perf_counter()
    mem = memorisation(samples, train, test)
    seconds |= {"FID/KID/IS": t2 - t1, "memorisation": time.perf_counter() - t2}
    quality = sample_quality(
        samples, train, test, ep.swd_repeats, ep.seed, c2st_repeats=ep.c2st_repeats, seconds=seconds
    )
    filtered = reduce_colours(samples, ep.filter_colours) if ep.filter_colours else None
    if filtered is not None:
        t1 = time.perf_counter()
        scores = sample_quality(filtered, train, test, ep.swd_repeats, ep.seed, c2st_repeats=ep.c2st_repeats)
        quality |= {"filtered_colours": ep.filter_colours} | {f"filtered_{k}": scores[k] for k in FILTERED_KEYS}
        seconds["the filtered samples"] = time.perf_counter() - t1
    # where the stage's time goes (stdout only: metrics/eval.json stays the same from run to run)
    shown = sorted(seconds.items(), key=lambda kv: -kv[1])
    print(
        f"evaluate: {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{name} {s:.0f} s" for name, s in shown if s >= 0.5)
        + " (the rest under 1 s)"
    )

    result = {
        "test_bpd": bpd["total"],
        "test_bpd_se": bpd["total_se"],
        **{f"test_{k}": bpd[k] for k in ("diffusion", "latent", "recon")},
        # the bound of the model with its eps-scale table (vdm.model.bound.fit_eps_scale): another model,
        # which no sampler uses; None when the model has no table
        "test_bpd_eps_scaled": bpd_scaled and bpd_scaled["total"],
        "test_bpd_eps_scaled_se": bpd_scaled and bpd_scaled["total_se"],
        "test_images": bpd["images"],
        "time_samples": ep.time_samples,
        **quality,
        **fid,
        "fidelity_skipped": skipped or None,
        "memorisation_median_ratio": float(np.median(mem["ratio"])),
        "memorisation_min_ratio": float(mem["ratio"].min()),
        "memorisation_copies": mem["copies"],  # the share of samples that copy a training sprite
        "sample_count": len(samples),
        "sampler": info["sampler"],
        "sample_steps": info["steps"],
        "sample_img_per_s": info["img_per_s"],
        "sample_device": info["device"],
    }
    order = np.argsort(mem["ratio"])[: ep.closest_pairs]
    out_dir, metrics_path = Path(out_dir), Path(metrics_path)
    with Commit(journal_for(out_dir)) as c:  # eval/ and the metrics together
        tmp = c.dir(out_dir)
        if len(order):
            pairs = np.stack([im for i in order for im in (samples[i], np.asarray(train[mem["i_train"][i]]))])
            (tmp / "closest_pairs.png").write_bytes(png_bytes(image_grid(pairs, ncol=2)))
        if filtered is not None:  # beside samples/grid.png: the same first 64 sprites
            ncol = int(np.ceil(np.sqrt(min(64, len(filtered)))))
            (tmp / "grid-filtered.png").write_bytes(png_bytes(image_grid(filtered[:64], ncol=ncol)))
        write_json(c.file(metrics_path), result)
    return result
