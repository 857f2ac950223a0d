import gymnasium as gym
import numpy as np

import selfimprove.envs  # noqa: F401
from selfimprove.data.collect import demo_episode
from selfimprove.envs.pointmass import PointMassExpert

from conftest import quick_config


def test_same_seed_same_board_and_success_only_in_info():
    env = gym.make("selfimprove/PointMass-v0")
    a, info = env.reset(seed=5)
    b, _ = env.reset(seed=5)
    assert np.array_equal(a, b) and a.shape == (6,)
    assert "is_success" in info and isinstance(info["is_success"], bool)
    obs, _, _, _, info = env.step(np.array([0.3, -0.2], dtype=np.float32))
    assert env.observation_space.contains(obs)


def test_walls_keep_the_point_in_bounds():
    env = gym.make("selfimprove/PointMass-v0", max_episode_steps=100)
    env.reset(seed=1)
    for _ in range(60):
        obs, *_ = env.step(np.array([1.0, 1.0], dtype=np.float32))
    assert np.all(np.abs(obs[:2]) <= 1.0)


def test_expert_demos_succeed_with_detours(tmp_path):
    config = quick_config(tmp_path)
    lengths = []
    for seed in range(40):
        ep = demo_episode(config, seed)
        assert ep.true_success and ep.info["is_success"][-1]
        lengths.append(ep.length)
    straight = []
    env = gym.make("selfimprove/PointMass-v0", max_episode_steps=100)
    expert = PointMassExpert(n_waypoints=0)
    for seed in range(40):
        env.reset(seed=seed)
        expert.reset(env, np.random.default_rng(seed))
        for t in range(100):
            *_, term, trunc, _ = env.step(expert.act(env))
            if term or trunc:
                break
        straight.append(t + 1)
    # waypoints make demos deliberately sub-optimal: far longer than the direct path
    assert np.mean(lengths) > 3 * np.mean(straight)
