"""The goal-probability detector (``improve.detector = "goal_probability"``): it fires on the head's
probability that the frame is the goal, ``1 - P(steps-to-go = 0) <= s``, while the reward keeps ``d``."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import practice_episodes, quick_config, quick_tabletop
from selfimprove.config import load_config
from selfimprove.domains import make_env
from selfimprove.errors import ConfigError, RunStateError
from selfimprove.fleet.local import LocalFleet, seed_stream
from selfimprove.model.inputs import from_episodes
from selfimprove.model.policy import EmbodiedModel
from selfimprove.reward import PROBABILITY_GRID, StepsToGoReward, calibrate_threshold
from selfimprove.train.improve import improve
from selfimprove.train.sft import sft_checkpoint


def test_the_fleet_records_d_for_the_reward_and_the_goal_probability_for_the_detector():
    config, spec = quick_tabletop()
    torch.manual_seed(0)
    policy = EmbodiedModel(spec)
    weights = policy.state_dict()

    def collect(detector: str, shared: bool) -> list:
        reward = StepsToGoReward(policy, threshold=-1.0, detector=detector)  # never fires: full episodes
        return practice_episodes(config, spec, reward, weights, shared)

    paper = collect("steps_to_go", True)
    together, apart = collect("goal_probability", True), collect("goal_probability", False)
    for one, a, b in zip(paper, together, apart):
        assert one.detector is None  # the paper's detector reads d itself
        assert np.array_equal(one.actions, a.actions) and np.array_equal(a.actions, b.actions)
        np.testing.assert_allclose(a.stg, one.stg, rtol=1e-5, atol=1e-4)  # the reward's d is unchanged
        np.testing.assert_allclose(a.detector, b.detector, rtol=1e-5, atol=1e-6)
        source, _ = from_episodes([a], spec)
        with torch.no_grad():
            p_goal = torch.softmax(policy.steps_to_go_distribution(source.obs(torch.arange(a.length + 1))), -1)[:, 0]
        np.testing.assert_allclose(a.detector, 1 - p_goal.numpy(), rtol=1e-5, atol=1e-6)


def test_an_ensemble_detector_reads_its_least_sure_member():
    config, spec = quick_tabletop()
    torch.manual_seed(0)
    first, sure = EmbodiedModel(spec), EmbodiedModel(spec)
    with torch.no_grad():  # this member puts most of its mass on "at the goal"
        [m for m in sure.stg_head.modules() if isinstance(m, torch.nn.Linear)][-1].bias[0] += 8.0
    fleet = LocalFleet(lambda: make_env(config), spec, 1, StepsToGoReward(first, -1.0))
    source, _ = from_episodes(fleet.collect(first.state_dict(), 0, seeds=seed_stream(3), n_episodes=1), spec)
    batch = source.obs(torch.arange(len(source.frame_index)))
    lone = StepsToGoReward(first, 0.5, detector="goal_probability").read(batch)[1]
    confident = StepsToGoReward(sure, 0.5, detector="goal_probability").read(batch)[1]
    pair = StepsToGoReward(sure, 0.5, ensemble=[first], detector="goal_probability").read(batch)[1]
    assert confident.max() < lone.min()
    np.testing.assert_allclose(pair, np.maximum(lone, confident), rtol=1e-6)


def test_the_precision_rule_chooses_s_on_the_probability_grid():
    episodes, length = 10, 10
    stg = np.tile(np.arange(length - 1, -1, -1), episodes)
    held_out = {"d": stg.astype(np.float32), "steps_to_go": stg, "goal_frame": stg == 0,
                "episode_start": np.arange(episodes) * length,
                "score": np.where(stg == 0, 0.05, 0.9).astype(np.float32),
                "score_mismatched": np.full(stg.shape, 0.95, dtype=np.float32)}
    choice = calibrate_threshold(held_out, "precision", 0.9, hold=1, detector="goal_probability")
    # fires on every goal frame and nothing else for any s in [0.05, 0.9): the largest on the grid
    assert choice["threshold"] == pytest.approx(PROBABILITY_GRID[PROBABILITY_GRID < 0.9].max())
    assert choice["target_met"] and choice["recall"] == 1.0 and "1 - P(goal)" in choice["rule"]
    paper = calibrate_threshold(held_out, "precision", 0.9, hold=1)  # the same frames read by d
    assert paper["threshold"] == 2.75 and "d <= s" in paper["rule"]  # NEAR_GOAL frames count neither way


def test_goal_probability_config_errors_are_clear():
    with pytest.raises(ConfigError, match="improve.detector"):
        load_config("pointmass-quick", ["improve.detector=probability", "improve.guard=false"])
    with pytest.raises(ConfigError, match="guard=false"):
        load_config("pointmass-quick", ["improve.detector=goal_probability", "improve.guard=true"])
    with pytest.raises(ConfigError, match="1 - P"):
        load_config("pointmass-quick", ["improve.detector=goal_probability", "improve.guard=false",
                                        "improve.success_threshold=3"])
    with pytest.raises(ValueError, match="unknown detector"):
        StepsToGoReward(EmbodiedModel(quick_tabletop()[1]), 0.5, detector="mode")


def test_stage2_calibrates_the_goal_probability_detector_and_diagnose_replays_it(trained_quick, tmp_path):
    from selfimprove.diagnose.run import diagnose

    sft = sft_checkpoint(trained_quick)
    config = quick_config(tmp_path, "name=goalp", f"data.path={trained_quick.dataset_path}", "improve.iterations=1",
                          "improve.eval_every=0", "improve.guard=false", "improve.steps_per_iteration=64",
                          "improve.detector=goal_probability")
    improve(config, sft_path=sft, progress=False)
    detector = json.loads((config.run_dir / "detector.json").read_text())
    assert detector["detector"] == "goal_probability" and 0 < detector["threshold"] < 1
    assert "1 - P(goal)" in detector["rule"]
    from selfimprove.report import write_report

    assert 'improve.detector = "goal_probability"' in write_report(config.name, config.runs_dir).read_text()

    probing = dataclasses.replace(trained_quick, improve=dataclasses.replace(
        trained_quick.improve, detector="goal_probability", guard=False))
    result = diagnose(sft, config=probing, rollouts=4, out=tmp_path / "diagnosis")
    assert result["detector"] == "goal_probability" and 0 < result["recommended_s"] < 1
    assert result["identity"]["settings"]["improve.detector"] == "goal_probability"
    assert result["audit"]["rollouts"]["episodes"] == 4
    thresholds = [r["threshold"] for r in result["rollouts"]["detector_episodes"]]
    assert max(thresholds) < 1  # the detector's tables replay its own score, not d
    with pytest.raises(RunStateError, match="improve.detector"):
        diagnose(sft, config=trained_quick, rollouts=4, out=tmp_path / "diagnosis")  # not the paper detector's folder


def test_diagnose_needs_no_guard_flag_for_settings_the_guard_refuses(trained_quick):
    """The guard never runs in diagnose, so its incompatibilities do not ask for --set improve.guard=false."""
    from selfimprove.diagnose.run import resolve_config

    sft = sft_checkpoint(trained_quick)
    for preset in (None, "pointmass-quick"):  # the run folder's config, or a preset
        config = resolve_config(sft, preset, ["improve.detector=goal_probability"])
        assert config.improve.detector == "goal_probability" and not config.improve.guard
    with pytest.raises(ConfigError, match="guard=false"):  # asked for explicitly: still refused
        resolve_config(sft, "pointmass-quick", ["improve.detector=goal_probability", "improve.guard=true"])


def test_a_ray_robot_host_rebuilds_the_detector_it_was_given():
    pytest.importorskip("ray")
    from selfimprove.fleet.ray import RobotHost, _numpy_weights

    config, spec = quick_tabletop()
    model = EmbodiedModel(spec)
    detector = {"threshold": 0.3, "hold": 3, "spec": spec.to_dict(), "detector": "goal_probability"}
    host = RobotHost(lambda: make_env(config, terminate_on_success=False), spec, 1, 0,
                     [_numpy_weights(model.state_dict())], detector, False, 0)
    rebuilt = host.fleet.reward
    assert rebuilt.detector == "goal_probability" and rebuilt.threshold == 0.3 and rebuilt.hold == 3


def test_the_reachable_detector_reads_d_without_the_never_class_and_the_reward_keeps_d():
    """``improve.detector = "reachable_steps_to_go"``: the verdict leaves out the "never" class's mass,
    the reward's ``d`` still counts it; the config refuses it beside the guard, which scores with d."""
    config, spec = quick_tabletop()
    if not spec.stg_never:
        spec = dataclasses.replace(spec, stg_never=True)
    torch.manual_seed(0)
    policy = EmbodiedModel(spec)
    with torch.no_grad():
        policy.stg_head.bias[-1] += 2.0  # real mass on "never": d and the reachable d part
    reward = StepsToGoReward(policy, threshold=-1.0, detector="reachable_steps_to_go")
    assert reward.separate_score and list(reward.thresholds) == list(StepsToGoReward(policy, 1.0).thresholds)
    episode = practice_episodes(config, spec, reward, policy.state_dict(), True)[0]
    source, _ = from_episodes([episode], spec)
    obs = source.obs(torch.arange(episode.length + 1))
    with torch.no_grad():
        full, reach = policy.expected_steps_to_go(obs), policy.expected_steps_to_go(obs, reachable=True)
    np.testing.assert_allclose(episode.stg, full.numpy(), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(episode.detector, reach.numpy(), rtol=1e-5, atol=1e-3)
    assert float((full - reach).min()) > 1.0
    with pytest.raises(ConfigError, match="reachable_steps_to_go"):
        load_config("language-table-quick", ["improve.detector=reachable_steps_to_go", "improve.guard=true"])
    load_config("language-table-quick", ["improve.detector=reachable_steps_to_go", "improve.guard=false"])
