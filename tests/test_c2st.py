"""The classifier two-sample test: chance between sets drawn alike, certainty between sprites and
noise, the same figure twice, and its place among the sample metrics."""

from __future__ import annotations

import numpy as np
import pytest

from vdm.data.synthetic import draw_sprite
from vdm.evaluation import c2st
from vdm.evaluation.c2st import held_out_accuracy
from vdm.evaluation.metrics import SAMPLE_METRICS, SampleSets


def _sprites(start: int, n: int, side: int = 32) -> np.ndarray:
    """n synthetic sprites (RGBA composited on white), side x side uint8 RGB."""
    out = []
    for i in range(start, start + n):
        im = draw_sprite(0, i).convert("RGBA").resize((side, side))
        rgb = np.asarray(im, dtype=np.float64)
        alpha = rgb[..., 3:] / 255.0
        out.append(np.round(rgb[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def sprites():
    return _sprites(0, 96)


def test_sets_drawn_alike_score_near_chance(sprites):
    acc, se = held_out_accuracy(sprites[0::2], sprites[1::2], seed=0)
    assert 0.3 <= acc <= 0.7, (acc, se)
    assert 0.04 < se < 0.08  # binomial s.e. of 96 predictions near 0.5


def test_noise_against_sprites_scores_near_one(sprites):
    noise = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    acc, _ = held_out_accuracy(noise, sprites[:48], seed=0)
    assert acc >= 0.95


def test_speckle_on_the_same_shapes_is_told_apart(sprites):
    """The colour the SWD barely sees: the same sprites with +-12 levels of speckle on every pixel."""
    rng = np.random.default_rng(1)
    speckled = np.clip(sprites[:48].astype(int) + rng.integers(-12, 13, sprites[:48].shape), 0, 255).astype(np.uint8)
    acc, _ = held_out_accuracy(speckled, sprites[48:], seed=0)
    assert acc >= 0.9


def test_repeats_average_the_seeds_and_widen_the_error_by_their_spread(sprites, monkeypatch):
    monkeypatch.setattr(c2st, "STEPS", 30)  # the arithmetic of the repeats, not the classifier's skill
    a, b = sprites[:24], sprites[24:48]
    runs = [held_out_accuracy(a, b, seed=s) for s in (5, 6)]
    acc, se = held_out_accuracy(a, b, seed=5, repeats=2)
    assert acc == pytest.approx((runs[0][0] + runs[1][0]) / 2)
    spread = (runs[0][0] - runs[1][0]) ** 2 / 4  # the variance of two values over 2 repeats
    assert se == pytest.approx((acc * (1 - acc) / 48 + spread) ** 0.5)


def test_same_images_same_figure_and_bad_sizes_refused(sprites, monkeypatch):
    monkeypatch.setattr(c2st, "STEPS", 30)
    a, b = sprites[:24], sprites[24:48]
    assert held_out_accuracy(a, b, seed=3) == held_out_accuracy(a, b, seed=3)
    with pytest.raises(ValueError, match="equal size"):
        held_out_accuracy(a, b[:20], seed=0)


def test_registered_with_its_floor(sprites, monkeypatch):
    """c2st is a sample metric: samples against test sprites beside training sprites against them;
    the floor is computed once per (train, test, n, seed)."""
    assert "c2st" in SAMPLE_METRICS
    calls = []
    real = c2st.held_out_accuracy
    monkeypatch.setattr(c2st, "held_out_accuracy", lambda a, b, seed, r: calls.append(len(a)) or real(a, b, seed, r))
    monkeypatch.setattr(c2st, "_FLOORS", {})
    noise = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    sets = SampleSets(noise, sprites[:48], sprites[48:72], repeats=2, seed=0, c2st_repeats=1)
    out = SAMPLE_METRICS["c2st"](sets)
    assert out["c2st"] >= 0.95 and out["c2st_floor"] < 0.8 and out["c2st_images"] == 24
    assert set(out) == {"c2st", "c2st_se", "c2st_floor", "c2st_floor_se", "c2st_images"}
    SAMPLE_METRICS["c2st"](sets)
    assert calls == [24, 24, 24]  # samples, floor, samples again: the floor came from the cache


def test_the_benchmark_scores_grids_and_arrays_alike(sprites, tmp_path):
    """benchmarks/classifier.py reads a grid PNG back into the sprites it shows (blank cells
    dropped) and scores it exactly as the same sprites saved as an array; a picture that is no
    grid and a missing file are one line each."""
    import subprocess
    import sys

    from benchmarks.classifier import grid_cells
    from tests.helpers import ROOT, subprocess_env
    from vdm.core.errors import UserError
    from vdm.core.images import image_grid, png_bytes

    noise = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    grid = image_grid(noise[:10], ncol=4)  # 3 rows of 4: the last two cells blank
    assert np.array_equal(grid_cells(grid, 32), noise[:10])
    with pytest.raises(UserError, match="not a grid of 32x32 sprites"):
        grid_cells(grid[:, :-1], 32)
    processed = tmp_path / "processed"
    processed.mkdir()
    np.save(processed / "train.npy", sprites[:48])
    np.save(processed / "test.npy", sprites[48:72])
    (tmp_path / "grid.png").write_bytes(png_bytes(grid))
    np.save(tmp_path / "noise.npy", noise)
    cmd = [sys.executable, str(ROOT / "benchmarks/classifier.py"), "--n", "8", "--repeats", "1"]
    r = subprocess.run(
        [*cmd, "--processed", str(processed), str(tmp_path / "grid.png"), str(tmp_path / "noise.npy")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and "on 8 a side" in lines[0]
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1]  # the same 8 sprites, the same figures
    assert float(lines[0].split("classifier ")[1].split()[0]) >= 0.9  # noise against sprites
    r = subprocess.run(
        [*cmd, "--processed", str(processed), str(tmp_path / "none.npy")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip().endswith("give a samples.npy file or a grid PNG")
    assert "Traceback" not in r.stderr


def test_the_benchmarks_nudge_moves_the_share_asked_by_one_level_and_refuses_a_bad_share(sprites, tmp_path):
    import subprocess
    import sys

    from benchmarks.classifier import nudge
    from tests.helpers import ROOT, subprocess_env

    moved = nudge(sprites, 0.05, seed=3)
    diff = moved.astype(int) - sprites.astype(int)
    assert moved.dtype == np.uint8 and np.abs(diff).max() == 1
    assert 0.03 < (diff != 0).mean() < 0.06  # 5% asked; clipped at 0 and 255 where a move leaves the range
    assert np.array_equal(moved, nudge(sprites, 0.05, seed=3)) and not np.array_equal(moved, nudge(sprites, 0.05, 4))
    assert np.array_equal(nudge(sprites, 0.0), sprites)
    np.save(tmp_path / "s.npy", sprites)
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/classifier.py"), "--nudge", "2", str(tmp_path / "s.npy")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip().endswith("give a share of subpixels from 0 to 1")
    assert "Traceback" not in r.stderr
