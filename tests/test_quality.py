"""The sample-quality metrics: sliced Wasserstein distance (against its definition), graininess,
and the lossless-codec yardstick."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vdm.data.codecs import codec_bits_per_subpixel
from vdm.data.synthetic import draw_sprite
from vdm.evaluation.evaluate import sample_quality
from vdm.evaluation.metrics import (
    KERNEL,
    graininess,
    laplacian_pyramid,
    normalise,
    patch_descriptors,
    patch_positions,
    pyr_down,
    pyr_up,
    pyramid_sides,
    sliced_wasserstein,
    swd,
    swd_once,
)


def sprites(n: int, seed: int, size: int = 48) -> np.ndarray:
    """n synthetic sprites (distinct species), (n, size, size, 3) uint8 on white."""
    out = []
    for k in range(n):
        im = draw_sprite(seed, k).convert("RGBA").resize((size, size), Image.NEAREST)
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        out.append(np.asarray(Image.alpha_composite(canvas, im).convert("RGB")))
    return np.stack(out)


@pytest.fixture(scope="module")
def real():
    return sprites(48, seed=0), sprites(48, seed=1)


def test_pyramid_levels_follow_the_definition():
    assert pyramid_sides(96) == [96, 48, 24]
    assert pyramid_sides(64) == [64, 32, 16]
    assert pyramid_sides(32) == [32, 16]
    # the 5x5 binomial kernel: [1 4 6 4 1] / 16 in each direction
    assert torch.allclose(KERNEL[2], torch.tensor([6, 24, 36, 24, 6], dtype=torch.float64) / 256)
    assert float(KERNEL.sum()) == pytest.approx(1.0)
    # an impulse far from the edges: pyr_down shows the kernel at the sample points
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    x[0, 0, 8, 8] = 1.0
    d = pyr_down(x)
    assert d.shape == (1, 1, 8, 8)
    assert float(d[0, 0, 4, 4]) == pytest.approx(36 / 256)
    assert float(d[0, 0, 4, 3]) == pytest.approx(6 / 256)  # offset 2 in x: weight 1/16 * 6/16
    # a constant image stays constant through down and up, so its Laplacian levels are 0
    c = torch.full((1, 3, 32, 32), 7.0, dtype=torch.float64)
    assert torch.allclose(pyr_up(pyr_down(c)), c)
    lap = laplacian_pyramid(c, 2)
    assert torch.allclose(lap[0], torch.zeros_like(c)) and torch.allclose(
        lap[1], torch.full((1, 3, 16, 16), 7.0, dtype=torch.float64)
    )


def test_laplacian_pyramid_reconstructs_the_image():
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    lap = laplacian_pyramid(x, 3)
    assert [tuple(level.shape[-2:]) for level in lap] == [(32, 32), (16, 16), (8, 8)]
    rec = lap[2]
    for level in reversed(lap[:2]):
        rec = level + pyr_up(rec)
    assert torch.allclose(rec, x)


def test_patches_and_normalisation():
    level = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).view(2, 3, 10, 10)
    ys, xs = torch.tensor([[3], [6]]), torch.tensor([[4], [5]])
    d = patch_descriptors(level, ys, xs)
    assert d.shape == (2, 3, 7, 7)
    assert torch.equal(d[0, 1], level[0, 1, 0:7, 1:8]) and torch.equal(d[1, 2], level[1, 2, 3:10, 2:9])
    ys, xs = patch_positions(4, 24, 128, torch.Generator().manual_seed(0))
    assert ys.shape == (4, 128) and int(ys.min()) >= 3 and int(xs.max()) <= 20  # whole patches only
    n = normalise(torch.randn(500, 3, 7, 7) * 5 + 2)
    per_channel = n.view(500, 3, 49)
    assert torch.allclose(per_channel.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(dim=(0, 2), correction=0), torch.ones(3), atol=1e-5)


def test_sliced_wasserstein_on_a_hand_computable_case():
    # one-dimensional descriptors: every unit direction is +1 or -1, and the distance is the
    # mean |difference| of the sorted values: {0, 1, 2, 3} vs {1, 2, 3, 4} -> exactly 1
    a = torch.tensor([[3.0], [0.0], [2.0], [1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0], [4.0], [2.0], [3.0]], dtype=torch.float64)
    assert sliced_wasserstein(a, b, torch.Generator().manual_seed(0)) == pytest.approx(1.0)
    # a shift by v: every direction d moves all projections by <v, d>; the mean of |<v, d>|
    # over the same directions is what the function must return
    a = torch.randn(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = torch.tensor([3.0, 0.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    got = sliced_wasserstein(a, a + v, torch.Generator().manual_seed(2))
    dirs = torch.randn(5, 512, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    assert got == pytest.approx(float((v @ dirs).abs().mean()))
    with pytest.raises(ValueError, match="differ in shape"):
        sliced_wasserstein(a, a[:10], torch.Generator())


def test_identical_sets_are_zero_and_per_channel_affine_changes_are_ignored(real):
    a, _ = real
    assert swd_once(a, a.copy(), torch.Generator().manual_seed(0)) == [0.0, 0.0]
    r = swd(a, a.copy(), len(a), repeats=1, seed=3)
    assert r["avg"] == 0.0 and r["mean"] == [0.0, 0.0] and r["levels"] == [48, 24]
    # each descriptor set is normalised by its own per-channel mean and std
    even = a // 2 * 2
    shifted = even // 2 + 40  # exactly 0.5 x + 40 in every channel
    assert max(swd_once(even, shifted, torch.Generator().manual_seed(0))) < 1e-3


def test_real_floor_is_far_below_noise_and_blur_or_grain_raise_the_finest_level(real):
    a, b = real
    rng = np.random.default_rng(0)
    floor = swd(a, b, len(a), repeats=4, seed=0)
    noise = swd(rng.integers(0, 256, a.shape, dtype=np.uint8), b, len(a), repeats=4, seed=0)
    assert noise["avg"] > 3 * floor["avg"]
    assert noise["avg"] - 3 * noise["avg_se"] > floor["avg"] + 3 * floor["avg_se"]
    blurred = np.stack([np.asarray(Image.fromarray(im).resize((24, 24)).resize((48, 48), Image.BILINEAR)) for im in a])
    grainy = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    finest = swd(a, b, len(a), repeats=4, seed=0)["mean"][0]
    assert swd(blurred, b, len(a), repeats=4, seed=0)["mean"][0] > 1.5 * finest
    assert swd(grainy, b, len(a), repeats=4, seed=0)["mean"][0] > 1.5 * finest
    # graininess: real sprites are flat with outlines; added grain raises it
    assert graininess(grainy) > 1.5 * graininess(a)


def test_swd_is_seeded_and_has_a_bootstrap_spread(real):
    a, b = real
    r1, r2 = swd(a, b, 32, repeats=5, seed=7), swd(a, b, 32, repeats=5, seed=7)
    assert r1 == r2
    assert r1["avg_se"] > 0 and all(se > 0 for se in r1["se"])
    assert swd(a, b, 32, repeats=5, seed=8)["avg"] != r1["avg"]


def test_graininess_by_hand():
    img = np.zeros((1, 2, 3, 3), dtype=np.uint8)
    img[0, :, 1] = 30  # a middle column: horizontal steps 30, 30 per row; vertical steps 0
    # 2 rows x 2 horizontal pairs x 3 channels = 12 differences of 30; 1 x 3 pairs x 3 = 9 zeros
    assert graininess(img) == pytest.approx(12 * 30 / 21)


def test_sample_quality_reports_the_floor_beside_the_samples(real):
    a, b = real
    train = np.concatenate([a, b])
    q = sample_quality(a[:16], train, b, repeats=3, seed=0, c2st_repeats=0)  # the classifier: tests/test_c2st.py
    for name in ("swd", "swd_floor"):
        assert {f"{name}_48", f"{name}_24", f"{name}_se"} <= set(q)
        assert q[name] == pytest.approx((q[f"{name}_48"] + q[f"{name}_24"]) / 2)
    assert q["swd_ratio"] == pytest.approx(q["swd"] / q["swd_floor"])
    assert q["graininess_test"] == pytest.approx(graininess(b))


def test_codec_yardstick_counts_real_encoder_bytes(real):
    a, _ = real
    r = codec_bits_per_subpixel(a[:4])
    png = sum(len(_encode(im, "PNG", optimize=True)) for im in a[:4])
    assert r["png"] == pytest.approx(8 * png / a[:4].size)
    assert 0 < r["webp_lossless"] < r["png"] < 8
    flat = np.full((2, 48, 48, 3), 255, dtype=np.uint8)  # a white canvas costs almost nothing
    assert codec_bits_per_subpixel(flat)["webp_lossless"] < 0.05


def _encode(im: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_sprite_structure_counts_parts_and_palette_as_the_eye_does():
    from vdm.evaluation.metrics import sprite_structure, structure_summary

    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2
    sprite = np.full((32, 32, 3), 255, np.uint8)
    sprite[disc < 100] = (40, 40, 40)  # dark outline
    sprite[disc < 64] = (230, 90, 30)  # flat orange body
    rng = np.random.default_rng(0)
    speckled = sprite.copy()
    body = disc < 64
    noisy = body & (rng.random((32, 32)) < 0.5)
    speckled[noisy] = rng.integers(0, 230, (int(noisy.sum()), 3))  # salt-and-pepper colour
    for y in range(0, 32, 6):  # 2x2 specks over the background
        for x in range(0, 32, 6):
            if disc[y, x] > 200:
                speckled[y : y + 2, x : x + 2] = (20, 120, 200)
    white = np.full((32, 32, 3), 255, np.uint8)
    s = sprite_structure(np.stack([sprite, speckled, white]))
    assert s["parts"][0] == 1 and s["parts"][1] > 5 and s["parts"][2] == 0
    assert s["palette"][0] <= 2 and s["palette"][1] > 10 * s["palette"][0] and s["palette"][2] == 0
    assert s["flatness"][0] > 0.45 and s["flatness"][1] < s["flatness"][0] / 2 and s["flatness"][2] == 0
    summary = structure_summary(np.stack([speckled, speckled]), np.stack([sprite, sprite]))
    assert summary["parts"] > summary["parts_test"] == 1 and summary["parts_test_se"] == 0


def test_flatness_is_the_share_of_foreground_pixels_inside_a_flat_region():
    from vdm.evaluation.metrics import flat_share, sprite_structure

    # a 6x6 flat square on white: of its 36 pixels, the inner 4x4 have four same-colour neighbours
    im = np.full((10, 10, 3), 255, np.uint8)
    im[2:8, 2:8] = (200, 40, 40)
    assert sprite_structure(im[None])["flatness"][0] == 16 / 36
    # a checkerboard of two colours 16 levels apart (different at 4 bits): no pixel is flat
    board = im.copy()
    yy, xx = np.mgrid[:10, :10]
    board[((yy + xx) % 2 == 0) & (im[..., 0] == 200)] = (216, 40, 40)
    assert sprite_structure(board[None])["flatness"][0] == 0.0
    # colours within one 16-level bin count as the same colour
    close = im.copy()
    close[4, 4] = (207, 47, 47)
    assert sprite_structure(close[None])["flatness"][0] == 16 / 36
    # no foreground: 0, not a division by zero; an edge pixel is never flat
    assert flat_share(np.zeros((5, 5), np.int32), np.zeros((5, 5), bool)) == 0.0
    assert flat_share(np.zeros((3, 3), np.int32), np.ones((3, 3), bool)) == 1 / 9


def test_reduce_colours_repaints_speckle_in_flat_colours_and_keeps_the_silhouette():
    from vdm.core.images import reduce_colours
    from vdm.evaluation.metrics import sprite_structure

    # an outlined two-colour disc whose body is speckled with noise of +-40 levels per channel
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2
    clean = np.full((32, 32, 3), 255, np.uint8)
    clean[disc < 144] = (40, 40, 40)
    clean[disc < 100] = (230, 90, 30)
    clean[(disc < 100) & (xx > 16)] = (60, 120, 220)
    rng = np.random.default_rng(0)
    noisy = clean.astype(int)
    body = disc < 100
    noisy[body] += rng.integers(-40, 41, (int(body.sum()), 3))
    noisy[disc >= 144] -= rng.integers(0, 10, (int((disc >= 144).sum()), 3))  # near-white background noise
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    empty = np.full((32, 32, 3), 250, np.uint8)  # no foreground at all
    out = reduce_colours(np.stack([noisy, empty]), 3)
    fg = noisy.min(axis=2) < 240
    assert np.array_equal(out[0].min(axis=2) < 240, fg)  # the silhouette is kept ...
    assert (out[0][~fg] == 255).all() and (out[1] == 255).all()  # ... and the background is pure white
    assert len(np.unique(out[0][fg], axis=0)) <= 3
    # the three regions come back as their own colours, within a few levels
    inner = disc < 64
    for region, colour in ((inner & (xx > 18), (60, 120, 220)), (inner & (xx < 15), (230, 90, 30))):
        got = out[0][region]
        assert len(np.unique(got, axis=0)) == 1
        assert np.abs(got[0].astype(int) - colour).max() <= 6
    before, after = sprite_structure(noisy[None]), sprite_structure(out[:1])
    assert before["flatness"][0] < 0.05 and after["flatness"][0] > 0.5 and after["palette"][0] <= 3
    assert np.array_equal(out, reduce_colours(np.stack([noisy, empty]), 3))  # deterministic
    assert len(np.unique(reduce_colours(noisy[None], 1)[0][fg], axis=0)) == 1
    with pytest.raises(ValueError, match="at least 1"):
        reduce_colours(noisy[None], 0)


def test_sample_quality_reports_every_registered_metric(real):
    from vdm.evaluation.metrics import PER_IMAGE_METRICS, SAMPLE_METRICS, SampleSets

    a, b = real
    q = sample_quality(a[:8], a[8:24], b[:8], repeats=2, seed=0, c2st_repeats=1)
    sets = SampleSets(a[:8], a[8:24], b[:8], 2, 0, c2st_repeats=1)
    for name, metric in SAMPLE_METRICS.items():
        assert metric(sets) == {k: q[k] for k in metric(sets)}, name
    assert set(SAMPLE_METRICS) >= {"swd", "graininess", *PER_IMAGE_METRICS}
    for name in PER_IMAGE_METRICS:
        assert {name, f"{name}_se", f"{name}_test", f"{name}_test_se"} <= set(q)


def test_a_new_sample_metric_is_one_registered_function(real, monkeypatch):
    from vdm.evaluation import metrics

    monkeypatch.setitem(metrics.SAMPLE_METRICS, "white", lambda s: {"white_share": float((s.samples == 255).mean())})
    a, b = real
    q = sample_quality(a[:4], a[4:12], b[:4], repeats=1, seed=0, c2st_repeats=0)
    assert q["white_share"] == float((a[:4] == 255).mean())
