"""Reset-free practice: robots keep their board between episodes; humans reset only when needed."""

import json

import numpy as np
import torch

from selfimprove.config import load_config
from selfimprove.domains import continue_on_board, make_env
from selfimprove.envs.tabletop.world import TabletopEnv
from selfimprove.fleet.local import LocalFleet, seed_stream
from selfimprove.model.checkpoint import load_checkpoint
from selfimprove.pipeline import run_pipeline
from selfimprove.train.sft import sft_checkpoint

from conftest import quick_config


def _by_robot(episodes):
    out = {}
    for e in episodes:
        out.setdefault(e.meta["robot"], []).append(e)
    return out


def test_robots_continue_on_their_board_and_reset_on_schedule(trained_quick):
    model, _ = load_checkpoint(sft_checkpoint(trained_quick))
    fleet = LocalFleet(lambda: make_env(trained_quick, terminate_on_success=False), model.spec, 2,
                       reset_free=True, reset_every=2)
    weights = model.state_dict()
    episodes = fleet.collect(weights, 0, seeds=seed_stream(0), n_episodes=6, generator=torch.Generator())
    episodes += fleet.collect(weights, 1, seeds=seed_stream(100), n_episodes=4, generator=torch.Generator())
    for robot, eps in _by_robot(episodes).items():
        starts = [e.meta["start"] for e in eps]
        assert starts == ["setup"] + ["continued", "reset"] * ((len(eps) - 1) // 2) + ["continued"] * (len(eps) % 2 == 0)
        assert all(e.meta["reset_reason"] == "scheduled" for e in eps if e.meta["start"] == "reset")
        for before, after in zip(eps, eps[1:]):
            if after.meta["start"] == "continued":  # same position and velocity; only the goal is new
                np.testing.assert_array_equal(after.observations["state"][0][:4], before.observations["state"][-1][:4])
                assert not np.array_equal(after.observations["state"][0][4:], before.observations["state"][-1][4:])
            assert after.length <= trained_quick.env.max_episode_steps  # the time limit restarts per episode


def test_tabletop_board_that_became_unusable_needs_a_human():
    env = make_env(load_config("language-table-quick"))
    env.reset(seed=3)
    base = env.unwrapped
    assert isinstance(base, TabletopEnv)
    before = base.block_array().copy()
    obs, info = continue_on_board(env, np.random.default_rng(0))
    np.testing.assert_allclose(info["block_positions"], before)  # nothing moved: same board, new task
    assert obs["instruction"] == base.instruction and not info["is_success"]
    body = base._blocks[0]
    body.position = (10_000.0, 0.0)  # knock a block off the table (pymunk works in millimetres)
    assert continue_on_board(env, np.random.default_rng(0)) == "unusable"


def test_reset_free_run_reports_interventions(trained_quick, tmp_path):
    config = quick_config(tmp_path, "name=rf", f"data.path={trained_quick.dataset_path}", "fleet.reset_free=true",
                          "fleet.reset_every=3", "improve.iterations=2", "improve.eval_every=0",
                          "eval.episodes=10", "fleet.robots=4", "fleet.robots_per_human=2")
    summary = run_pipeline(config, progress=False)
    practice = summary["practice"]
    assert practice["mode"] == "reset-free" and practice["setups"] == 4 and practice["humans"] == 2
    assert practice["interventions"] == practice["intervention_reasons"].get("scheduled", 0) > 0
    assert practice["interventions_per_100_episodes"] == round(100 * practice["interventions"] / practice["episodes"], 2)
    assert practice["episodes_per_human"] == practice["episodes"] / 2
    report = (config.run_dir / "report.md").read_text()
    assert "Practice and human help" in report and "per 100 episodes" in report
    assert json.loads((config.run_dir / "fleet.json").read_text())["backend"] == "local"
