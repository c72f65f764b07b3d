"""The GPU path: bf16 autocast, torch.compile, fused AdamW, update clipping, resume and DDP over nccl.

Tests marked `cuda` need a CUDA device and are skipped without one; `scripts/gpu_check.py`
runs them first on a GPU machine (`pytest -m cuda`). The others check, on any machine, what
can be checked without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import model_params
from vdm.core.runtime import resolve_precision
from vdm.model.diffusion import build_vdm
from vdm.model.unet import UNet

CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _tiny_unet() -> UNet:
    torch.manual_seed(0)
    net = UNet(
        model_params(
            channels=16, channel_mult=[1], attention_resolutions=[], patch_size=2, fourier_min=1, fourier_max=0
        ),
        16,
    )
    torch.nn.init.normal_(net.out.weight, std=0.1)  # leave the zero start: the output shows the whole net
    return net


def test_auto_precision_is_bf16_on_cuda():
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16


def test_compiled_unet_matches_eager_on_this_cpu():
    """torch.compile with inductor (C++ code generation on a CPU): the same outputs as eager."""
    net = _tiny_unet().eval()
    z, g = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([-3.0, 2.0])
    with torch.no_grad():
        eager, compiled = net(z, g), torch.compile(net)(z, g)
    assert torch.allclose(eager, compiled, atol=1e-4), float((eager - compiled).abs().max())


def _vdm(device):
    torch.manual_seed(0)
    model = build_vdm(model_params(channels=32, channel_mult=[1, 2], attention_resolutions=[8]), 32).to(device)
    torch.nn.init.normal_(model.net.out.weight, std=0.05)
    return model


def _batch(device):
    return torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).to(
        device
    )


@pytest.mark.cuda
@cuda
def test_bf16_loss_is_finite_and_close_to_fp32():
    """The same batch and draws under bf16 autocast and in fp32: the objective agrees to 2%."""
    model, x = _vdm("cuda"), _batch("cuda")
    fp32 = model.loss(x, torch.Generator("cuda").manual_seed(0))
    model.net_dtype = torch.bfloat16
    bf16 = model.loss(x, torch.Generator("cuda").manual_seed(0))
    a, b = float(fp32.objective.mean()), float(bf16.objective.mean())
    assert all(map(torch.isfinite, (bf16.total, bf16.objective))) and abs(a - b) <= 0.02 * abs(a), (a, b)


@pytest.mark.cuda
@cuda
def test_compiled_unet_matches_eager_on_cuda():
    net = _tiny_unet().cuda().eval()
    z, g = torch.randn(2, 3, 16, 16, device="cuda"), torch.tensor([-3.0, 2.0], device="cuda")
    with torch.no_grad():
        assert torch.allclose(net(z, g), torch.compile(net)(z, g), atol=1e-3)


@pytest.mark.cuda
@cuda
def test_fused_adamw_takes_the_same_step_as_foreach():
    models = [_vdm("cuda") for _ in range(2)]
    opts = [
        torch.optim.AdamW(models[0].parameters(), lr=1e-3, fused=True),
        torch.optim.AdamW(models[1].parameters(), lr=1e-3, foreach=True),
    ]
    x = _batch("cuda")
    for model, opt in zip(models, opts, strict=True):
        model.loss(x, torch.Generator("cuda").manual_seed(0)).objective.mean().backward()
        opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.cuda
@cuda
def test_update_clipping_on_cuda_steps_as_on_the_cpu_and_resumes_from_a_cpu_state():
    from vdm.training.optim import ClippedAdamW

    torch.manual_seed(0)
    shapes = [(64, 32, 3, 3), (64,), (128, 64)]
    cpu = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opts = [ClippedAdamW(ps, lr=1e-3, weight_decay=0.1, threshold=1.5) for ps in (cpu, gpu)]
    clips = []
    for step in range(6):
        grads = [torch.randn(s) * (30.0 if step == 4 and i == 1 else 1.0) for i, s in enumerate(shapes)]
        for p, q, g in zip(cpu, gpu, grads, strict=True):
            p.grad, q.grad = g.clone(), g.cuda()
        for opt in opts:
            opt.step()
        if step == 0:  # the CUDA optimiser from the CPU one's state, as a checkpoint hands it over
            opts[1].load_state_dict(opts[0].state_dict())
        assert opts[1].last_clip == pytest.approx(opts[0].last_clip, rel=1e-4)
        clips.append(opts[0].last_clip)
    assert clips[4] > 1  # the 30x gradient was clipped
    for p, q in zip(cpu, gpu, strict=True):
        assert torch.allclose(q.detach().cpu(), p.detach(), atol=1e-5)


@pytest.mark.cuda
@cuda
def test_resume_on_cuda_gives_the_weights_of_an_uninterrupted_run(tmp_path, processed):
    """Deterministic algorithms on: 6 steps straight, against 4 steps, a checkpoint, and 2 more."""
    from tests.helpers import tiny
    from vdm.core.params import parse_params
    from vdm.model import checkpoint as ckpt
    from vdm.training.loop import Outputs, train

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    raw = tiny(steps=6, checkpoint_every=2, eval_every=0, sample_every=0)
    raw["train"]["device"] = "cuda"

    def outs(root):
        return Outputs(root / "models", root / "metrics", root / "plots", root / "checkpoints")

    train(parse_params(raw), processed, outs(tmp_path / "straight"))
    with pytest.MonkeyPatch.context() as mp:  # leave the step-4 checkpoint behind, as a kill after it would
        mp.setattr(ckpt.Checkpoints, "remove", lambda self: None)
        real_save = ckpt.Checkpoints.save
        mp.setattr(ckpt.Checkpoints, "save", lambda self, s: real_save(self, s) if s["step"] <= 4 else None)
        train(parse_params(raw), processed, outs(tmp_path / "resumed"))
    train(parse_params(raw), processed, outs(tmp_path / "resumed"))  # resumes at step 4
    a = torch.load(tmp_path / "straight/models/model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/models/model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.cuda
@cuda
def test_ddp_over_nccl_on_one_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = _vdm("cuda")
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        ddp(_batch("cuda"), torch.Generator("cuda").manual_seed(0)).objective.mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_the_gpu_check_runs_every_phase_in_its_tiny_mode(tmp_path):
    """`scripts/gpu_check.py --tiny`: tests (skipped here), benchmark, train, sample, evaluate,
    and the report folder with its figures and pictures."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    out, work = tmp_path / "check", tmp_path / "work"
    p = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--tiny", "--out", str(out), "--work", str(work)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["tiny"] and report["env"]["cuda"] == CUDA
    assert report["benchmark"]["train_img_s"] > 0 and report["train"]["steps"] == 20
    assert report["eval"]["sample_count"] == 16 and report["eval"]["test_bpd"] > 0
    assert {f.name for f in out.iterdir()} == {"report.json", "grid.png", "strip.png", "loss.png", "check.log"}
    seconds = {"setup", "tests", "benchmark", "data", "train", "sample", "evaluate", "total"}
    assert set(report["plan"]["seconds"]) == seconds
