"""Several attempts at the same start board with a leave-one-out baseline, and the adaptive KL anchor."""

import itertools
import json

import numpy as np
import pytest

from selfimprove.config import load_config
from selfimprove.data.episode import Episode
from selfimprove.data.store import EpisodeStore
from selfimprove.errors import ConfigError
from selfimprove.train.improve import (episode_weights, episodes_dir, group_advantages, grouped, improve,
                                      practice_board_base, practice_seeds)
from selfimprove.train.objectives import adapt_kl_coef
from selfimprove.train.sft import sft_checkpoint

from conftest import quick_config


def attempt(seed: int, success_at: int | None, length: int = 4) -> Episode:
    flags = np.zeros(length + 1, dtype=bool)
    if success_at is not None:
        flags[success_at] = True
    return Episode(observations={"state": np.zeros((length + 1, 6), np.float32)},
                   actions=np.zeros((length, 2), np.float32), instruction="reach", true_success=bool(flags.any()),
                   meta={"seed": seed}, info={"is_success": flags})


def test_leave_one_out_advantages_rank_attempts_at_the_same_board_and_drop_boards_that_teach_nothing():
    episodes = [attempt(1, 3), attempt(1, None), attempt(2, None), attempt(1, None), attempt(2, None),
                attempt(3, 2), attempt(3, 4), attempt(4, 1)]
    kept, adv = group_advantages(episodes, reward="true_success")
    # board 1: one success in three attempts; board 2: all failed; board 3: both succeeded; board 4: alone
    assert kept == [0, 1, 3]
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5])
    # the learned reward: attempts from one board share d(o_0), so the one that ended nearer the goal wins
    near, far = attempt(5, None), attempt(5, None)
    near.stg, far.stg = np.array([9.0, 7, 5, 3, 1]), np.array([9.0, 8, 9, 8, 7])
    kept, adv = group_advantages([near, far])
    assert kept == [0, 1] and adv.tolist() == pytest.approx([6.0, -6.0])


def test_episode_weighting_balances_a_long_failure_against_short_successes():
    lengths = np.array([50, 50, 50, 200])
    adv = np.array([0.25, 0.25, 0.25, -0.75])
    per_frame = np.repeat(adv * episode_weights(lengths, "frame"), lengths)
    assert per_frame.sum() < -100  # the failure's 200 frames dominate: mostly "push the taken actions down"
    balanced = adv * episode_weights(lengths, "episode") * lengths
    assert balanced.sum() == pytest.approx(0.0, abs=1e-4)  # each attempt weighs one episode: the board sums to 0
    with pytest.raises(ConfigError, match="group_weighting"):
        load_config("pointmass-quick", ["improve.group_weighting=step"])


def test_attempts_come_in_groups_of_the_same_seed():
    stream = grouped(iter([10, 11]), 3)
    assert list(stream) == [10, 10, 10, 11, 11, 11]


def test_practice_on_fixed_boards_cycles_over_them_and_fresh_practice_never_repeats():
    base = practice_board_base(0)
    fixed = [list(itertools.islice(practice_seeds(0, it, boards=10), 12)) for it in range(3)]
    assert all(set(f) <= set(range(base, base + 10)) for f in fixed) and fixed[1][0] == base + 7
    fresh = [set(itertools.islice(practice_seeds(0, it), 500)) for it in range(3)]
    assert not (fresh[0] & fresh[1]) and not (fresh[1] & fresh[2]) and min(fresh[0]) == base


def test_the_adaptive_kl_coefficient_follows_its_target():
    assert adapt_kl_coef(0.1, 0.5, 0.1) == pytest.approx(0.2)
    assert adapt_kl_coef(0.1, 0.01, 0.1) == pytest.approx(0.05)
    assert adapt_kl_coef(0.1, 0.1, 0.1) == 0.1 and adapt_kl_coef(0.1, 0.5, 0.0) == 0.1
    assert adapt_kl_coef(0.1, None, 0.1) == 0.1


def test_group_settings_are_checked():
    with pytest.raises(ConfigError, match="advantage = 'group' and improve.group_size > 1 go together"):
        load_config("pointmass-quick", ["improve.advantage=group"])
    with pytest.raises(ConfigError, match="needs episodic practice"):
        load_config("pointmass-quick", ["improve.advantage=group", "improve.group_size=4", "fleet.reset_free=true"])
    with pytest.raises(ConfigError, match="kl_target"):
        load_config("pointmass-quick", ["improve.kl_target=0.01"])


def test_group_practice_learns_on_the_real_loop_and_resumes_its_kl_coefficient(trained_quick, tmp_path):
    def run(iterations):
        config = quick_config(tmp_path, "name=group", f"data.path={trained_quick.dataset_path}",
                              f"improve.iterations={iterations}", "improve.eval_every=0", "improve.guard=false",
                              "improve.advantage=group", "improve.group_size=4", "improve.objective=ppo",
                              "improve.kl_coef=0.1", "improve.kl_target=0.001")
        improve(config, sft_checkpoint(trained_quick), resume=iterations > 2, progress=False)
        lines = (config.run_dir / "metrics.jsonl").read_text().splitlines()
        return config, [r for r in map(json.loads, lines) if r.get("stage") == "improve" and r["iteration"] >= 1]

    config, history = run(2)
    config, history = run(3)
    assert len(history) == 3 and all(r["group_kept_episodes"] <= r["batch_episodes"] for r in history)
    assert any(r["updates"] > 0 for r in history)
    coefs = [r["kl_coef"] for r in history]
    assert coefs[0] == 0.1 and all(b in (a * 2, a / 2, a) for a, b in zip(coefs, coefs[1:]))
    store = EpisodeStore(episodes_dir(config))
    seeds = [store.episode_meta(i)["seed"] for i in range(store.num_episodes)]
    counts = np.unique(seeds, return_counts=True)[1]
    assert counts.max() <= 4 and np.mean(counts == 4) > 0.5  # attempts come four to a board
