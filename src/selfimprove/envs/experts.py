"""Scripted demonstrators that make the Stage-1 datasets.

Every expert has the interface ``reset(env, rng)`` then ``act(env) -> action``; it may read
privileged simulator state from ``env.unwrapped`` (a demonstrator is allowed to, a policy is not).
"""

from __future__ import annotations

from typing import Protocol

import gymnasium as gym
import numpy as np


class Expert(Protocol):
    def reset(self, env: gym.Env, rng: np.random.Generator) -> None: ...

    def act(self, env: gym.Env) -> np.ndarray: ...


class PointMassExpert:
    """PD controller that first visits ``n_waypoints`` random waypoints, then the goal.

    The detours make the demos deliberately sub-optimal, as in the paper's notebook, so that
    Self-Improvement has room to find the short path.
    """

    def __init__(self, n_waypoints: int = 5, kp: float = 4.0, kd: float = 1.2, reach_radius: float = 0.15,
                 waypoint_low: float = -0.9, waypoint_high: float = 0.9) -> None:
        self.n_waypoints = n_waypoints
        self.kp, self.kd = kp, kd
        self.reach_radius = reach_radius
        self.low, self.high = waypoint_low, waypoint_high
        self._targets: list[np.ndarray] = []

    def reset(self, env: gym.Env, rng: np.random.Generator) -> None:
        base = env.unwrapped
        self._targets = [rng.uniform(self.low, self.high, size=2) for _ in range(self.n_waypoints)]
        self._targets.append(base.goal)

    def act(self, env: gym.Env) -> np.ndarray:
        base = env.unwrapped
        pos, vel = base.position, base.velocity
        while len(self._targets) > 1 and np.linalg.norm(self._targets[0] - pos) < self.reach_radius:
            self._targets.pop(0)
        accel = self.kp * (self._targets[0] - pos) - self.kd * vel * self.kp ** 0.5
        return np.clip(accel / base.accel, -1.0, 1.0).astype(np.float32)


def make_expert(env_id: str, **kwargs) -> Expert:
    """The scripted demonstrator for a registered environment id."""
    if "PointMass" in env_id:
        return PointMassExpert(**kwargs)
    if "Tabletop" in env_id:
        from selfimprove.envs.tabletop.expert import TabletopExpert

        return TabletopExpert(**kwargs)
    raise ValueError(f"no scripted expert for environment {env_id!r}")
