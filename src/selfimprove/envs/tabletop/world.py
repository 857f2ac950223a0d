"""The tabletop world's gymnasium env: pymunk physics of the pusher and the objects, observations,
the task's success test, the reset-free support, and the gymnasium ids (``register_tabletop_envs``).

The board's numbers and shapes are in ``board.py``, the frames are drawn by ``render.py`` and the
instructions come from ``tasks.py``. See docs/tabletop.md for every difference from the original.
"""

from __future__ import annotations

import logging
import string
from typing import Any

import gymnasium as gym
import numpy as np
import pymunk
from gymnasium import spaces

import selfimprove.envs.tabletop.tasks as tasks_mod
from selfimprove.envs.tabletop.board import (
    ACTION_LIMIT, BLOCK_FRICTION, BLOCK_MASS, CONTROL_HZ, GRAVITY, MIN_BLOCK_PUSHER_DISTANCE, NOVEL_USABLE_MARGIN,
    PUSHER_FRICTION, PUSHER_RADIUS, SPAWN_X, SPAWN_Y, USABLE_MARGIN, VIEW_X, VIEW_Y, X_BOUNDS, Y_BOUNDS, BlockGeometry,
    object_look, signed_area,
)
from selfimprove.envs.tabletop.render import Renderer
from selfimprove.envs.tabletop.tasks import BLOCK_MODES, Task
from selfimprove.errors import ConfigError

logger = logging.getLogger(__name__)

_S = 1000.0  # pymunk works in millimetres: its default slop and tolerances suit that scale.
_INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.'-"
MAX_INSTRUCTION_LENGTH = 128


# ---------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------
class TabletopEnv(gym.Env):
    """Planar pushing of coloured blocks (or one banana: BananaTable) by a round pusher, with language instructions.

    ``block_mode`` picks the objects (BLOCK_4, BLOCK_8, BANANA); unset, it is the task family's own
    (BANANA for ``banana2location``, else BLOCK_8). ``phrasing = "paraphrase"`` words each task outside the
    templates (``tasks.paraphrase``): the same boards and tasks, for evaluating how a model reads other words.

    Observation keys: ``rgb`` uint8 [render_frames, H, W, 3] (oldest frame first; absent when
    ``image_size`` is None), ``effector`` and ``effector_target`` float32 (2,), ``instruction``
    (str). ``info["is_success"]`` is the simulator's success and never part of the observation.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        task: str = "block2block",
        image_size: int | tuple[int, int] | None = 96,
        block_mode: str | None = None,
        max_episode_steps: int = 200,
        terminate_on_success: bool = True,
        render_frames: int = 2,
        physics_substeps: int = 10,
        pusher_max_speed: float = 1.0,
        pusher_max_force: float = 20.0,
        pusher_mass: float = 0.1,
        success_reward: float = 1.0,
        render_mode: str | None = None,
        phrasing: str = "template",
    ) -> None:
        if task not in tasks_mod.TASK_FAMILIES:
            raise ConfigError(f"unknown task {task!r}; valid tasks: {', '.join(tasks_mod.TASK_FAMILIES)}")
        block_mode = block_mode if block_mode is not None else tasks_mod.DEFAULT_BLOCK_MODES[task]
        tasks_mod.check_block_mode(task, block_mode)
        if render_frames < 1 or physics_substeps < 1 or max_episode_steps < 1:
            raise ConfigError("render_frames, physics_substeps and max_episode_steps must be >= 1")
        if phrasing not in tasks_mod.PHRASINGS:
            raise ConfigError(f"env.kwargs.phrasing {phrasing!r}: choose one of {list(tasks_mod.PHRASINGS)}")
        self.phrasing = phrasing
        self.task_family = task
        self.block_mode = block_mode
        self.block_names: tuple[str, ...] = BLOCK_MODES[block_mode]
        self.max_episode_steps = int(max_episode_steps)
        self.terminate_on_success = terminate_on_success
        self.render_frames = int(render_frames)
        self.physics_substeps = int(physics_substeps)
        self.pusher_max_speed = float(pusher_max_speed)
        self.pusher_max_force = float(pusher_max_force)
        self.pusher_mass = float(pusher_mass)
        self.success_reward = float(success_reward)
        self.render_mode = render_mode
        self.image_hw: tuple[int, int] | None = _parse_size(image_size)

        looks = [object_look(name) for name in self.block_names]
        self._geoms = [geom for geom, _ in looks]
        self.block_radii = np.array([g.radius for g in self._geoms])
        self._usable_margins = np.array([NOVEL_USABLE_MARGIN.get(n, USABLE_MARGIN) for n in self.block_names])
        self._renderer = Renderer(self._geoms, [colour for _, colour in looks], self.image_hw or (96, 96))
        self.action_space = spaces.Box(-ACTION_LIMIT, ACTION_LIMIT, shape=(2,), dtype=np.float32)
        self.observation_space = self._make_observation_space()

        self._space: pymunk.Space | None = None
        self._blocks: list[pymunk.Body] = []
        self._pusher: pymunk.Body | None = None
        self._control: pymunk.Body | None = None
        self._target = np.zeros(2)
        self._frames: np.ndarray | None = None
        self._task: Task | None = None
        self._start_positions: dict[str, np.ndarray] = {}
        self._steps = 0
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    # -- spaces ---------------------------------------------------------------------------
    def _make_observation_space(self) -> spaces.Dict:
        lo = np.array([X_BOUNDS[0], Y_BOUNDS[0]], np.float32)
        hi = np.array([X_BOUNDS[1], Y_BOUNDS[1]], np.float32)
        d: dict[str, spaces.Space] = {}
        if self.image_hw is not None:
            h, w = self.image_hw
            d["rgb"] = spaces.Box(0, 255, (self.render_frames, h, w, 3), np.uint8)
        pad = np.float32(PUSHER_RADIUS)
        d["effector"] = spaces.Box(lo - pad, hi + pad, (2,), np.float32)
        d["effector_target"] = spaces.Box(lo, hi, (2,), np.float32)
        d["instruction"] = spaces.Text(MAX_INSTRUCTION_LENGTH, min_length=0, charset=_INSTRUCTION_CHARSET)
        return spaces.Dict(d)

    # -- public state -------------------------------------------------------------------
    @property
    def task(self) -> Task | None:
        """The current task object (privileged: for experts and diagnostics)."""
        return self._task

    @property
    def instruction(self) -> str:
        """The task in words: the original's templates, or with ``phrasing = "paraphrase"`` words outside them
        (the same task, board and success test)."""
        if self._task is None:
            return ""
        return tasks_mod.paraphrase(self._task) if self.phrasing == "paraphrase" else self._task.instruction

    @property
    def effector(self) -> np.ndarray:
        p = self._pusher.position
        return np.array([p.x / _S, p.y / _S])

    @property
    def effector_target(self) -> np.ndarray:
        return self._target.copy()

    @property
    def start_positions(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._start_positions.items()}

    def block_array(self) -> np.ndarray:
        """Block centres as an [n_blocks, 2] array (metres), in `block_names` order."""
        return self._state()[0].copy()

    def block_angles(self) -> np.ndarray:
        """Block yaws (radians), in `block_names` order."""
        return self._state()[1].copy()

    def _state(self) -> tuple[np.ndarray, np.ndarray]:
        """Block centres and yaws, read from pymunk once per physics step (the hot path)."""
        if self._cache is None:
            xy = np.array([tuple(b.position) for b in self._blocks]) / _S
            self._cache = (xy, np.array([b.angle for b in self._blocks]))
        return self._cache

    def block_positions(self) -> dict[str, np.ndarray]:
        """Block name -> centre (metres)."""
        return dict(zip(self.block_names, self.block_array()))

    # -- gymnasium API ------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Samples a fresh board and a valid task from the seeded generator (same seed, same board)."""
        super().reset(seed=seed)
        rng = self.np_random
        for _ in range(1000):
            pusher_xy, block_xy, angles = self._sample_layout(rng)
            self._build_space(pusher_xy, block_xy, angles)
            if self.new_task(rng) is not None:
                break
        else:  # pragma: no cover - practically unreachable
            raise RuntimeError(f"could not sample a valid {self.task_family} board in 1000 tries")
        self._frames = None
        obs = self._observation()
        return obs, self._info(self._is_success())

    def step(self, action: np.ndarray):
        if self._space is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float64).reshape(2)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action must be finite, got {action!r}")
        a = np.clip(a, -ACTION_LIMIT, ACTION_LIMIT)
        t = self._target + a
        t[0] = min(max(t[0], X_BOUNDS[0]), X_BOUNDS[1])
        t[1] = min(max(t[1], Y_BOUNDS[0]), Y_BOUNDS[1])
        self._target = t
        self._control.position = (t[0] * _S, t[1] * _S)
        dt = 1.0 / (CONTROL_HZ * self.physics_substeps)
        step = self._space.step
        for _ in range(self.physics_substeps):
            step(dt)
        self._cache = None
        self._steps += 1
        success = self._is_success()
        terminated = bool(success and self.terminate_on_success)
        truncated = self._steps >= self.max_episode_steps and not terminated
        reward = self.success_reward if success else 0.0
        return self._observation(), reward, terminated, truncated, self._info(success)

    def render(self) -> np.ndarray | None:
        """Returns the latest top-down frame (render_mode 'rgb_array')."""
        if self._space is None:
            return None
        return self._draw()

    def close(self) -> None:
        self._space = None

    # -- reset-free support -------------------------------------------------------------
    def new_task(self, rng: np.random.Generator | None = None) -> str | None:
        """Draws a new valid instruction for the board as it is, moving nothing.

        Also restarts the step counter and the start poses the success test compares against.
        Returns the instruction, or None (task unchanged) when the board admits no valid task.
        """
        rng = rng if rng is not None else self.np_random
        positions = self.block_positions()
        task = tasks_mod.sample_task(self.task_family, positions, rng)
        if task is None:
            return None
        self._task = task
        self._start_positions = positions
        self._steps = 0
        return self.instruction

    def observe(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The current observation and info without stepping (after ``new_task``)."""
        if self._space is None:
            raise RuntimeError("call reset() before observe()")
        return self._observation(advance=False), self._info(self._is_success())

    def board_usable(self) -> bool:
        """False when a block is stuck against a wall/outside the bounds or the physics blew up."""
        self._cache = None  # re-read pymunk: cheap here, and robust to bodies moved by hand
        xy = self.block_array()
        if not np.all(np.isfinite(xy)):
            return False
        m = self._usable_margins
        return bool(np.all((xy[:, 0] >= X_BOUNDS[0] - m) & (xy[:, 0] <= X_BOUNDS[1] + m)
                           & (xy[:, 1] >= Y_BOUNDS[0] - m) & (xy[:, 1] <= Y_BOUNDS[1] + m)))

    # -- internals ------------------------------------------------------------------------
    def _sample_layout(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pusher and non-overlapping block centres uniform in the spawn region, yaw uniform."""
        lo = np.array([SPAWN_X[0], SPAWN_Y[0]])
        hi = np.array([SPAWN_X[1], SPAWN_Y[1]])
        while True:
            pusher = rng.uniform(lo, hi)
            placed: list[np.ndarray] = []
            ok = True
            for i, r in enumerate(self.block_radii):
                for _ in range(200):
                    p = rng.uniform(lo, hi)
                    if np.linalg.norm(p - pusher) < max(MIN_BLOCK_PUSHER_DISTANCE, r + PUSHER_RADIUS + 0.005):
                        continue
                    if all(np.linalg.norm(p - q) >= r + self.block_radii[j] + 0.002 for j, q in enumerate(placed)):
                        placed.append(p)
                        break
                else:
                    ok = False
                    break
            if ok:
                angles = rng.uniform(0.0, 2 * np.pi, len(self.block_names))
                return pusher, np.array(placed), angles

    def _build_space(self, pusher_xy: np.ndarray, block_xy: np.ndarray, angles: np.ndarray) -> None:
        """A fresh pymunk space per board, so that no cached contact state leaks across resets."""
        space = pymunk.Space()
        space.gravity = (0.0, 0.0)
        space.iterations = 10
        # resolve overlaps faster than chipmunk's default (10%/60 Hz tick): fast pushes sink less
        space.collision_bias = 0.5**60
        self._add_walls(space)
        self._blocks = []
        for geom, xy, ang in zip(self._geoms, block_xy, angles):
            self._blocks.append(self._add_block(space, geom, xy, ang))
        # pusher: a heavy non-rotating disc dragged towards a kinematic control body by a
        # force-limited pivot whose correction speed is capped at pusher_max_speed.
        control = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        control.position = tuple(pusher_xy * _S)
        pusher = pymunk.Body(self.pusher_mass, float("inf"))
        pusher.position = tuple(pusher_xy * _S)
        circle = pymunk.Circle(pusher, PUSHER_RADIUS * _S)
        circle.friction = PUSHER_FRICTION  # pymunk multiplies: pusher-block pair 0.5
        joint = pymunk.PivotJoint(control, pusher, (0, 0), (0, 0))
        joint.max_bias = self.pusher_max_speed * _S
        joint.max_force = self.pusher_max_force * _S
        joint.error_bias = 1e-10  # stiff tracking; max_bias caps the speed
        space.add(control, pusher, circle, joint)
        self._space, self._pusher, self._control = space, pusher, control
        self._cache = None
        self._target = np.array(pusher_xy, dtype=np.float64)

    @staticmethod
    def _add_walls(space: pymunk.Space) -> None:
        r = 0.02 * _S
        x0, x1 = VIEW_X[0] * _S - r, VIEW_X[1] * _S + r
        y0, y1 = VIEW_Y[0] * _S - r, VIEW_Y[1] * _S + r
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        for a, b in zip(corners, corners[1:] + corners[:1]):
            seg = pymunk.Segment(space.static_body, a, b, r)
            seg.friction = BLOCK_FRICTION
            space.add(seg)

    @staticmethod
    def _add_block(space: pymunk.Space, geom: BlockGeometry, xy: np.ndarray, angle: float) -> pymunk.Body:
        body = pymunk.Body()
        body.position = (float(xy[0] * _S), float(xy[1] * _S))
        body.angle = float(angle)
        area = sum(abs(signed_area(p)) for p in geom.pieces) * _S * _S
        shapes = []
        for piece in geom.pieces:
            poly = pymunk.Poly(body, [tuple(v) for v in piece * _S])
            poly.density = BLOCK_MASS / area
            poly.friction = BLOCK_FRICTION
            shapes.append(poly)
        space.add(body, *shapes)
        # top-down table friction: velocity-only constraints to the static body, capped at mu*m*g.
        f = BLOCK_FRICTION * BLOCK_MASS * GRAVITY * _S
        lin = pymunk.PivotJoint(space.static_body, body, (0, 0), (0, 0))
        lin.max_bias, lin.max_force = 0.0, f
        rot = pymunk.GearJoint(space.static_body, body, 0.0, 1.0)
        rot.max_bias, rot.max_force = 0.0, f * 0.5 * geom.radius * _S
        space.add(lin, rot)
        return body

    def _is_success(self) -> bool:
        if self._task is None:
            return False
        return bool(self._task.is_success(dict(zip(self.block_names, self._state()[0])), self._start_positions))

    def _draw(self) -> np.ndarray:
        xy, angles = self._state()
        return self._renderer.draw(xy, angles, self.effector)

    def _observation(self, advance: bool = True) -> dict[str, Any]:
        p = self._pusher.position
        obs: dict[str, Any] = {}
        if self.image_hw is not None:
            if self._frames is None:
                self._frames = np.repeat(self._draw()[None], self.render_frames, axis=0)
            elif advance:
                frame = self._draw()
                self._frames[:-1] = self._frames[1:]
                self._frames[-1] = frame
            obs["rgb"] = self._frames.copy()
        obs["effector"] = np.array([p.x / _S, p.y / _S], np.float32)
        obs["effector_target"] = self._target.astype(np.float32)
        obs["instruction"] = self.instruction
        return obs

    def _info(self, success: bool) -> dict[str, Any]:
        xy, angles = self._state()
        task = self._task
        return {
            "is_success": success,
            "task_family": self.task_family,
            "goal_distance": task.distance(dict(zip(self.block_names, xy))) if task is not None else float("nan"),
            "block_positions": xy.copy(),
            "block_angles": angles.copy(),
            "steps": self._steps,
        }


def _parse_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        h, w = (int(v) for v in image_size)
    if h < 8 or w < 8:
        raise ConfigError(f"image_size must be >= 8 pixels (or None for no image), got {image_size!r}")
    return h, w


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
ENV_IDS = {
    "selfimprove/Tabletop-Block2Block-v0": "block2block",
    "selfimprove/Tabletop-Block2Location-v0": "block2location",
    "selfimprove/Tabletop-SeparateBlocks-v0": "separate_blocks",
    "selfimprove/Tabletop-Banana-v0": "banana2location",  # BananaTable: one banana, no blocks
}


def register_tabletop_envs() -> None:
    """Registers the gymnasium ids (idempotent); the env enforces its own 200-step limit."""
    for env_id, family in ENV_IDS.items():
        if env_id in gym.registry:
            continue
        gym.register(id=env_id, entry_point="selfimprove.envs.tabletop.world:TabletopEnv", kwargs={"task": family})
