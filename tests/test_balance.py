"""train.decay_balance: from the decay's start each Pokémon drawn alike (vdm.data.splits), and a
held state finished by a balanced decay (vdm.training.branch)."""

import numpy as np
import pytest

from tests.helpers import outs, same_weights, weights
from tests.test_branch import held_state, run_params
from vdm.core.errors import UserError
from vdm.data.splits import StepBatches, balance_weights, train_groups
from vdm.training.branch import branch
from vdm.training.loop import train

# one Pokémon with 30 images, ten with one each
GROUPS = np.array([0] * 30 + list(range(1, 11)))


def test_the_power_moves_a_groups_share_from_its_image_count_to_one_in_as_many_groups():
    for power, big in ((0.0, 30 / 40), (0.5, 30**0.5 / (30**0.5 + 10)), (1.0, 1 / 11)):
        w = balance_weights(GROUPS, power)
        assert w.sum() == pytest.approx(1.0)
        assert w[GROUPS == 0].sum() == pytest.approx(big)
        assert np.allclose(w[GROUPS > 0], w[-1])  # the single images stay alike


def test_batches_are_the_shuffles_until_the_decay_and_balanced_draws_after_it():
    w = balance_weights(GROUPS, 1.0)
    plain = list(StepBatches(40, 8, 3, 0, 600))
    balanced = list(StepBatches(40, 8, 3, 0, 600, weights=w, weighted_from=100))
    assert balanced[:100] == plain[:100]
    drawn = np.concatenate(balanced[100:])
    assert (GROUPS[np.concatenate(plain[100:])] == 0).mean() == pytest.approx(0.75)
    assert (GROUPS[drawn] == 0).mean() == pytest.approx(1 / 11, abs=0.015)  # 4,000 draws: s.e. 0.005
    assert len(set(drawn.tolist())) == 40  # every image still drawn
    # a resumed run sees the same batches; two processes split each global batch between them
    assert list(StepBatches(40, 8, 3, 250, 600, weights=w, weighted_from=100)) == balanced[250:]
    halves = [list(StepBatches(40, 8, 3, 90, 200, r, 2, w, 100)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves, strict=True)] == balanced[90:200]
    # another seed draws other batches
    assert list(StepBatches(40, 8, 4, 100, 200, weights=w, weighted_from=100)) != balanced[100:200]


def test_each_training_image_gets_its_pokemon_from_the_manifest(processed, tmp_path):
    n = len(np.load(processed / "train.npy", mmap_mode="r"))
    groups = train_groups(processed, n)
    assert groups.shape == (n,) and groups.min() == 0 and len(np.unique(groups)) == groups.max() + 1
    assert 1 < len(np.unique(groups)) < n  # the synthetic source draws two variants per species
    with pytest.raises(UserError, match=f"holds {n + 1}"):
        train_groups(processed, n + 1)
    with pytest.raises(UserError, match="manifest.csv not found .train.decay_balance"):
        train_groups(tmp_path, n)
    (tmp_path / "manifest.csv").write_text("file,split\na.png,train\n")
    with pytest.raises(UserError, match="no readable split, index and group columns"):
        train_groups(tmp_path, 1)


def test_a_held_state_finished_by_a_balanced_decay_is_the_uninterrupted_balanced_run(processed, tmp_path):
    state = held_state(processed, tmp_path / "held", 4)  # held runs never balance: it decides no held step
    balanced = run_params(steps=7, decay_steps=3, cosine_decay=True, decay_balance=1.0)
    branch(state, balanced, processed, tmp_path / "branched" / "checkpoints")
    train(balanced, processed, outs(tmp_path / "branched"))
    train(balanced, processed, outs(tmp_path / "whole"))
    assert same_weights(weights(tmp_path / "branched"), weights(tmp_path / "whole"))
    plain = run_params(steps=7, decay_steps=3, cosine_decay=True)
    train(plain, processed, outs(tmp_path / "plain"))
    assert not same_weights(weights(tmp_path / "plain"), weights(tmp_path / "whole"))  # the decay drew others


def test_a_state_inside_its_decay_keeps_its_balance(processed, tmp_path):
    sets = ("--set", "train.cosine_decay=true", "--set", "train.decay_steps=3", "--until", "5")
    state = held_state(processed, tmp_path / "decaying", 7, *sets)
    other = run_params(steps=7, decay_steps=3, cosine_decay=True, decay_balance=1.0)
    with pytest.raises(UserError, match="inside its decay, where train.decay_balance has chosen batches"):
        branch(state, other, processed, tmp_path / "checkpoints")
    assert not (tmp_path / "checkpoints").exists()
