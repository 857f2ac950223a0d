"""Make a small LeRobot v3 dataset of scripted demos for the reach task (docs/tutorial.md).

It stands in for demonstrations you recorded with LeRobot: the arm's joints go to
``observation.state``, the target to ``observation.environment_state``, the joint-velocity command to
``action`` and the instruction to the episode's task. The demonstrator is slow on purpose: it turns
the shoulder first and the elbow after (10.4 steps per demo on average; turning both at once takes
6.8 on the same 600 boards), so Self-Improvement has something to find.

    python docs/examples/reach_task/make_demos.py --out data/reach_lerobot --episodes 600
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np

import reach_env  # registers ReachTask/Reach-v0 (this file's folder is on sys.path when run as a script)
import selfimprove
from selfimprove.data.episode import Episode
from selfimprove.data.store import EpisodeWriter


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def joint_goal(q: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Inverse kinematics: the joint angles that put the fingertip on ``target`` (the nearer of two)."""
    l1, l2 = reach_env.LINKS
    cos_elbow = np.clip((target @ target - l1**2 - l2**2) / (2 * l1 * l2), -1.0, 1.0)
    options = []
    for elbow in (math.acos(cos_elbow), -math.acos(cos_elbow)):
        shoulder = math.atan2(target[1], target[0]) - math.atan2(l2 * math.sin(elbow), l1 + l2 * math.cos(elbow))
        options.append(np.array([shoulder, elbow]))
    return min(options, key=lambda goal: np.abs(_wrap(goal - q)).sum())


def expert_action(env: gym.Env, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """Shoulder first, then elbow: a slow but reliable demonstrator."""
    base = env.unwrapped
    delta = _wrap(joint_goal(base.q, base.target) - base.q) / base.max_speed
    action = np.array([delta[0], 0.0]) if abs(delta[0]) > 0.1 else np.array([0.0, delta[1]])
    return np.clip(action + rng.normal(0.0, noise, size=2), -1.0, 1.0).astype(np.float32)


def demo(env: gym.Env, seed: int) -> Episode | None:
    """One demo that ends on the first frame where the target is reached (None if it never is)."""
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    frames, actions = [obs], []
    while not info["is_success"]:
        action = expert_action(env, rng)
        obs, _, terminated, truncated, info = env.step(action)
        frames.append(obs)
        actions.append(action)
        if (terminated or truncated) and not info["is_success"]:
            return None
    return Episode(observations={k: np.stack([f[k] for f in frames]) for k in ("arm", "target")},
                   actions=np.stack(actions), instruction=frames[0]["instruction"], true_success=True,
                   meta={"seed": seed})


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new LeRobot dataset folder")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    env = gym.make(reach_env.ENV_ID)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        with EpisodeWriter(store, fps=10, robot_type="two_link_arm") as writer:
            seed = args.seed * 100_000  # boards never used by evaluation (eval.seed = 1_000_000 and up)
            while writer.total_episodes < args.episodes:
                episode = demo(env, seed)
                seed += 1
                if episode is not None:
                    writer.add(episode)
        out = selfimprove.export_lerobot(store, args.out, overrides=["observation.state=arm",
                                                                     "observation.environment_state=target"])
    print(f"wrote {args.episodes} demos to {out}")
    return out


if __name__ == "__main__":
    main()
