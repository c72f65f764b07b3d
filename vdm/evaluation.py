"""Evaluation: held-out bits/dim, sliced Wasserstein distance and graininess beside their
real-vs-real floor (vdm/quality.py), FID/KID/IS (torch-fidelity), memorisation distances.

Inception weights: torch-fidelity downloads them from GitHub on first use, which fails
offline. They are taken from `evaluate.inception_weights` (a local .pth) or torch hub's
cache; when neither exists the metrics are null with the reason and a hint. The file is
first loaded with torch.load(weights_only=True): torch-fidelity itself loads it with
weights_only=False, so only a file that provably holds no pickled code is handed over.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vdm.atomic import Commit, journal_for, recover, write_json
from vdm.checkpoint import check_keys, load_model, read_json
from vdm.data import load_images, load_split, to_nchw
from vdm.diffusion import estimate_bpd
from vdm.errors import UserError
from vdm.images import image_grid, png_bytes
from vdm.params import EvaluateParams
from vdm.quality import graininess, structure_summary, swd
from vdm.runtime import resolve_device

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def inception_weights(param: str) -> tuple[Path | None, str, str]:
    """(path, "", "") of usable Inception weights, or (None, a short code, why not and how to get
    them). The code goes into metrics/eval.json (short enough for `dvc exp show`), the hint is printed."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    # shown with ~ for the home folder: the reason lands in committed metrics
    shown = f"~/{cache.relative_to(Path.home())}" if cache.is_relative_to(Path.home()) else str(cache)
    how = (
        f"download {INCEPTION_URL} on a machine with internet access and set evaluate.inception_weights "
        f"to the file's path (or copy it to {shown})"
    )
    if param:
        path = Path(param).expanduser()
        if not path.is_file():
            return None, "weights_file_missing", f"evaluate.inception_weights = {param!r}: no such file; {how}"
    elif cache.is_file():
        path = cache
    else:
        why = f"no Inception weights (evaluate.inception_weights is empty and {shown} does not exist); {how}"
        return None, "no_inception_weights", why
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = f"{path} is not a plain tensor file ({type(e).__name__}); refusing to load it: {how}"
        return None, "weights_file_refused", why
    return path, "", ""


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1).contiguous()


def fidelity(samples: np.ndarray, reference: np.ndarray, weights: Path, device: torch.device) -> dict:
    """FID and KID against `reference`, Inception Score of `samples` (torch-fidelity)."""
    import torch_fidelity

    n = min(len(samples), len(reference))
    m = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(samples),
        input2=_Uint8Images(reference),
        cuda=device.type == "cuda",
        fid=True,
        kid=True,
        isc=True,
        kid_subset_size=min(1000, n),
        isc_splits=min(10, len(samples)),
        feature_extractor_weights_path=str(weights),
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    return {
        "fid": float(m["frechet_inception_distance"]),
        "kid": float(m["kernel_inception_distance_mean"]),
        "kid_std": float(m["kernel_inception_distance_std"]),
        "inception_score": float(m["inception_score_mean"]),
        "inception_score_std": float(m["inception_score_std"]),
    }


def nearest(samples: np.ndarray, reference: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """For each sample, the L2 distance (pixels in [0, 1]) to its nearest reference image, and its index."""
    a = torch.from_numpy(samples.reshape(len(samples), -1).astype(np.float32) / 255.0)
    best_d = torch.full((len(a),), float("inf"))
    best_i = torch.zeros(len(a), dtype=torch.long)
    for start in range(0, len(reference), chunk):
        b = torch.from_numpy(np.asarray(reference[start : start + chunk]).reshape(-1, a.shape[1]).astype(np.float32))
        d = torch.cdist(a, b / 255.0)
        m, i = d.min(dim=1)
        better = m < best_d
        best_d[better], best_i[better] = m[better], i[better] + start
    return best_d.numpy(), best_i.numpy()


def memorisation(samples: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict:
    """Nearest-train distance over nearest-test distance per sample: about 1 or above means
    the samples are no closer to the training set than to unseen Pokémon (no copying)."""
    d_train, i_train = nearest(samples, train)
    d_test, _ = nearest(samples, test)
    ratio = d_train / np.maximum(d_test, 1e-12)
    return {"ratio": ratio, "d_train": d_train, "i_train": i_train, "d_test": d_test}


def sample_quality(
    samples: np.ndarray, train: np.ndarray, test: np.ndarray, repeats: int, seed: int, per_repeat: bool = False
) -> dict:
    """SWD (x 1000, mean over pyramid levels and per level, each +- bootstrap s.e.) of the samples
    against the test split, beside the floor: as many training images as samples (a fresh
    seeded subset in every repeat) against the test split; graininess, parts and palette
    (vdm.quality.sprite_structure) of samples and test.
    per_repeat adds each bootstrap repeat's SWD (`swd_per_repeat`) for paired comparisons."""
    n, out = len(samples), {}
    for name, images, subsets in (("swd", samples, False), ("swd_floor", train, True)):
        r = swd(images, test, n, repeats, seed, subsets=subsets)
        out[name], out[f"{name}_se"] = r["avg"], r["avg_se"]
        if per_repeat and name == "swd":
            out["swd_per_repeat"] = r["per_repeat"]
        for side, m, se in zip(r["levels"], r["mean"], r["se"], strict=True):
            out[f"{name}_{side}"], out[f"{name}_{side}_se"] = m, se
    out["swd_ratio"] = out["swd"] / out["swd_floor"]
    out["graininess"] = graininess(samples)
    out["graininess_test"] = graininess(test)
    out.update(structure_summary(samples, test))
    return out


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
    """Test bits/dim (EMA; with and without the eps scale), FID/KID/IS where weights exist, memorisation;
    writes eval.json and closest pairs."""
    device = resolve_device(ep.device, "evaluate.device")
    recover(journal_for(out_dir))  # an interrupted run's outputs: finish moving them into place first
    model, _ = load_model(models, "ema", device)
    size = model.net.image_size
    test, train = load_split(processed, "test"), load_split(processed, "train")
    for split, images in (("test", test), ("train", train)):
        _check_split_size(processed, split, images, size)
    samples, info = _load_samples(samples_dir, size)
    bpd, bpd_scaled = test_bounds(model, test, ep, device)
    fid, skipped = _fidelity_or_none(ep, samples, test, device)
    mem = memorisation(samples, train, test)
    quality = sample_quality(samples, train, test, ep.swd_repeats, ep.seed)

    result = {
        "test_bpd": bpd["total"],
        "test_bpd_se": bpd["total_se"],
        **{f"test_{k}": bpd[k] for k in ("diffusion", "latent", "recon")},
        # the bound of the model with its eps-scale table (vdm.diffusion.fit_eps_scale): another model,
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
        write_json(c.file(metrics_path), result)
    return result
