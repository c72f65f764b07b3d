"""Using a trained model outside DVC: the Python API (vdm.app.api), the `vdm` command, the
probability-flow encoding behind interpolation, and the package's pins."""

import json
import math
import os
import re
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import ROOT, subprocess_env, walk
from vdm.app import api
from vdm.core.errors import UserError
from vdm.core.params import SamplingOptions, load_params
from vdm.model.conversions import decode_nearest, encode
from vdm.sampling.samplers import sample, solve


def vdm_cmd(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "vdm", *map(str, args)],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )


# --- the Python API ------------------------------------------------------------------------------


def test_generate_is_seeded_per_sprite_whatever_the_batch(model_dir):
    m = api.load(model_dir)
    a = m.generate(5, seed=3, steps=4)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, m.generate(5, seed=3, steps=4))
    assert not np.array_equal(a, m.generate(5, seed=4, steps=4))
    # each sprite has its own random stream: batch size and count do not change sprite k beyond
    # the rounding of batched convolutions (a level, on a few pixels)
    for other in (m.generate(5, seed=3, steps=4, batch_size=2), np.concatenate([m.generate(2, seed=3, steps=4)] * 3)):
        d = np.abs(a[:2].astype(int) - other[:2])
        assert d.max() <= 1 and (d > 0).mean() < 1e-3
    assert len({s.tobytes() for s in a}) == 5
    imgs = m.images(2, seed=3, steps=4)
    assert imgs[0].size == (32, 32) and np.array_equal(np.asarray(imgs[0]), a[0])


def test_api_defaults_are_the_sample_stage_defaults(model_dir):
    sample_params = yaml.safe_load((ROOT / "params.yaml").read_text())["sample"]
    defaults = SamplingOptions()
    for key, value in defaults.model_dump().items():
        assert sample_params[key] == (list(value) if isinstance(value, tuple) else value), key  # YAML has lists
    assert load_params(ROOT / "params.yaml").sample.options == defaults
    assert api.load(model_dir).options == defaults  # what every API call starts from


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda m: m.generate(0), "at least 1 sprite"),
        (lambda m: m.generate(2, sampler="euler"), "unknown sampler"),
        (lambda m: m.generate(2, steps=0), "steps = 0 is invalid: an integer from 1 to 100000"),
        (lambda m: m.generate(2, temperature=0), "temperature = 0 is invalid: a number above 0 and at most 1"),
        (lambda m: m.generate(2, colours=65), "colours = 65"),
        (lambda m: m.stream(2, colours=True), "colours = True"),
        (lambda m: m.generate(2, temperature=1.5), "temperature = 1.5 is invalid: a number above 0 and at most 1"),
        (lambda m: m.generate(2, seed=2**64), "seed"),
        (lambda m: m.generate(2, seed=-1), "seed"),
        (lambda m: m.encode(np.zeros((2, 8, 8, 3), np.uint8)), "shape (32, 32, 3)"),
        (lambda m: m.interpolate(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8), 1), "frames"),
    ],
)
def test_api_refuses_bad_arguments_with_a_user_error(model_dir, call, words):
    m = api.load(model_dir)
    with pytest.raises(UserError, match=re.escape(words)):
        call(m)


def test_load_refuses_missing_dirs_bad_devices_and_damaged_weights(model_dir, tmp_path):
    with pytest.raises(UserError, match="not found"):
        api.load(tmp_path / "nope")
    for bad in ("cuda:²", "gpu", "cpu "):
        with pytest.raises(UserError, match="not one of"):
            api.load(model_dir, device=bad)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "ema.pt").write_bytes(b"\x80\x04 not a checkpoint")
    with pytest.raises(UserError, match="ema weights"):
        api.load(broken)


# --- probability-flow encoding -------------------------------------------------------------------


def _gaussian_denoiser(mu=0.3, s=0.5):
    def denoise(z, gamma):
        g = gamma.view(-1, *([1] * (z.dim() - 1)))
        a2, s2 = torch.sigmoid(-g), torch.sigmoid(g)
        return mu + a2.sqrt() * s**2 * (z - a2.sqrt() * mu) / (a2 * s**2 + s2)

    return denoise


def test_encode_then_decode_returns_every_level_with_an_exact_denoiser():
    """Data x ~ N(0.3, 0.5^2): the exact denoiser is linear, so the probability-flow ODE is
    invertible and the round trip's only error is the solver's, both ways. DPM-Solver++(2M)
    at 32 steps over gamma 5 .. -8 keeps it under half a level (1/256 in [-1, 1]) for every
    one of 6,000 values; DDIM, first order, needs many more steps (its error halves as steps double)."""
    denoise = _gaussian_denoiser()
    x0 = torch.randint(0, 256, (2000, 3, 1, 1), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    alpha_0 = math.sqrt(float(torch.sigmoid(torch.tensor(8.0))))
    z0 = alpha_0 * encode(x0).double()

    def round_trip(sampler, steps):
        gammas = torch.linspace(5.0, -8.0, steps + 1, dtype=torch.float64)
        z1, _ = solve(denoise, z0, gammas.flip(0), walk(steps, sampler))
        back, _ = solve(denoise, z1, gammas, walk(steps, sampler))
        return (decode_nearest(back / alpha_0).int() - x0.int()).abs().max().item()

    assert round_trip("dpmpp_2m", 32) == 0
    ddim = [round_trip("ddim", n) for n in (32, 64, 128)]
    assert ddim[0] > 0 and all(1.6 < a / b < 2.4 for a, b in zip(ddim, ddim[1:], strict=False)), ddim


def test_model_encode_and_decode_run_the_same_ode_both_ways(model_dir):
    m = api.load(model_dir)
    sprites = m.generate(2, seed=1, steps=3)
    z = m.encode(sprites, steps=6)
    assert z.shape == (2, 3, 32, 32) and torch.isfinite(z).all()
    assert torch.equal(z, m.encode(sprites, steps=6))  # deterministic
    # decoding is sampling from the given latents with the same deterministic sampler
    x, _ = sample(m.model, 2, walk(6, "dpmpp_2m", denoise_last=True), None, "cpu", z=z)
    assert np.array_equal(m.decode(z, steps=6), x.permute(0, 2, 3, 1).numpy())
    frames = m.interpolate(sprites[0], sprites[1], frames=4, steps=6)
    assert frames.shape == (4, 32, 32, 3)
    assert np.array_equal(frames[0], m.decode(z[:1], steps=6)[0])  # the ends are the decoded ends
    assert np.array_equal(frames[-1], m.decode(z[1:], steps=6)[0])


def test_slerp_keeps_the_norm_of_gaussian_latents():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    w = torch.linspace(0, 1, 5)
    s = api.slerp(a, b, w)
    assert torch.allclose(s[0], a, atol=1e-5) and torch.allclose(s[-1], b, atol=1e-5)
    norms = s.flatten(1).norm(dim=1)
    assert float(norms.min()) > 0.97 * min(float(a.norm()), float(b.norm()))
    line = (1 - 0.5) * a + 0.5 * b  # the straight line's midpoint shrinks to ~1/sqrt(2)
    assert float(line.norm()) < 0.8 * float(norms[2])


# --- the command ---------------------------------------------------------------------------------


def test_generate_command_writes_sprites_grid_and_info(model_dir, tmp_path):
    out = tmp_path / "new"
    p = vdm_cmd("generate", "--model", model_dir, "--n", 3, "--seed", 2, "--steps", 3, "--out", out, "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out.iterdir()) == [
        "grid.png",
        "info.json",
        "samples.npy",
        "sprite-0000.png",
        "sprite-0001.png",
        "sprite-0002.png",
    ]
    info = json.loads((out / "info.json").read_text())
    assert info["n"] == 3 and info["seed"] == 2 and info["steps"] == 3 and info["sampler"] == "ancestral"
    from PIL import Image

    expected = api.load(model_dir).generate(3, seed=2, steps=3)
    assert np.array_equal(np.asarray(Image.open(out / "sprite-0001.png")), expected[1])
    assert np.array_equal(np.load(out / "samples.npy"), expected)
    assert "generate: 3/3 steps" in p.stderr  # progress (a bar in a terminal, lines otherwise)
    # --colours: the same sprites, each repainted in at most 2 flat colours
    from vdm.core.images import reduce_colours

    flat = tmp_path / "flat"
    p = vdm_cmd("generate", "--model", model_dir, "--n", 3, "--seed", 2, "--steps", 3, "--out", flat, "--colours", 2)
    assert p.returncode == 0, p.stderr
    assert json.loads((flat / "info.json").read_text())["colours"] == 2 and info["colours"] is None
    assert np.array_equal(np.load(flat / "samples.npy"), reduce_colours(expected, 2))
    # a rerun replaces its own folder; a folder with other files (a DVC output) is refused
    assert vdm_cmd("generate", "--model", model_dir, "--n", 1, "--steps", 2, "--out", out).returncode == 0
    assert len(list(out.glob("sprite-*.png"))) == 1
    (out / "strip.png").write_bytes(b"x")  # as in samples/, the sample stage's output
    p = vdm_cmd("generate", "--model", model_dir, "--n", 1, "--steps", 2, "--out", out)
    assert p.returncode == 2 and "did not write" in p.stderr and (out / "strip.png").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["generate", "--n", "0"], "--n: 0 is not at least 1"),
        (["generate", "--n", "x"], "not a whole number"),
        (["generate", "--colours", "65"], "more than 64"),
        (["generate", "--sampler", "euler"], "invalid choice"),
        (["generate", "--seed", str(2**64)], "outside"),
        (["generate", "--model", "MISSING"], "not found"),
        (["generate", "--device", "cuda:²"], "not one of"),
        (["interpolate", "test:0"], "required"),
        (["interpolate", "nothing.png", "test:0"], "neither an image file"),
        (["frobnicate"], "invalid choice"),
        (["generate", "--n", "1", "--steps", "1", "--out", "/proc/no/such/folder"], "nothing was written"),
        (["interpolate", "test:0", "test:1", "--processed", "MISSING"], "dvc repro preprocess"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(model_dir, tmp_path, args, words):
    args = [a if a != "MISSING" else str(tmp_path / "missing") for a in args]
    if args[0] in ("generate", "interpolate") and "--model" not in args:
        args += ["--model", str(model_dir)]
    p = vdm_cmd(*args, cwd=tmp_path)
    assert p.returncode == 2
    # one line, after any progress lines of work done before the failure
    lines = [line for line in p.stderr.strip().splitlines() if not line.startswith("generate: ")]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_pickled_weights_are_refused_without_running_them(model_dir, tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    (d / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"w": Payload()}, d / "ema.pt")
    p = vdm_cmd("generate", "--model", d, "--out", tmp_path / "o")
    # a note that the file has no checksum (hand-made), then the refusal; nothing unpickled ran
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "ema weights" in p.stderr.strip().splitlines()[-1]
    assert not marker.exists()


def test_interpolate_command_writes_a_strip_of_both_ends_and_the_frames(model_dir, tmp_path):
    from PIL import Image

    sprites = api.load(model_dir).generate(2, seed=5, steps=3)
    for k in range(2):
        Image.fromarray(sprites[k]).save(tmp_path / f"{k}.png")
    out = tmp_path / "strip.png"
    p = vdm_cmd(
        "interpolate", tmp_path / "0.png", tmp_path / "1.png", "--model", model_dir, "--frames", 3, "--steps", 4,
        "--out", out,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    strip = np.asarray(Image.open(out))
    assert strip.shape == (32 + 4, 5 * (32 + 2) + 2, 3)  # A | 3 frames | B, 2 px padding
    assert np.array_equal(strip[2:34, 2:34], sprites[0])


def test_help_explains_every_option():
    for command in ("generate", "interpolate", "serve"):
        p = vdm_cmd(command, "--help")
        assert p.returncode == 0
        options = set(re.findall(r"(--[a-z][a-z-]+)", p.stdout)) - {"--help"}
        assert options, command
        for opt in options:  # every option has a help line of its own
            assert re.search(rf"{opt}( [A-Z_{{][^ ]*)?\s+\S", p.stdout), (command, opt)


# --- bounded work: sizes a user sets -------------------------------------------------------------


def run_main(argv, capsys) -> tuple[int, str]:
    """`vdm ARGV` in this process: (exit code, stderr)."""
    from vdm.app import cli

    capsys.readouterr()
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["generate", "--n", "1000000000"], "--n: 1000000000 is more than 1000000 (the most one run draws"),
        (["generate", "--steps", "100001"], "generate: error: steps = 100001 is invalid: an integer from 1 to 100000"),
        (["generate", "--batch-size", "5000"], "error: batch_size = 5000 is invalid: an integer from 1 to 4096"),
        (["generate", "--temperature", "2"], "generate: error: temperature = 2.0 is invalid: a number above 0 and at"),
        (["generate", "--colour-guidance-interval", "0.9,0.2"], "colour_guidance_interval = (0.9, 0.2) is invalid"),
        (["generate", "--colour-guidance-interval", "0.5"], "'0.5' is not two numbers A,B (e.g. 0.5,1)"),
        (["interpolate", "test:0", "test:1", "--steps", "0"], "interpolate: error: steps = 0 is invalid: an integer"),
        (["serve", "--steps", "100001"], "serve: error: steps = 100001 is invalid: an integer from 1 to 100000"),
        (["interpolate", "test:0", "test:1", "--frames", "65"], "--frames: 65 is more than 64 (one strip"),
        (["interpolate", "test:0", "test:1", "--frames", "1"], "--frames: 1 is not at least 2"),
        (["serve", "--max-count", "100000"], "--max-count: 100000 is more than 256"),
        (["serve", "--max-steps", "5000"], "--max-steps: 5000 is more than 1000"),
        (["serve", "--queue", "1000000"], "--queue: 1000000 is more than 256"),
        (["serve", "--port", "70000"], "--port: 70000 is more than 65535"),
        (["serve", "--timeout", "nan"], "--timeout: nan is not above 0 and at most 3600 seconds"),
        (["serve", "--timeout", "-1"], "--timeout: -1.0 is not above 0"),
        (["serve", "--timeout", "1e9"], "--timeout: 1000000000.0 is not above 0 and at most 3600"),
    ],
)
def test_every_size_a_user_sets_has_an_upper_limit_told_in_one_line(model_dir, tmp_path, capsys, args, words):
    code, err = run_main([*args, "--model", model_dir], capsys)
    assert code == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err, err


def test_the_api_bounds_the_same_sizes(model_dir):
    m = api.load(model_dir)
    a = np.zeros((32, 32, 3), np.uint8)
    for call, words in [
        (lambda: m.generate(api.MAX_SPRITES + 1), "at most 1000000"),
        (lambda: m.stream(2, batch_size=4097), "batch_size = 4097 is invalid: an integer from 1 to 4096"),
        (lambda: m.stream(2, steps=100_001), "steps = 100001 is invalid: an integer from 1 to 100000"),
        (lambda: m.interpolate(a, a, frames=api.MAX_FRAMES + 1), "give 2 (the two ends) to 64"),
    ]:
        with pytest.raises(UserError, match=re.escape(words)):
            call()  # stream checks at the call, before the first batch is asked for


def _fake_disk(monkeypatch, free: int, files: int = 10**9):
    import os
    import shutil

    real_usage, real_statvfs = shutil.disk_usage, os.statvfs
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=free))

    class Stat:  # the file system's figures, but for the count of files it has room for
        def __init__(self, st):
            self.st, self.f_files, self.f_favail = st, files, files

        def __getattr__(self, name):
            return getattr(self.st, name)

    monkeypatch.setattr(os, "statvfs", lambda p: Stat(real_statvfs(p)))


def test_generate_refuses_a_count_the_disk_cannot_hold_before_drawing(model_dir, tmp_path, capsys, monkeypatch):
    """The space for --n sprites (PNGs that do not compress, samples.npy, grid and info) is counted
    up front: one more sprite than fits is refused before any is drawn, as many as fit are drawn."""
    from vdm.app import cli

    drawn = []
    real = api.Sprites.stream
    monkeypatch.setattr(api.Sprites, "stream", lambda self, n, *a, **k: drawn.append(n) or real(self, n, *a, **k))
    per, fixed = cli.generate_bytes(3, 32, os.statvfs(tmp_path).f_frsize)
    assert per >= 2 * 32 * 32 * 3  # a PNG and a row of samples.npy
    _fake_disk(monkeypatch, free=fixed + 3 * per)
    out = tmp_path / "new"
    code, err = run_main(["generate", "--model", model_dir, "--n", 4, "--steps", 1, "--out", out], capsys)
    assert code == 2 and "Traceback" not in err and not drawn
    (line,) = err.strip().splitlines()
    assert "--n 4 needs about" in line and "ask for at most 3 sprites, or free space" in line
    assert sorted(os.listdir(tmp_path)) == []  # nothing written
    code, err = run_main(["generate", "--model", model_dir, "--n", 3, "--steps", 1, "--out", out], capsys)
    assert code == 0 and drawn == [3] and len(list(out.glob("sprite-*.png"))) == 3, err
    written = sum(f.stat().st_size for f in out.iterdir())
    assert written <= fixed + 3 * per  # the estimate bounds what was written


def test_generate_refuses_more_files_than_the_file_system_has_room_for(model_dir, tmp_path, capsys, monkeypatch):
    _fake_disk(monkeypatch, free=10**12, files=100)
    code, err = run_main(["generate", "--model", model_dir, "--n", 97, "--out", tmp_path / "new"], capsys)
    assert code == 2 and "writes 101 files but the file system" in err and "room for 100 more" in err
    assert os.listdir(tmp_path) == []


def test_generate_writes_each_batch_before_drawing_the_next_and_keeps_none(model_dir, tmp_path, capsys, monkeypatch):
    """Memory does not grow with --n: when batch k is drawn, the k batches before it are on disk
    (PNGs in the staged folder, rows of samples.npy) and none of their arrays is alive."""
    import gc
    import weakref

    expected = api.load(model_dir).generate(7, steps=1, batch_size=2)
    real = api.Sprites.stream
    seen, refs = [], []

    def watched(self, *a, **k):
        def batches():
            for batch in real(self, *a, **k):
                gc.collect()
                (staged,) = tmp_path.glob(".new.*.tmp")
                seen.append((len(list(staged.glob("sprite-*.png"))), sum(r() is not None for r in refs)))
                refs.append(weakref.ref(batch))
                yield batch

        return batches()

    monkeypatch.setattr(api.Sprites, "stream", watched)
    out = tmp_path / "new"
    code, err = run_main(
        ["generate", "--model", model_dir, "--n", 7, "--batch-size", 2, "--steps", 1, "--out", out], capsys
    )
    assert code == 0, err
    assert seen == [(0, 0), (2, 0), (4, 0), (6, 0)]  # (sprites on disk, earlier batches alive) at each batch
    assert np.array_equal(np.load(out / "samples.npy"), expected)
    assert "generate: 4/4 steps" in err and "sprites " in err  # progress


def test_generate_stopped_midway_keeps_the_previous_output_and_leaves_nothing_staged(model_dir, tmp_path):
    """SIGTERM (as from `kill` or a job scheduler) while sprites are being written: exit 130, the
    staged folder removed, the previous --out byte for byte as it was."""
    import signal

    out = tmp_path / "new"
    assert vdm_cmd("generate", "--model", model_dir, "--n", 2, "--steps", 1, "--out", out).returncode == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    cmd = [sys.executable, "-m", "vdm", "generate", "--model", model_dir, "--n", 5000, "--batch-size", 1]
    p = subprocess.Popen(
        [*map(str, cmd), "--steps", "1", "--out", str(out)],
        cwd=tmp_path,
        env=subprocess_env() | {"OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while not any(len(list(d.glob("sprite-*.png"))) >= 3 for d in tmp_path.glob(".new.*.tmp")):
        assert p.poll() is None and time.time() - t0 < 120
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["new"]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_interpolate_refuses_a_split_of_another_image_size(model_dir, tmp_path, capsys):
    processed = tmp_path / "processed"
    processed.mkdir()
    np.save(processed / "test.npy", np.zeros((3, 16, 16, 3), np.uint8))
    code, err = run_main(
        [
            "interpolate",
            "test:0",
            "test:1",
            "--model",
            model_dir,
            "--processed",
            processed,
            "--out",
            tmp_path / "s.png",
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1 and "holds 16x16 sprites but the model draws 32x32" in err
    assert not (tmp_path / "s.png").exists()


# --- the package ---------------------------------------------------------------------------------


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name.strip().lower()] = version.strip()
    return out


def test_package_dependencies_are_the_requirements_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = _pins(project["dependencies"])
    reqs = _pins((ROOT / "requirements.txt").read_text().splitlines())
    # run, build or chart the project (matplotlib: the benchmarks' pictures); the package never imports them
    tools = {"dvc", "pytest", "pytest-xdist", "ruff", "setuptools", "matplotlib"}
    assert deps == {k: v for k, v in reqs.items() if k not in tools}
    assert project["scripts"]["vdm"] == "vdm.app.cli:main"


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "vdm"]
    assert ep.value == "vdm.app.cli:main"
