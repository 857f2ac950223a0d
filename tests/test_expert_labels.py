"""``data.expert_labels = "intended"``: the expert's noise and detours move the board, the labels are
what it meant (DART-style recovery data), and the executed actions stay in the store."""

import json

import numpy as np
import pytest

from selfimprove.config import load_config
from selfimprove.data.collect import collect_demos, demo_episode
from selfimprove.data.store import EpisodeStore
from selfimprove.envs.tabletop.expert import MAX_STEP
from selfimprove.errors import ConfigError


def test_intended_labels_leave_the_board_as_the_executed_demo_left_it():
    executed_cfg = load_config("language-table-quick", ["data.hold_steps=3", "data.expert_labels=executed"])
    intended_cfg = load_config("language-table-quick", ["data.hold_steps=3", "data.expert_labels=intended"])
    changed = steps = 0
    for seed in (1, 2, 3):
        plain, clean = demo_episode(executed_cfg, seed), demo_episode(intended_cfg, seed)
        assert clean.true_success and clean.length == plain.length
        for key in plain.observations:  # the same board, frame by frame: only the labels differ
            np.testing.assert_array_equal(plain.observations[key], clean.observations[key])
        sent = clean.info["executed_action"]
        assert sent.shape == (clean.length + 1, 2) and not sent[-1].any()
        np.testing.assert_array_equal(sent[:-1], plain.actions)
        assert np.linalg.norm(clean.actions, axis=1).max() <= MAX_STEP + 1e-6
        np.testing.assert_array_equal(clean.actions[-3:], 0)  # the hold: the same still labels
        changed += int(np.any(clean.actions != plain.actions, axis=1).sum())
        steps += clean.length
    assert changed > steps / 2  # the expert's noise is on (almost) every step, and only in the sent action


def test_a_store_of_intended_labels_says_so_and_trains_on_them(tmp_path):
    config = load_config("language-table-quick", ["data.expert_labels=intended", "data.collect_workers=1"])
    out = collect_demos(config, out=tmp_path / "demos", episodes=3, progress=False)
    assert json.loads((out / "meta" / "info.json").read_text())["expert_labels"] == "intended"
    store = EpisodeStore(out)
    first = demo_episode(config, int(store.episode_meta(0)["seed"]))
    np.testing.assert_array_equal(store.episodes([0])[0].actions, first.actions)  # the labels SFT reads


def test_intended_labels_are_refused_where_the_expert_has_none(tmp_path):
    config = load_config("pointmass-quick", ["data.expert_labels=intended"])
    with pytest.raises(ConfigError, match="expert_labels"):
        collect_demos(config, out=tmp_path / "demos", episodes=2, progress=False)
    assert not (tmp_path / "demos").exists()
    with pytest.raises(ConfigError, match="expert_labels"):
        load_config("language-table-quick", ["data.expert_labels=clean"])


def test_an_expert_without_hysteresis_labels_each_state_alone_and_still_solves_boards():
    """``data.expert_hysteresis = false``: whether the expert pushes is decided by the state, not by what
    it did before, so the same state gets the same intended label whatever came before it."""
    from selfimprove.domains import expert_for, make_env

    def labels_that_depend_on_the_past(config) -> int:
        """States of a few demo rollouts whose intended label changes with the expert's remembered mode."""
        env, expert, differ = make_env(config, terminate_on_success=False), expert_for(config), 0
        for seed in (1, 2, 3):
            env.reset(seed=seed)
            expert.reset(env, np.random.default_rng(seed))
            for _ in range(60):
                mode, got = expert._pushing, []
                for remembered in (False, True):  # the same state, the expert told it was doing either
                    expert._pushing = remembered
                    expert.act(env)
                    got.append(expert.intended.copy())
                differ += int(not np.array_equal(got[0], got[1]))
                expert._pushing = mode
                env.step(expert.act(env))
        env.close()
        return differ

    stateless = load_config("language-table-quick", ["data.expert_hysteresis=false", "data.expert_labels=intended"])
    assert not expert_for(stateless).hysteresis
    assert sum(demo_episode(stateless, seed).true_success for seed in range(1, 11)) >= 9
    assert labels_that_depend_on_the_past(stateless) == 0
    assert labels_that_depend_on_the_past(load_config("language-table-quick", ["data.expert_labels=intended"])) > 0
