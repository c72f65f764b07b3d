"""A held run finished by a decay: vdm.training.branch and scripts/branch.py."""

import subprocess
import sys

import pytest
import torch
import yaml

from tests.helpers import ROOT, outs, same_weights, subprocess_env, weights
from tests.test_stability import SETS as PROBE_SETS
from tests.test_stability import probe
from vdm.core.errors import UserError
from vdm.core.params import parse_params
from vdm.training.branch import branch
from vdm.training.loop import train
from vdm.training.step import decay_start

# the stability probe's tiny net, held after a one-step warm-up
SETS = [*PROBE_SETS, "train.warmup_steps=1"]


def held_state(processed, out, steps: int, *extra: str):
    probe(processed, out, "--set", "train.warmup_steps=1", "--set", "train.cosine_decay=false", *extra, steps=steps)
    return out / "state.pt"


def run_params(**train):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sweep import apply, parse_row

    _, sets = parse_row(" ".join(["run", *SETS]))
    raw = apply(yaml.safe_load((ROOT / "params.yaml").read_text()), sets)
    sets = {"train.eval_every": 0, "train.sample_every": 0, "train.wandb": "disabled"}
    return parse_params(apply(raw, sets | {f"train.{k}": v for k, v in train.items()}))


def test_a_held_state_finished_by_a_decay_is_the_uninterrupted_run(processed, tmp_path, capsys):
    state = held_state(processed, tmp_path / "held", 4)
    wsd = run_params(steps=7, decay_steps=3, cosine_decay=True)
    assert decay_start(wsd.train) == 4
    path = branch(state, wsd, processed, tmp_path / "branched" / "checkpoints")
    assert path.parent == tmp_path / "branched" / "checkpoints"
    capsys.readouterr()
    train(wsd, processed, outs(tmp_path / "branched"))  # resumes at step 4 and decays
    assert f"train: resuming from {path} at step 4/7" in capsys.readouterr().err
    train(wsd, processed, outs(tmp_path / "whole"))
    for name in ("model.pt", "ema.pt"):
        assert same_weights(weights(tmp_path / "branched", name), weights(tmp_path / "whole", name))
    # the decay mattered: held on for the same 7 steps the weights differ
    held = run_params(steps=7, cosine_decay=False)
    train(held, processed, outs(tmp_path / "held7"))
    assert not same_weights(weights(tmp_path / "held7", "ema.pt"), weights(tmp_path / "whole", "ema.pt"))


def test_a_held_state_finishes_a_run_with_another_average_of_its_weights(processed, tmp_path):
    # the EMA decides no step: held with an average, the run without one (ema.pt = the raw weights)
    state = held_state(processed, tmp_path / "held", 4, "--set", "train.ema_decay=0.999")
    raw = run_params(steps=7, decay_steps=3, cosine_decay=True, ema_decay=0.0)
    branch(state, raw, processed, tmp_path / "branched" / "checkpoints")
    train(raw, processed, outs(tmp_path / "branched"))
    train(raw, processed, outs(tmp_path / "whole"))
    for name in ("model.pt", "ema.pt"):
        assert same_weights(weights(tmp_path / "branched", name), weights(tmp_path / "whole", name))
    assert same_weights(weights(tmp_path / "branched", "ema.pt"), weights(tmp_path / "branched", "model.pt"))


def test_a_decaying_runs_state_finishes_its_own_schedule_with_its_raw_weights(processed, tmp_path):
    # past the decay's start: the same schedule steps the same, only the average (and the fits) differ
    sets = ("--set", "train.cosine_decay=true", "--set", "train.ema_decay=0.999", "--until", "5")
    state = held_state(processed, tmp_path / "decaying", 7, *sets)
    assert torch.load(state, weights_only=False)["step"] == 5
    raw = run_params(steps=7, cosine_decay=True, ema_decay=0.0)
    assert decay_start(raw.train) == 1
    branch(state, raw, processed, tmp_path / "branched" / "checkpoints")
    train(raw, processed, outs(tmp_path / "branched"))
    train(raw, processed, outs(tmp_path / "whole"))
    for name in ("model.pt", "ema.pt"):
        assert same_weights(weights(tmp_path / "branched", name), weights(tmp_path / "whole", name))
    with pytest.raises(UserError, match="decaying rate"):  # another length is another schedule
        branch(state, run_params(steps=8, cosine_decay=True, ema_decay=0.0), processed, tmp_path / "other")


def test_what_cannot_be_branched_is_one_line_and_writes_nothing(processed, tmp_path):
    state = held_state(processed, tmp_path / "held", 4)
    ckpts = tmp_path / "checkpoints"
    cases = [
        (run_params(steps=7, decay_steps=4, cosine_decay=True), "past step 3 where the run's decay starts"),
        (run_params(steps=7, decay_steps=3, cosine_decay=True, lr=0.001), "train.lr = 0.001 (held: 0.002)"),
        (run_params(steps=7, decay_steps=3, cosine_decay=True, hflip=True), "train.hflip = True (held: False)"),
    ]
    for params, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            branch(state, params, processed, ckpts)
    decayed = held_state(processed, tmp_path / "decayed", 4, "--set", "train.cosine_decay=true")
    with pytest.raises(UserError, match="decaying rate"):
        branch(decayed, run_params(steps=7, decay_steps=3, cosine_decay=True), processed, ckpts)
    with pytest.raises(UserError, match="not found"):
        branch(tmp_path / "none.pt", run_params(steps=7, decay_steps=3), processed, ckpts)
    assert not ckpts.exists()
    # a run's own checkpoint is never overwritten
    wsd = run_params(steps=7, decay_steps=3, cosine_decay=True)
    path = branch(state, wsd, processed, ckpts)
    before = path.read_bytes()
    with pytest.raises(UserError, match="exists"):
        branch(state, wsd, processed, ckpts)
    assert path.read_bytes() == before


def test_the_command_names_what_to_run_next_and_refuses_in_one_line(processed, tmp_path):
    state = held_state(processed, tmp_path / "held", 4)
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "wsd.yaml").write_text(
        yaml.safe_dump(run_params(steps=7, decay_steps=3, cosine_decay=True).model_dump(mode="json"))
    )
    cmd = [sys.executable, str(ROOT / "scripts" / "branch.py"), str(state), "--processed", str(processed)]
    run = dict(capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=120)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    bad = subprocess.run(cmd, **run)  # params.yaml's own net is not the held one
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "was held with other settings" in bad.stderr and "model.channels = 48 (held: 16)" in bad.stderr
    assert not (tmp_path / "checkpoints").exists()
    good = subprocess.run([*cmd, "--preset", "wsd"], **run)
    assert good.returncode == 0, good.stderr
    assert "(its decay starts at step 4); now `python scripts/preset.py wsd`" in good.stdout
    assert sorted(p.suffix for p in (tmp_path / "checkpoints").iterdir()) == [".pt", ".sha256"]
    assert torch.load(state, weights_only=False)["step"] == 4  # the state is left as it was
