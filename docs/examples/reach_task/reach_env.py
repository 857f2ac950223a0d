"""A task selfimprove has never seen: a planar two-link arm must bring its fingertip to a target.

Importing this module registers the gymnasium id ``ReachTask/Reach-v0``; a selfimprove config names
the module in ``env.module`` so that it is imported before ``gymnasium.make``.

What selfimprove needs from an env, and nothing more:
- a ``Box`` action space with finite bounds (actions are discretised into bins between them);
- observations as a vector, or as a dict of vectors, camera frames (``rgb``) and an ``instruction``;
- ``info["is_success"]``: the simulator's success, read by evaluation and diagnostics only;
- optionally ``new_task(rng)``, ``board_usable()`` and ``observe()`` for reset-free practice.
"""

from __future__ import annotations

import math
import string
from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "ReachTask/Reach-v0"
INSTRUCTION = "reach the target"
LINKS = (0.5, 0.4)  # upper arm and forearm lengths (m)


def fingertip(q: np.ndarray) -> np.ndarray:
    """Forward kinematics: joint angles [shoulder, elbow] -> fingertip position (x, y)."""
    elbow = LINKS[0] * np.array([math.cos(q[0]), math.sin(q[0])])
    return elbow + LINKS[1] * np.array([math.cos(q[0] + q[1]), math.sin(q[0] + q[1])])


class ReachEnv(gym.Env):
    """Two joints driven by velocity commands; the target is drawn anywhere the fingertip can reach."""

    metadata = {"render_modes": []}

    def __init__(self, max_speed: float = 0.25, success_radius: float = 0.08) -> None:
        self.max_speed = float(max_speed)  # joint rotation (rad) per step at action +-1
        self.success_radius = float(success_radius)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.observation_space = gym.spaces.Dict({
            "arm": gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32),  # cos/sin of both joints
            "target": gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32),
            "instruction": gym.spaces.Text(64, charset=string.ascii_lowercase + " "),
        })
        self.q = np.zeros(2)
        self.target = np.zeros(2)

    # -- the gymnasium API ---------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.q = self.np_random.uniform(-math.pi, math.pi, size=2)
        self._draw_target(self.np_random)
        return self._obs(), self._info()

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        self.q = (self.q + self.max_speed * a + math.pi) % (2 * math.pi) - math.pi
        # never terminates by itself: selfimprove ends episodes (evaluation: on is_success;
        # Self-Improvement: when the learned success detector fires, or at the time limit)
        return self._obs(), 0.0, False, False, self._info()

    # -- reset-free practice (optional) --------------------------------------------------------
    def new_task(self, rng: np.random.Generator) -> str:
        """A new target from where the arm is now; returns the instruction (None: no valid task)."""
        self._draw_target(rng)
        return INSTRUCTION

    def board_usable(self) -> bool:
        return True  # nothing can fall off the table

    def observe(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self._obs(), self._info()

    # -- helpers -------------------------------------------------------------------------------
    def _draw_target(self, rng: np.random.Generator) -> None:
        while True:
            radius, angle = rng.uniform(0.2, 0.85), rng.uniform(-math.pi, math.pi)
            self.target = radius * np.array([math.cos(angle), math.sin(angle)])
            if np.linalg.norm(fingertip(self.q) - self.target) > 2 * self.success_radius:
                return

    def _obs(self) -> dict[str, Any]:
        arm = np.array([math.cos(self.q[0]), math.sin(self.q[0]), math.cos(self.q[1]), math.sin(self.q[1])])
        return {"arm": arm.astype(np.float32), "target": self.target.astype(np.float32), "instruction": INSTRUCTION}

    def _info(self) -> dict[str, Any]:
        return {"is_success": bool(np.linalg.norm(fingertip(self.q) - self.target) < self.success_radius)}


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=ReachEnv, max_episode_steps=60)
