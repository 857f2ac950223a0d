import numpy as np
import pytest
import torch

from selfimprove.domains import make_env
from selfimprove.fleet.local import DetectorError, LocalFleet, seed_stream
from selfimprove.model.checkpoint import load_checkpoint
from selfimprove.reward import (StepsToGoReward, calibrate_threshold, detector_table, discounted_returns, held_firing,
                                precision_threshold)
from selfimprove.train.improve import reinforce_batch
from selfimprove.train.sft import sft_checkpoint


def test_rewards_telescope_to_d0_minus_dT():
    d = np.random.default_rng(0).uniform(0, 50, size=31).astype(np.float32)
    r = StepsToGoReward.reward(d[:-1], d[1:])
    assert np.isclose(r.sum(), d[0] - d[-1], atol=1e-3)
    # with gamma = 1 the return from t is exactly d_t - d_T
    assert np.allclose(discounted_returns(r, 1.0), d[:-1] - d[-1], atol=1e-3)


def test_discounted_returns_match_the_definition():
    r = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    expected = [sum(0.9 ** (i - t) * r[i] for i in range(t, 4)) for t in range(4)]
    assert np.allclose(discounted_returns(r, 0.9), expected)


def test_detector_table_and_calibration():
    d = np.array([0.1, 0.4, 3.0, 8.0, 0.3, 9.0])
    goal = np.array([True, True, False, False, True, False])
    rows = {r["threshold"]: r for r in detector_table(d, goal, np.array([0.5, 5.0]))}
    assert rows[0.5]["precision"] == 1.0 and rows[0.5]["recall"] == 1.0
    assert rows[5.0]["precision"] == 0.75
    s = calibrate_threshold({"d": d, "goal_frame": goal}, "f1")["threshold"]
    assert 0.4 <= s < 3.0


def test_precision_rule_takes_the_largest_precise_threshold_and_counts_mismatched_firings():
    # one held-out episode of 6 frames: steps to go 5..0 (the last 2 frames at the goal, hold 1)
    stg = np.array([4, 3, 2, 1, 0, 0])
    d = np.array([6.0, 4.0, 2.5, 1.5, 0.5, 0.4])
    episode = np.zeros(6, dtype=int)
    free = precision_threshold(d, stg, episode, target=0.9)
    assert free["target_met"] and free["threshold"] == 3.75  # d = 4.0 (3 steps out) would be a false firing
    # the same frames under a wrong instruction: d there is 1.0 -> every s >= 1 fires on them
    mismatched = precision_threshold(d, stg, episode, target=0.9, d_mismatched=np.full(6, 1.0))
    assert mismatched["threshold"] == 0.75 and mismatched["recall"] == 1.0
    # hold 2: a firing needs d <= s on two consecutive frames, so the first goal frame cannot fire
    held = precision_threshold(d, stg, episode, target=0.9, hold=2, d_mismatched=np.full(6, 1.0))
    assert held["threshold"] == 0.75 and held["recall"] == 0.5


def test_held_firing_needs_consecutive_frames_of_one_episode():
    d = np.array([0.5, 0.5, 9.0, 0.5, 0.5, 0.5])
    episode = np.array([0, 0, 0, 0, 1, 1])
    assert held_firing(d, episode, 1.0, 1).tolist() == [True, True, False, True, True, True]
    assert held_firing(d, episode, 1.0, 2).tolist() == [False, True, False, False, False, True]
    reward = StepsToGoReward(torch.nn.Linear(1, 1), threshold=1.0, hold=3)
    assert not reward.detects([5.0, 0.5, 0.5]) and reward.detects([5.0, 0.5, 0.5, 0.9]) and not reward.detects([0.1])


def test_frozen_reward_model_has_no_gradients(trained_quick):
    model, _ = load_checkpoint(sft_checkpoint(trained_quick))
    reward = StepsToGoReward(model, threshold=2.0)
    assert not any(p.requires_grad for p in reward.model.parameters()) and not reward.model.training


def _fleet(config, threshold):
    model, _ = load_checkpoint(sft_checkpoint(config))
    reward = StepsToGoReward(load_checkpoint(sft_checkpoint(config))[0], threshold)
    fleet = LocalFleet(lambda: make_env(config, terminate_on_success=False), model.spec, 4, reward)
    return model, fleet


def test_detector_terminates_episodes_exactly_when_d_drops_below_s(trained_quick):
    from selfimprove.fleet import BackgroundFleet, Fleet

    threshold = 3.0
    model, fleet = _fleet(trained_quick, threshold)
    assert isinstance(fleet, Fleet) and not isinstance(fleet, BackgroundFleet)  # the contract; no overlap
    episodes = fleet.collect(model.state_dict(), 0, seeds=seed_stream(0), n_episodes=24,
                             generator=torch.Generator().manual_seed(0))
    assert len(episodes) == 24
    ends = {e.meta["ended_by"] for e in episodes}
    assert ends <= {"detector", "timeout"} and "detector" in ends
    for e in episodes:
        assert np.all(e.stg[:-1] > threshold)  # never fired before the end (nor at the start)
        if e.meta["ended_by"] == "detector":
            assert e.stg[-1] <= threshold
        else:
            assert e.length == trained_quick.env.max_episode_steps and e.stg[-1] > threshold
        assert e.meta["policy_version"] == 0


def test_step_budget_finishes_running_episodes_instead_of_cutting_them(trained_quick):
    model, fleet = _fleet(trained_quick, 2.0)
    episodes = fleet.collect(model.state_dict(), 3, seeds=seed_stream(0), n_steps=300,
                             generator=torch.Generator().manual_seed(0))
    total = sum(e.length for e in episodes)
    assert total >= 300
    assert all(e.meta["ended_by"] in ("detector", "timeout") for e in episodes)
    source, acting, tokens, returns = reinforce_batch(episodes, model, 0.9)
    assert acting.shape[0] == tokens.shape[0] == returns.shape[0] == total
    assert source.obs(acting)["state"].shape == (total, 6)


def test_a_detector_that_always_fires_is_reported(trained_quick):
    model, fleet = _fleet(trained_quick, 1e9)
    with pytest.raises(DetectorError, match="lower improve.success_threshold"):
        fleet.collect(model.state_dict(), 0, seeds=seed_stream(0), n_episodes=1)


def test_constant_reward_control_ignores_the_reward_model():
    from selfimprove.data.episode import Episode
    from selfimprove.train.improve import episode_rewards

    ep = Episode(observations={"state": np.zeros((4, 6), np.float32)}, actions=np.zeros((3, 2), np.float32),
                 instruction="", stg=np.array([9.0, 5.0, 7.0, 1.0], np.float32))
    assert episode_rewards(ep).tolist() == [4.0, -2.0, 6.0]
    assert episode_rewards(ep, "constant").tolist() == [1.0, 1.0, 1.0]
    # the true-success control pays 1 on the step that first reaches success, whatever d says
    ep.info = {"is_success": np.array([False, False, True, True])}
    assert episode_rewards(ep, "true_success").tolist() == [0.0, 1.0, 0.0]
    ep.info = {"is_success": np.array([True, False, False, False])}  # a start already solved pays nothing
    assert episode_rewards(ep, "true_success").tolist() == [0.0, 0.0, 0.0]
    # the true-progress control adds the distance covered as a fraction of the start's: its total is
    # the fraction of the way covered plus 1 on success
    ep.info = {"is_success": np.array([False, False, False, True]), "goal_distance": np.array([0.4, 0.3, 0.35, 0.0])}
    assert np.allclose(episode_rewards(ep, "true_progress"), [0.25, -0.125, 1.875])
    ep.info = {"is_success": np.array([False] * 4)}
    with pytest.raises(ValueError, match="needs info\\['goal_distance'\\]"):
        episode_rewards(ep, "true_progress")
    # the detected-success reward pays 1 on the last step of an episode the detector ended, whatever
    # the simulator says, and nothing on an episode that timed out
    ep.meta = {"ended_by": "detector"}
    assert episode_rewards(ep, "detected_success").tolist() == [0.0, 0.0, 1.0]
    ep.meta = {"ended_by": "timeout"}
    assert episode_rewards(ep, "detected_success").tolist() == [0.0, 0.0, 0.0]
    # the learned counterpart of true progress: d's fall as a fraction of d_0, plus 1 where the detector
    # ended the episode (d = 9, 5, 7, 1)
    assert np.allclose(episode_rewards(ep, "steps_to_go_and_success"), [4 / 9, -2 / 9, 6 / 9])
    ep.meta = {"ended_by": "detector"}
    assert np.allclose(episode_rewards(ep, "steps_to_go_and_success"), [4 / 9, -2 / 9, 6 / 9 + 1])


def test_one_conv_pass_serves_policy_and_reward_model_when_they_share_it():
    """A policy practising above the convs (improve.train = "fusion") shares them with its SFT reward
    model: the fleet runs them once per frame, and the episodes are those of two separate passes."""
    from selfimprove.config import load_config
    from selfimprove.domains import model_spec
    from selfimprove.model.policy import EmbodiedModel

    config = load_config("language-table-quick", ["env.max_episode_steps=12"])
    spec = model_spec(config, make_env(config))
    torch.manual_seed(0)
    policy = EmbodiedModel(spec)
    weights = policy.state_dict()

    def collect(shared: bool | None, reward_weights) -> tuple[LocalFleet, list]:
        model = EmbodiedModel(spec)
        model.load_state_dict(reward_weights)
        fleet = LocalFleet(lambda: make_env(config, terminate_on_success=False), spec, 3,
                           StepsToGoReward(model, threshold=-1.0))
        fleet.set_weights(weights, 0)
        if shared is not None:
            fleet.shared = shared
        episodes = fleet.collect(weights, 0, seeds=seed_stream(5), n_episodes=4,
                                 generator=torch.Generator().manual_seed(1))
        return fleet, sorted(episodes, key=lambda e: e.meta["seed"])

    fleet, together = collect(None, weights)
    assert fleet.shared
    _, apart = collect(False, weights)
    for a, b in zip(together, apart):
        assert np.array_equal(a.actions, b.actions)
        assert a.fused.shape[0] == a.length + 1 and b.fused is None  # the learner reuses them
        np.testing.assert_allclose(a.stg, b.stg, rtol=1e-5, atol=1e-4)
    other = {k: v + 0.01 if k.startswith("encoder.convs.") else v for k, v in weights.items()}
    fleet, _ = collect(None, other)
    assert not fleet.shared  # different convs: each model runs its own
