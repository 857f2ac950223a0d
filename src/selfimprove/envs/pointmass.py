"""The paper's toy domain: a 2-D point mass that must reach a goal.

Observation ``[x, y, vx, vy, gx, gy]``; action: a 2-D acceleration in [-1, 1]^2 (scaled by
``accel``) held for ``substeps`` physics substeps. The true success flag (within ``success_radius``
of the goal) is reported in ``info["is_success"]`` only: learners must never read it.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

INSTRUCTION = "move the point to the goal"


class PointMassEnv(gym.Env):
    """Point mass in [-1, 1]^2 with walls, linear damping and a goal drawn at reset."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        substeps: int = 10,
        dt: float = 0.01,
        accel: float = 4.0,
        damping: float = 0.5,
        success_radius: float = 0.15,
        terminate_on_success: bool = True,
        render_mode: str | None = None,
    ) -> None:
        self.substeps = int(substeps)
        self.dt = float(dt)
        self.accel = float(accel)
        self.damping = float(damping)
        self.success_radius = float(success_radius)
        self.terminate_on_success = bool(terminate_on_success)
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(
            low=np.array([-1, -1, -np.inf, -np.inf, -1, -1], dtype=np.float32),
            high=np.array([1, 1, np.inf, np.inf, 1, 1], dtype=np.float32),
            dtype=np.float32,
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.instruction = INSTRUCTION
        self._pos = [0.0, 0.0]
        self._vel = [0.0, 0.0]
        self._goal = [0.0, 0.0]

    # -- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        while True:
            pos = rng.uniform(-1.0, 1.0, size=2)
            goal = rng.uniform(-0.9, 0.9, size=2)
            if np.linalg.norm(pos - goal) > 2 * self.success_radius:
                break
        self._pos = [float(pos[0]), float(pos[1])]
        self._vel = [0.0, 0.0]
        self._goal = [float(goal[0]), float(goal[1])]
        return self._obs(), self._info()

    def step(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(2)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"PointMassEnv.step got a non-finite action {a!r}")
        ax = self.accel * min(1.0, max(-1.0, float(a[0])))
        ay = self.accel * min(1.0, max(-1.0, float(a[1])))
        x, y = self._pos
        vx, vy = self._vel
        dt, keep = self.dt, 1.0 - self.damping * self.dt
        for _ in range(self.substeps):
            vx = (vx + ax * dt) * keep
            vy = (vy + ay * dt) * keep
            x += vx * dt
            y += vy * dt
            if x > 1.0 or x < -1.0:
                x, vx = (1.0 if x > 0 else -1.0), 0.0
            if y > 1.0 or y < -1.0:
                y, vy = (1.0 if y > 0 else -1.0), 0.0
        self._pos = [x, y]
        self._vel = [vx, vy]
        success = self.is_success()
        return self._obs(), 0.0, bool(success and self.terminate_on_success), False, self._info()

    # -- reset-free support ---------------------------------------------------------------------
    def new_task(self, rng: np.random.Generator | None = None) -> str:
        """A new goal from where the point is now (it keeps its position and velocity)."""
        rng = rng if rng is not None else self.np_random
        pos = np.array(self._pos)
        while True:
            goal = rng.uniform(-0.9, 0.9, size=2)
            if np.linalg.norm(pos - goal) > 2 * self.success_radius:
                break
        self._goal = [float(goal[0]), float(goal[1])]
        return self.instruction

    def board_usable(self) -> bool:
        """The point can always go on (walls stop it, nothing falls off)."""
        return True

    def observe(self) -> tuple[np.ndarray, dict[str, Any]]:
        return self._obs(), self._info()

    # -- helpers -------------------------------------------------------------------------------
    def distance_to_goal(self) -> float:
        return math.hypot(self._pos[0] - self._goal[0], self._pos[1] - self._goal[1])

    def is_success(self) -> bool:
        return self.distance_to_goal() < self.success_radius

    @property
    def position(self) -> np.ndarray:
        return np.array(self._pos)

    @property
    def velocity(self) -> np.ndarray:
        return np.array(self._vel)

    @property
    def goal(self) -> np.ndarray:
        return np.array(self._goal)

    def _obs(self) -> np.ndarray:
        return np.array([*self._pos, *self._vel, *self._goal], dtype=np.float32)

    def _info(self) -> dict[str, Any]:
        return {"is_success": self.is_success(), "instruction": self.instruction}

    def render(self) -> np.ndarray:
        """A small top-down RGB frame (goal green, point white) for videos."""
        size = 64
        img = np.full((size, size, 3), 40, dtype=np.uint8)

        def pix(p: list[float]) -> tuple[int, int]:
            return (int(round((p[1] + 1) / 2 * (size - 1))), int(round((p[0] + 1) / 2 * (size - 1))))

        gr, gc = pix(self._goal)
        rad = max(1, int(self.success_radius / 2 * size))
        yy, xx = np.ogrid[:size, :size]
        img[(yy - gr) ** 2 + (xx - gc) ** 2 <= rad**2] = (60, 160, 60)
        pr, pc = pix(self._pos)
        img[max(0, pr - 1) : pr + 2, max(0, pc - 1) : pc + 2] = 255
        return img


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
