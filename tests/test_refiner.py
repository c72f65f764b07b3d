"""The low-noise expert: the walk's steps below the refiner's range top use the refiner, the rest
the main model; a benchmark-trained refiner is a model folder like any other."""

import torch

from tests.helpers import bare_vdm, walk
from vdm.model.schedules import make_schedule
from vdm.sampling.samplers import refined_denoiser, sample, vdm_denoiser


class Constant(torch.nn.Module):
    """A net whose eps estimate is a constant: x_hat tells which model answered."""

    def __init__(self, value: float, image_size: int = 8):
        super().__init__()
        self.value, self.image_size = value, image_size
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, gamma):
        return torch.full_like(z, self.value) + self.w


def test_the_refiner_answers_below_its_range_top_and_the_main_model_above():
    main = bare_vdm(Constant(0.0), make_schedule("fixed_linear", -13.3, 5.0)).eval()
    refiner = bare_vdm(Constant(1.0), make_schedule("fixed_linear", -11.0, -2.0)).eval()
    denoise = refined_denoiser(vdm_denoiser(main, False), refiner, False)
    z = torch.zeros(2, 3, 8, 8)
    for gamma, who in ((4.0, main), (-1.9, main), (-2.1, refiner), (-8.0, refiner)):
        g = torch.full((2,), gamma)
        assert torch.equal(denoise(z, g), who.x_hat(z, g))
    assert refined_denoiser(denoise, None, False) is denoise  # no refiner: the denoiser itself


def test_a_walk_with_a_refiner_calls_it_only_for_its_range():
    calls = {"main": [], "refiner": []}

    class Recording(Constant):
        def __init__(self, name):
            super().__init__(0.0)
            self.name = name

        def forward(self, z, gamma):
            calls[self.name].append(float(gamma[0]))
            return super().forward(z, gamma)

    main = bare_vdm(Recording("main"), make_schedule("fixed_linear", -10.0, 6.0)).eval()
    refiner = bare_vdm(Recording("refiner"), make_schedule("fixed_linear", -11.0, -2.0)).eval()
    gen = torch.Generator().manual_seed(0)
    x, _ = sample(main, 2, walk(16, denoise_last=True), gen, refiner=refiner)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.uint8
    assert calls["main"] and min(calls["main"]) >= -2.0  # 16 steps of 1: 6, 5, ..., -2 by the main model
    assert calls["refiner"] and max(calls["refiner"]) < -2.0 and min(calls["refiner"]) == -10.0  # and the end
    assert len(calls["main"]) + len(calls["refiner"]) == 17  # every step once, and the final x_hat


def test_the_benchmark_trains_a_refiner_on_its_range_and_scores_walks_with_it(processed, tmp_path):
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT
    from vdm.model.checkpoint import load_model

    script = str(ROOT / "benchmarks" / "refiner.py")
    tiny = ["data.image_size=32", "train.batch_size=8", "train.device=cpu", "train.precision=fp32"]
    cmd = [sys.executable, script, "train", "--name", "r", "--steps", "3", "--processed", str(processed)]
    cmd += ["--out", str(tmp_path), *[a for s in tiny for a in ("--set", s)]]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    refiner, config = load_model(tmp_path / "r" / "models")
    assert float(refiner.schedule.gamma_0) == -11.0 and float(refiner.schedule.gamma_1) == -2.0  # fixed
    assert config["params"]["model"]["prediction"] == "eps" and config["steps"] == 3
    # the refiner itself stands in as the main model here: the walk and the scoring run end to end
    cmd = [sys.executable, script, "score", "--models", str(tmp_path / "r" / "models"), "--count", "4"]
    cmd += ["--refiner", str(tmp_path / "r" / "models"), "--rows", "ancestral+refiner"]
    cmd += ["--processed", str(processed), "--out", str(tmp_path / "score"), "--set", "evaluate.c2st_repeats=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads((tmp_path / "score" / "ancestral+refiner.json").read_text())
    assert row["key"]["refiner"] and row["key"]["count"] == 4 and row["parts"] >= 0 and row["c2st"] is None
    assert "| ancestral+refiner |" in out.stdout and "rms refiner" in out.stdout
