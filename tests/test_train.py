"""The train stage: outputs, determinism, resume equivalence after SIGINT/SIGTERM, the
non-finite guard, bad input, and DDP under torchrun with 2 CPU processes. (SIGKILL at random
points, corrupt checkpoints and leaked secrets: tests/test_reliability.py.)"""

import copy
import json
import math
import signal
import sys

import pytest
import torch

from tests.helpers import (
    BASE_PARAMS,
    LONG,
    ROOT,
    model_params,
    outs,
    project,
    same_weights,
    start,
    tiny,
    wait_for_checkpoint,
    walk,
    weights,
)
from vdm.core.errors import UserError
from vdm.core.params import parse_params, read_yaml
from vdm.sampling.samplers import sample
from vdm.training.loop import train
from vdm.training.step import NonFiniteLoss, build_training, lr_factor


def test_outputs_and_bit_identical_reruns(tmp_path, processed):
    p = parse_params(tiny())
    r1 = train(p, processed, outs(tmp_path / "a"))
    train(p, processed, outs(tmp_path / "b"))
    for base in ("a", "b"):
        assert {f.name for f in (tmp_path / base / "models").iterdir()} == {
            "model.pt",
            "ema.pt",
            "config.json",
            "model.pt.sha256",
            "ema.pt.sha256",
        }
    for name in ("metrics/train.json", "models/model.pt", "models/ema.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert same_weights(weights(tmp_path / "a", "ema.pt"), weights(tmp_path / "b", "ema.pt"))
    assert not same_weights(weights(tmp_path / "a"), weights(tmp_path / "a", "ema.pt"))
    m = json.loads((tmp_path / "a/metrics/train.json").read_text())
    assert (
        m["steps"] == 6
        and m["val_bpd"] > 0
        and m["val_bpd"] == pytest.approx(m["val_diffusion"] + m["val_latent"] + m["val_recon"], rel=1e-6)
    )
    perf = json.loads((tmp_path / "a/metrics/train_perf.json").read_text())
    assert r1["img_per_s"] > 0 and perf["wall_s"] >= 0
    assert perf["fits_s"] >= 0 and perf["final_eval_s"] >= 0  # seconds (no fits here: about 0)
    rows = (tmp_path / "a/plots/train.csv").read_text().splitlines()
    assert rows[0].startswith("step,total,diffusion,latent,recon,gamma_0,gamma_1,lr") and len(rows) == 1 + 3
    assert (tmp_path / "a/plots/val.csv").read_text().count("\n") == 1 + 2  # step 3 and the end
    assert sorted(f.name for f in (tmp_path / "a/plots/samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert not list((tmp_path / "a/checkpoints").glob("*.pt"))  # removed once training completes
    cfg = json.loads((tmp_path / "a/models/config.json").read_text())
    assert cfg["params"]["train"]["lr"] == 0.001 and len(cfg["config_hash"]) == 16


def test_an_ema_decay_of_0_samples_the_raw_weights(tmp_path, processed):
    """params.yaml's default: the EMA copy is the raw weights, bit for bit (the tests' runs average)."""
    assert BASE_PARAMS["train"]["ema_decay"] == 0.999 and read_yaml(ROOT / "params.yaml")["train"]["ema_decay"] == 0
    train(parse_params(tiny(steps=4, eval_every=0, sample_every=0, ema_decay=0)), processed, outs(tmp_path))
    assert same_weights(weights(tmp_path), weights(tmp_path, "ema.pt"))  # at 0.999 they differ (above)


def test_trained_model_loads_with_weights_only(tmp_path, processed):
    from vdm.model.checkpoint import load_model

    train(parse_params(tiny(steps=2, eval_every=0, sample_every=0)), processed, outs(tmp_path))
    model, cfg = load_model(tmp_path / "models")
    x, _ = sample(model, 2, walk(2), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and cfg["steps"] == 2


def test_lr_schedule():
    tp = parse_params(tiny(steps=100, warmup_steps=10, cosine_decay=True, final_lr_fraction=0.1)).train
    f = [lr_factor(s, tp) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert lr_factor(50, tp.model_copy(update={"cosine_decay": False})) == 1.0
    # warm-up, stable, decay: held until the last 30 steps, then the same cosine over those 30
    wsd = [lr_factor(s, tp.model_copy(update={"decay_steps": 30})) for s in range(100)]
    assert wsd[:70] == [*f[:10], *[1.0] * 60] and wsd[70] == 1.0 and wsd[-1] == pytest.approx(0.1, abs=1e-2)
    short = parse_params(tiny(steps=40, warmup_steps=10, cosine_decay=True, final_lr_fraction=0.1)).train
    assert wsd[70:] == pytest.approx([lr_factor(s, short) for s in range(10, 40)])  # the cosine of a 30-step decay
    assert [lr_factor(s, tp.model_copy(update={"decay_steps": 90})) for s in range(100)] == f  # all after warm-up


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, processed, monkeypatch):
    import vdm.training.step as training

    real = training.build_vdm
    calls = {"n": 0}

    def poisoned(*a, **k):
        model = real(*a, **k)

        def hook(module, inputs, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] > 4 else output  # steps 5+ go bad

        model.net.register_forward_hook(hook)
        return model

    monkeypatch.setattr(training, "build_vdm", poisoned)
    p = parse_params(tiny(steps=8, eval_every=0, sample_every=0))
    with pytest.raises(NonFiniteLoss, match=r"step 6 .*total=nan") as e:
        train(p, processed, outs(tmp_path))
    assert "last good checkpoint is kept" in str(e.value)
    (ck,) = (tmp_path / "checkpoints").glob("*.pt")
    assert torch.load(ck, weights_only=True)["step"] == 4
    assert not (tmp_path / "models").exists()


def test_batch_larger_than_the_training_set(tmp_path, processed):
    with pytest.raises(UserError, match="batch_size = 1000 is larger than the training set"):
        train(parse_params(tiny(batch_size=1000)), processed, outs(tmp_path))


def test_missing_processed_data(tmp_path):
    with pytest.raises(UserError, match="dvc repro preprocess"):
        train(parse_params(tiny()), tmp_path / "nothing", outs(tmp_path))


def test_checkpoint_of_another_config_is_left_alone(tmp_path, processed, capsys):
    (tmp_path / "checkpoints").mkdir()
    other = tmp_path / "checkpoints/0123456789abcdef.pt"
    other.write_bytes(b"someone else's run")
    train(parse_params(tiny(steps=2, eval_every=0, sample_every=0)), processed, outs(tmp_path))
    assert "starting fresh (1 checkpoint(s) of other configs left untouched" in capsys.readouterr().err
    assert other.read_bytes() == b"someone else's run"


def test_corrupt_checkpoint_is_a_clear_error_and_is_kept(tmp_path, processed):
    from vdm.model.checkpoint import config_hash

    p = parse_params(tiny())
    (tmp_path / "checkpoints").mkdir()
    ck = tmp_path / "checkpoints" / f"{config_hash(p, processed)}.pt"
    ck.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="cannot be loaded.*left in place"):
        train(p, processed, outs(tmp_path))
    assert ck.read_bytes() == b"PK\x03\x04 truncated"


# --- as a process: signals, DDP ------- ------------------------------------------------


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, processed, uninterrupted, how):
    proj = project(tmp_path, processed, **LONG)
    p = start(proj)
    wait_for_checkpoint(proj, p)
    p.send_signal(how)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "checkpoint saved" in err and "Traceback" not in err, err
    assert list((proj / "checkpoints").glob("*.pt"))
    p = start(proj)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "resuming from" in err
    assert same_weights(weights(proj), weights(uninterrupted))
    assert (proj / "metrics/train.json").read_bytes() == (uninterrupted / "metrics/train.json").read_bytes()


def test_ddp_two_cpu_processes_keep_identical_weights(tmp_path, processed):
    proj = project(tmp_path, processed, steps=4, batch_size=4, eval_every=0, sample_every=2)
    p = start(
        proj, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stages.train"
    )
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "ddp: 2 processes, weights identical across ranks: True" in out
    perf = json.loads((proj / "metrics/train_perf.json").read_text())
    assert perf["processes"] == 2 and perf["steps_this_run"] == 4
    assert (proj / "models/ema.pt").is_file() and len(list((proj / "plots/samples").iterdir())) == 2


def test_the_stage_launches_train_processes_itself_and_trains_what_one_process_does(tmp_path, processed):
    """Two processes train the same global batches, with the same draws, as one: every logged loss
    of the global batch agrees to float rounding (a different draw of times or noise would move it by
    tens of percent). The weights drift apart by more than that: AdamW's first steps move each
    weight by about lr whatever its gradient's size, rounding included."""
    import csv

    runs = {}
    for n in (1, 2):
        # fp32: the claim is about the draws; bf16 would add its own rounding (3 significant digits)
        proj = project(tmp_path / f"p{n}", processed, steps=6, batch_size=4, hflip=True, processes=n, precision="fp32")
        p = start(proj)  # python -m stages.train: no torchrun
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert json.loads((proj / "metrics/train_perf.json").read_text())["processes"] == n
        with open(proj / "plots/train.csv") as f:
            runs[n] = list(csv.DictReader(f))
    assert [r["step"] for r in runs[1]] == [r["step"] for r in runs[2]] == ["2", "4", "6"]
    for one, two in zip(runs[1], runs[2], strict=True):
        for k in ("total", "diffusion", "latent", "recon", "grad_norm"):
            assert float(two[k]) == pytest.approx(float(one[k]), rel=2e-3), (one["step"], k)


def test_a_sharded_batch_has_the_losses_and_gradient_of_the_whole():
    """Under W processes, slice r of a global batch gets row r of the global batch's draws: the
    per-image losses are the whole batch's, and the mean of the slices' gradients is its gradient."""
    from vdm.model.diffusion import build_vdm

    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = build_vdm(model_params(self_condition=True), 16)
    model.train()

    def run(rows: slice, shard: tuple[int, int]):
        model.zero_grad()
        loss = model.loss(x[rows], torch.Generator().manual_seed(3), shard)
        loss.objective.mean().backward()
        return loss.total.detach(), [p.grad.clone() for p in model.parameters()]

    whole, g = run(slice(0, 4), (0, 1))
    first, g0 = run(slice(0, 2), (0, 2))
    second, g1 = run(slice(2, 4), (1, 2))
    assert torch.allclose(torch.cat([first, second]), whole, rtol=1e-5)
    worst = max(float(((b + c) / 2 - a).norm() / a.norm().clamp(min=1e-12)) for a, b, c in zip(g, g0, g1, strict=True))
    assert worst < 1e-3, worst  # float rounding (each conv sums over another batch); a wrong draw: ~1


def test_a_global_batch_that_does_not_split_over_the_processes_is_one_line(tmp_path, processed):
    proj = project(tmp_path, processed, steps=2, batch_size=3, processes=2)
    out, err = start(proj).communicate(timeout=300)
    assert "train.batch_size = 3 is invalid: a multiple of 2: the global batch is split evenly over 2" in err


def test_process_count_and_the_process_group_backend_follow_train_device(monkeypatch):
    from vdm.core import runtime

    assert runtime.process_count(3, "cpu") == 3 and runtime.process_count("auto", "cpu") == 1
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runtime.dist, "init_process_group", backends.append)
    monkeypatch.setattr(runtime.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(runtime.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: True)
    for device in ("cpu", "cuda", "auto"):
        runtime.init_distributed(device)
    assert backends == ["gloo", "nccl", "nccl"]  # a CUDA machine told train.device = cpu trains with gloo


def test_profiler_writes_traces_tables_and_a_breakdown(tmp_path, processed):
    from vdm.training.profiling import PHASES, profile_run

    b = profile_run(parse_params(tiny()), processed, tmp_path, train_steps=2, sample_steps=2)
    for name in ("train_trace.json", "sample_trace.json", "train_top_ops.txt", "sample_top_ops.txt", "breakdown.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "train_trace.json").read_text())["traceEvents"]
    assert set(b["phases_fraction"]) == set(PHASES) and sum(b["phases_fraction"].values()) == pytest.approx(1, abs=0.01)
    assert b["phases_fraction"]["forward"] > 0 and b["phases_fraction"]["backward"] > 0
    assert "Self CPU" in (tmp_path / "train_top_ops.txt").read_text()


def test_gpu_preset_is_valid_and_passed_to_dvc_with_set_params(monkeypatch):
    from scripts.preset import command

    monkeypatch.chdir(ROOT)
    cmd = command("gpu")
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "gpu"]
    sets = dict(a.split("=", 1) for a in cmd[6::2])
    assert sets["model.patch_size"] == "2" and sets["train.compile"] == "true"
    with pytest.raises(UserError, match="no preset"):
        command("tpu")


def test_hflip_mirrors_a_seeded_half_of_the_batch():
    from vdm.data.splits import hflip_half

    batch = torch.arange(64 * 2 * 3 * 3, dtype=torch.int64).reshape(64, 2, 3, 3).to(torch.uint8)
    out = hflip_half(batch, torch.Generator().manual_seed(5))
    again = hflip_half(batch, torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    flipped = [i for i in range(64) if not torch.equal(out[i], batch[i])]
    for i in range(64):
        assert torch.equal(out[i], torch.flip(batch[i], dims=[1]) if i in flipped else batch[i])
    assert 16 <= len(flipped) <= 48 and torch.equal(batch[0, 0, :, 0], torch.arange(0, 9, 3).to(torch.uint8))


def test_hflip_and_gamma_0_fit_in_a_training_run(tmp_path, processed):
    from vdm.model.checkpoint import load_model, save_model
    from vdm.model.checkpoint import save as checkpoint_save

    p = parse_params(tiny(hflip=True, fit_gamma_0=True, fit_eps_scale=True))
    train(p, processed, outs(tmp_path / "a"))
    m = json.loads((tmp_path / "a/metrics/train.json").read_text())
    assert m["gamma_0"] >= m["gamma_0_learned"] and "eps_scale_half_gamma" in m
    assert json.loads((tmp_path / "a/metrics/train_perf.json").read_text())["fits_s"] > 0
    tables = []
    for which in ("ema", "model"):  # both saved weights carry the fitted endpoint and eps scale
        model, _ = load_model(tmp_path / "a/models", which)
        assert model.schedule.gamma_0.item() == pytest.approx(m["gamma_0"], abs=1e-6)
        tables.append(model.eps_scale.clone())
    assert torch.equal(tables[0], tables[1]) and not torch.all(tables[0] == 1.0)
    # a model saved before the eps scale existed loads with none (all ones)
    state = torch.load(tmp_path / "a/models/ema.pt")
    del state["eps_scale"]
    save_model(tmp_path / "old", model, model, json.loads((tmp_path / "a/models/config.json").read_text()))
    checkpoint_save(state, tmp_path / "old/ema.pt")
    assert torch.all(load_model(tmp_path / "old", "ema")[0].eps_scale == 1.0)
    plain = parse_params(tiny())
    train(plain, processed, outs(tmp_path / "b"))  # hflip changes what the network saw
    assert not same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_training_outside_a_terminal_prints_log_lines(tmp_path, processed, capsys):
    train(parse_params(tiny()), processed, outs(tmp_path))
    err = capsys.readouterr().err  # captured: not a terminal, so no bar but plain lines
    last = [line for line in err.splitlines() if line.startswith("train: 6/6 steps")]
    assert len(last) == 1 and "s left, batch_bpd_before_fits " in last[0] and "img_s " in last[0]


def test_likelihood_preset_is_the_papers_objective_and_valid(monkeypatch):
    from scripts.preset import command

    monkeypatch.chdir(ROOT)
    cmd = command("likelihood")  # validates the merged params before anything runs
    sets = dict(a.split("=", 1) for a in cmd[6::2])
    assert sets["model.loss_weighting"] == '"elbo"' and sets["model.prediction"] == '"eps"'
    assert sets["model.fourier_min"] == "6" and sets["model.fourier_max"] == "8"


def test_wandb_runs_of_temporary_experiment_copies_go_to_the_repository(tmp_path):
    from vdm.training.tracking import wandb_root

    repo = tmp_path / "repo"
    assert wandb_root(repo) == repo.resolve()
    assert wandb_root(repo / ".dvc/tmp/exps/tmpab12cd") == repo.resolve()  # dvc exp run --temp
    assert wandb_root(repo / ".dvc/tmp/exps/run/abc123/sub") == repo.resolve()  # a queued experiment
    assert wandb_root(repo / "exps") == (repo / "exps").resolve()


def test_long_preset_holds_its_peak_rate_on_magnitude_preserving_layers_then_decays(monkeypatch):
    from scripts.preset import command
    from vdm.core.params import load_params
    from vdm.training.step import decay_start, lr_factor

    monkeypatch.chdir(ROOT)
    cmd = command("long")  # validates the merged params before anything runs
    sets = dict(a.split("=", 1) for a in cmd[6::2])
    # the default's shape and colour classes, on magnitude-preserving layers
    assert {k for k in sets if k.startswith("model.")} == {"model.magnitude_preserving"}
    train = load_params("params.yaml", "long").train
    assert train.steps * train.batch_size >= 250_000 and train.checkpoint_every <= 500
    # held at the peak (a held probe's state branches into it) until the cosine over its last steps
    start = decay_start(train)
    assert train.cosine_decay and 0 < train.steps - start <= train.steps // 2
    assert lr_factor(start - 1, train) == 1.0
    assert lr_factor(train.steps, train) == pytest.approx(train.final_lr_fraction)


def test_adam_beta2_eps_and_precision_reach_the_optimiser_and_the_model():
    from vdm.core.params import parse_params
    from vdm.training.optim import ClippedAdamW
    from vdm.training.step import build_training

    for clip in (2, 0):
        params = parse_params(tiny(adam_beta2=0.95, adam_eps="1e-12", precision="bf16", update_clip=clip))
        model, ema, opt, _ = build_training(params, torch.device("cpu"))
        assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-12
        assert isinstance(opt, ClippedAdamW) == bool(clip) and getattr(opt, "threshold", 0) == clip
        assert model.net_dtype == ema.module.net_dtype == torch.bfloat16  # the EMA copy samples as trained
    assert opt.defaults["fused"] and not opt.defaults["foreach"]  # plain AdamW: one kernel, on a CPU too


def test_deep_lr_scale_slows_only_the_blocks_at_the_smallest_feature_map():
    from vdm.model.unet import deepest_blocks

    raw = tiny(device="cpu", deep_lr_scale=0.25)
    raw["model"]["attention_resolutions"] = [8]
    params = parse_params(raw)  # 32 px, patch 2, channel_mult [1, 2]: feature maps 16 and 8
    model, _, opt, sched = build_training(params, torch.device("cpu"))
    deep = deepest_blocks(model.net)
    assert {"mid.0", "mid.1", "mid.2"} <= deep and not any(name.startswith("down.0") for name in deep)
    rest, low = opt.param_groups
    assert low["lr"] == pytest.approx(params.train.lr * 0.25 * sched.lr_lambdas[0](0))
    assert rest["lr"] == pytest.approx(4 * low["lr"])
    deep_params = {id(p) for n, p in model.named_parameters() if n.startswith(tuple(f"net.{b}." for b in deep))}
    assert {id(p) for p in low["params"]} == deep_params
    assert len(rest["params"]) + len(low["params"]) == len(list(model.parameters()))
    _, _, opt1, _ = build_training(parse_params(tiny(device="cpu")), torch.device("cpu"))
    assert len(opt1.param_groups) == 1  # 1 (the default): one group


def test_schedule_lr_scale_slows_only_the_learned_schedule():
    params = parse_params(tiny(device="cpu", schedule_lr_scale=0.1, deep_lr_scale=0.5))
    model, _, opt, sched = build_training(params, torch.device("cpu"))
    rest, deep, schedule = opt.param_groups
    factor = sched.lr_lambdas[0](0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([params.train.lr * s * factor for s in (1, 0.5, 0.1)])
    assert {id(p) for p in schedule["params"]} == {id(p) for p in model.schedule.parameters()} != set()
    assert not {id(p) for p in model.schedule.parameters()} & {id(p) for g in (rest, deep) for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_update_clip_steps_as_adamw_until_a_gradient_outgrows_adams_memory():
    """train.update_clip: while each gradient is as large as Adam's second moment expects, the
    step is AdamW's (to float rounding); a gradient 10-1,000x larger, as the deepest blocks' are
    before a held rate diverges, moves the weights by about lr, where AdamW moves them by more."""
    from vdm.training.optim import ClippedAdamW

    torch.manual_seed(0)
    g = torch.randn(40, 40) * 1e-8  # the deep levels' gradient size in bits/dim
    plain = torch.nn.Parameter(torch.randn(40, 40))
    clipped = torch.nn.Parameter(plain.detach().clone())
    a = torch.optim.AdamW([plain], lr=1e-3, weight_decay=0.1, foreach=False)
    b = ClippedAdamW([clipped], lr=1e-3, weight_decay=0.1)
    for _ in range(300):
        plain.grad, clipped.grad = g.clone(), g.clone()
        a.step(), b.step()
    assert torch.allclose(plain, clipped, atol=1e-4, rtol=0) and b.last_clip == pytest.approx(1.0)
    for k in (10, 100, 1000):
        before_a, before_b = plain.detach().clone(), clipped.detach().clone()
        plain.grad, clipped.grad = g * k, g * k
        a.step(), b.step()
        step_a = float((plain.detach() - before_a).square().mean().sqrt()) / 1e-3  # per weight, in units of lr
        step_b = float((clipped.detach() - before_b).square().mean().sqrt()) / 1e-3
        assert step_a > 5 * step_b and step_b < 0.15 and b.last_clip > 6, (k, step_a, step_b)


def test_update_clip_threshold_lets_updates_up_to_it_through_and_divides_the_rest_by_their_excess():
    """train.update_clip = c: a tensor whose update RMS, sqrt(mean(g^2 / v_hat)), is r steps at lr /
    max(1, r / c). One step from Adam's state with v = s^2 and a gradient k s: r = k / sqrt(beta2 +
    (1 - beta2) k^2) after the bias correction, about 1.9 at k = 2 and 5.8 at k = 6 (beta2 = 0.9)."""
    from vdm.training.optim import ClippedAdamW

    def divisor(k: float, threshold: float) -> float:
        w = torch.nn.Parameter(torch.zeros(64))
        opt = ClippedAdamW([w], lr=1e-3, betas=(0.9, 0.9), threshold=threshold)
        for _ in range(200):  # v settles at 1 (its bias correction at 1)
            w.grad = torch.ones(64)
            opt.step()
        w.grad = torch.full((64,), float(k))
        opt.step()
        return opt.last_clip

    r2, r6 = 2 / math.sqrt(0.9 + 0.1 * 4), 6 / math.sqrt(0.9 + 0.1 * 36)
    assert divisor(2, 1.0) == pytest.approx(r2, rel=1e-4) and divisor(6, 1.0) == pytest.approx(r6, rel=1e-4)
    assert divisor(2, 2.0) == 1.0  # under the threshold: AdamW's step
    assert divisor(6, 2.0) == pytest.approx(r6 / 2, rel=1e-4)
    with pytest.raises(ValueError, match="threshold"):
        ClippedAdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, threshold=0)


@pytest.fixture(params=["kernel", "foreach"])
def optimiser_path(request):
    """ClippedAdamW's step through the fused CPU kernel (vdm/model/fused.py) or its foreach ops."""
    from vdm.model import fused

    if request.param == "kernel" and not fused.available():
        pytest.skip("the fused kernels did not build here")
    fused.use(request.param == "kernel")
    yield request.param
    fused.use(True)


def test_update_clip_steps_each_tensor_by_the_formula_whichever_are_clipped(optimiser_path):
    """The step and its rescaling of the clipped tensors agree with the update written out per
    tensor (AdamW with weight decay, two groups at different rates, the rate divided by
    max(1, sqrt(mean(g^2 / v_hat)) / threshold)), over steps where different tensors' gradients jump,
    through the fused kernel and through the foreach ops."""
    from vdm.training.optim import ClippedAdamW

    torch.manual_seed(0)
    shapes = [(40, 40), (64,), (8, 3, 3, 3), (5,)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().clone() for p in ps]
    m, v = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    lrs, b1, b2, eps, wd, threshold = [1e-2, 1e-2, 3e-3, 3e-3], 0.9, 0.99, 1e-8, 0.1, 1.5
    opt = ClippedAdamW(
        [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}],
        lr=1e-2,
        betas=(b1, b2),
        weight_decay=wd,
        threshold=threshold,
    )
    clipped = 0
    for n in range(1, 41):
        largest = 1.0
        scale = [1.0, 20.0 if n % 7 == 3 else 1.0, 1e-8 * (100 if n % 11 == 5 else 1), 50.0 if n > 30 else 1.0]
        grads = [torch.randn(s) * k for s, k in zip(shapes, scale, strict=True)]
        for i, g in enumerate(grads):
            ps[i].grad = g.clone()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**n), v[i] / (1 - b2**n)
            d = max(1.0, float((g * g / v_hat.sqrt().clamp(min=eps).square()).mean().sqrt()) / threshold)
            clipped, largest = clipped + (d > 1), max(largest, d)
            ref[i] = ref[i] * (1 - lrs[i] * wd / d) - lrs[i] / d * m_hat / (v_hat.sqrt() + eps)
        opt.step()
        for p, r in zip(ps, ref, strict=True):
            assert torch.allclose(p.detach(), r, rtol=1e-5, atol=1e-7), n
        assert opt.last_clip == pytest.approx(largest, rel=1e-5)
    assert clipped >= 10  # the rescaling was exercised


def test_the_fused_optimiser_step_is_the_foreach_step_and_the_same_bits_on_any_thread_count(monkeypatch):
    """The kernel's step (chunks of 16,384 summed in order) against the foreach ops' on a tensor
    larger than a chunk, on small ones and on a channels-last conv weight (as training lays them
    out): equal to float rounding; on one thread and on two, equal to the bit. A gradient in another
    layout than its weight's leaves the step to the foreach ops."""
    from vdm.model import fused
    from vdm.training.optim import ClippedAdamW

    if not fused.available():
        pytest.skip("the fused kernels did not build here")
    shapes, ran = [(300, 200), (48,), (16, 3, 3, 3)], []
    kernel_step = fused.clipped_adamw_
    monkeypatch.setattr(fused, "clipped_adamw_", lambda *a: ran.append(kernel_step(*a)) or ran[-1])

    def run(kernel: bool, threads: int, grad_layout=torch.preserve_format):
        before = torch.get_num_threads()
        fused.use(kernel)
        torch.set_num_threads(threads)
        try:
            gen = torch.Generator().manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
            ps[2].data = ps[2].data.contiguous(memory_format=torch.channels_last)
            opt = ClippedAdamW(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, threshold=1.5)
            clips = []
            for n in range(12):
                for i, p in enumerate(ps):
                    g = torch.randn(p.shape, generator=gen) * (30.0 if n == 8 and i == 0 else 1.0)
                    p.grad = torch.empty_like(p, memory_format=grad_layout).copy_(g)
                opt.step()
                clips.append(opt.last_clip)
            return [p.detach().clone() for p in ps], clips
        finally:
            torch.set_num_threads(before)
            fused.use(True)

    (k1, c1), (k2, c2) = run(True, 1), run(True, 2)
    assert ran and all(r is not None for r in ran)  # the kernel took every step
    ran.clear()
    (f, cf), (mixed, cm) = run(False, 2), run(True, 2, torch.contiguous_format)
    assert all(r is None for r in ran[-12:])  # a contiguous gradient of a channels-last weight: foreach
    assert all(torch.equal(a, b) for a, b in zip(k1, k2, strict=True)) and c1 == c2
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(k2, f, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(f, mixed, strict=True)) and cf == cm
    assert c2 == pytest.approx(cf, rel=1e-5) and max(c2) > 1  # the clip acted at step 8


def test_update_clip_reaches_the_training_and_its_state_resumes():
    from vdm.training.optim import ClippedAdamW

    params = parse_params(tiny(device="cpu", update_clip=1.0, weight_decay=0.01))
    model, _, opt, _ = build_training(params, torch.device("cpu"))
    assert isinstance(opt, ClippedAdamW) and opt.param_groups[0]["weight_decay"] == 0.01
    plain = parse_params(tiny(device="cpu", update_clip=0))
    assert isinstance(build_training(plain, torch.device("cpu"))[2], torch.optim.AdamW)
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)

    def step(model, opt, seed):
        gen = torch.Generator().manual_seed(seed)
        opt.zero_grad()
        model(x.permute(0, 3, 1, 2), gen).objective.mean().backward()
        opt.step()

    for s in range(3):
        step(model, opt, s)
    twin, _, twin_opt, _ = build_training(params, torch.device("cpu"))
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint: AdamW's keys
    step(model, opt, 3), step(twin, twin_opt, 3)
    assert same_weights(model.state_dict(), twin.state_dict())
