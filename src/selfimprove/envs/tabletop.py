"""LanguageTable-style planar pushing world: pymunk physics, a fast top-down renderer, gymnasium API.

The original (PyBullet + xArm6 + a 180x320 camera) runs ~27 steps/s on one core; a 2-D world with
the same workspace, blocks, action space and instructions runs two orders of magnitude faster,
which is what makes on-policy self-improvement affordable on a CPU. See docs/tabletop.md for
every difference from the original.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import pymunk
from gymnasium import spaces
from PIL import Image, ImageDraw

import selfimprove.envs.tasks as tasks_mod
from selfimprove.envs.tasks import BLOCK_MODES, Task
from selfimprove.errors import ConfigError

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Constants of the original (metres, kilograms, seconds)
# ---------------------------------------------------------------------------------------------
X_BOUNDS = (0.15, 0.60)
Y_BOUNDS = (-0.3048, 0.3048)
SPAWN_SHRINK = 0.08
SPAWN_X = (X_BOUNDS[0] + SPAWN_SHRINK, X_BOUNDS[1] - SPAWN_SHRINK)
SPAWN_Y = (Y_BOUNDS[0] + SPAWN_SHRINK, Y_BOUNDS[1] - SPAWN_SHRINK)
PUSHER_RADIUS = 0.0127
BLOCK_MASS = 0.01
BLOCK_FRICTION = 0.5
PUSHER_FRICTION = 1.0
MIN_BLOCK_PUSHER_DISTANCE = 0.06
ACTION_LIMIT = 0.1
CONTROL_HZ = 10.0
GRAVITY = 9.81

#: walls sit this far outside the workspace bounds, so the pusher (whose centre is clipped to the
#: bounds) never touches them but blocks cannot leave the table.
WALL_MARGIN = 0.025
#: the rendered area is the table inside the walls.
VIEW_X = (X_BOUNDS[0] - WALL_MARGIN, X_BOUNDS[1] + WALL_MARGIN)
VIEW_Y = (Y_BOUNDS[0] - WALL_MARGIN, Y_BOUNDS[1] + WALL_MARGIN)
#: a block whose centre is farther than this outside the bounds counts as stuck (board unusable).
USABLE_MARGIN = 0.012
#: the banana lies flat against a wall with its centre ~0.01 m outside the bounds, where the pusher
#: (its centre clipped to the bounds) can never get behind it: any centre outside the bounds is stuck.
NOVEL_USABLE_MARGIN = {"banana": -0.02}

FOOTPRINTS = {  # (extent along body x, extent along body y), metres
    "cube": (0.0397, 0.0397),
    "moon": (0.0525, 0.0257),
    "star": (0.0444, 0.0408),
    "pentagon": (0.0444, 0.0413),
}
COLOURS_RGB = {
    "red": (255, 102, 102),
    "blue": (102, 102, 255),
    "green": (102, 255, 102),
    "yellow": (255, 255, 102),
}
#: novel objects (BananaTable): never in a demo, named by themselves; (length, depth) of the
#: bounding box in the body frame, metres, and a colour of their own.
NOVEL_FOOTPRINTS = {"banana": (0.088, 0.030)}
NOVEL_COLOURS_RGB = {"banana": (250, 215, 40)}
BOARD_RGB = (48, 48, 48)
PUSHER_RGB = (205, 205, 205)

_S = 1000.0  # pymunk works in millimetres: its default slop and tolerances suit that scale.
_INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.'-"
MAX_INSTRUCTION_LENGTH = 128


# ---------------------------------------------------------------------------------------------
# Block geometry (body frame, metres, centroid at the origin)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockGeometry:
    """Convex collision pieces and a (possibly concave) outline for drawing, both in the body frame."""

    pieces: tuple[np.ndarray, ...]
    outline: np.ndarray
    radius: float  # bounding circle radius around the centroid


def _fit_box(points: np.ndarray, size: tuple[float, float]) -> np.ndarray:
    """Scales points so their bounding box is exactly `size`."""
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) * (np.asarray(size) / (hi - lo))


def _area_centroid(pieces: list[np.ndarray]) -> np.ndarray:
    total, acc = 0.0, np.zeros(2)
    for p in pieces:
        x, y = p[:, 0], p[:, 1]
        xn, yn = np.roll(x, -1), np.roll(y, -1)
        cross = x * yn - xn * y
        a = cross.sum() / 2
        c = np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * a)
        total += a
        acc += a * c
    return acc / total


def _regular(n: int, radius: float, phase: float) -> np.ndarray:
    ang = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(ang), radius * np.sin(ang)], 1)


def _make_geometry(shape: str) -> BlockGeometry:
    size = FOOTPRINTS.get(shape, (1.0, 1.0))
    if shape == "cube":
        outline = _fit_box(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), size)
        pieces = [outline]
    elif shape == "pentagon":
        outline = _fit_box(_regular(5, 1.0, np.pi / 2), size)
        pieces = [outline]
    elif shape == "star":
        outer = _regular(5, 1.0, np.pi / 2)
        inner = _regular(5, 0.55, np.pi / 2 + np.pi / 5)
        outline = np.empty((10, 2))
        outline[0::2], outline[1::2] = outer, inner
        outline = _fit_box(outline, size)
        outer, inner = outline[0::2], outline[1::2]
        pieces = [inner] + [np.stack([inner[i - 1], outer[i], inner[i]]) for i in range(5)]
    elif shape == "moon":
        outline, pieces = _moon(size)
    elif shape == "banana":
        outline, pieces = _banana(NOVEL_FOOTPRINTS[shape])
    else:
        raise ConfigError(f"unknown shape {shape!r}; valid shapes: {', '.join([*FOOTPRINTS, *NOVEL_FOOTPRINTS])}")
    centre = _area_centroid(pieces)
    pieces = [p - centre for p in pieces]
    outline = outline - centre
    radius = float(np.linalg.norm(outline, axis=1).max())
    return BlockGeometry(tuple(np.ascontiguousarray(p) for p in pieces), np.ascontiguousarray(outline), radius)


def _moon(size: tuple[float, float], n: int = 5) -> tuple[np.ndarray, list[np.ndarray]]:
    """A crescent: outer arc through the horn tips and the apex, inner arc cut out; n convex quads."""
    w, d = size
    horn = 0.18 * w  # the horn tips are this wide
    thickness = 0.5 * d  # crescent thickness at the middle
    t = np.linspace(-1, 1, n + 1)
    outer = np.stack([t * w / 2, d * (1 - t**2) ** 0.6], 1)
    inner_half = w / 2 - horn
    inner = np.stack([t * inner_half, (d - thickness) * (1 - t**2) ** 0.6], 1)
    # join the horn tips: outer and inner start/end at y=0
    pieces = [np.stack([outer[i], outer[i + 1], inner[i + 1], inner[i]]) for i in range(n)]
    pieces = [p[::-1] if _signed_area(p) < 0 else p for p in pieces]
    outline = np.concatenate([outer, inner[::-1]])
    lo, hi = outline.min(0), outline.max(0)
    scale, mid = np.asarray(size) / (hi - lo), (lo + hi) / 2
    return (outline - mid) * scale, [(p - mid) * scale for p in pieces]


def _banana(size: tuple[float, float], n: int = 8) -> tuple[np.ndarray, list[np.ndarray]]:
    """A banana: a curved body, thick in the middle and tapering to blunt tips, with a short stem.

    The centreline is a parabolic arc; each of the n body pieces spans a vertical strip between
    the outer and inner edges (a trapezoid, hence convex) and the stem is one more trapezoid along
    the tangent at the +x tip. The whole outline is then scaled to the footprint ``size``.
    """
    length, sagitta, h_mid, h_tip = 1.0, 0.17, 0.115, 0.03  # relative to the body length
    stem_len, h_stem = 0.09, 0.022
    t = np.linspace(-1, 1, n + 1)
    x = t * length / 2
    centre = sagitta * (1 - t**2)
    half = h_tip + (h_mid - h_tip) * (1 - t**2) ** 0.7
    outer, inner = np.stack([x, centre + half], 1), np.stack([x, centre - half], 1)
    pieces = [np.stack([inner[i], inner[i + 1], outer[i + 1], outer[i]]) for i in range(n)]
    slope = -4 * sagitta / length  # d(centre)/dx at the +x tip
    x0, x1 = length / 2, length / 2 + stem_len
    stem = np.array([[x0, -h_stem], [x1, -h_stem + slope * stem_len], [x1, h_stem + slope * stem_len], [x0, h_stem]])
    pieces.append(stem)
    pieces = [p[::-1] if _signed_area(p) < 0 else p for p in pieces]
    outline = np.concatenate([inner, stem, outer[::-1]])
    lo, hi = outline.min(0), outline.max(0)
    scale, mid = np.asarray(size) / (hi - lo), (lo + hi) / 2
    return (outline - mid) * scale, [(p - mid) * scale for p in pieces]


def _signed_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum() / 2)


GEOMETRY = {shape: _make_geometry(shape) for shape in (*FOOTPRINTS, *NOVEL_FOOTPRINTS)}


def object_look(name: str) -> tuple[BlockGeometry, tuple[int, int, int]]:
    """Geometry and colour of a '<colour> <shape>' block or of a novel object named by itself."""
    if name in NOVEL_FOOTPRINTS:
        return GEOMETRY[name], NOVEL_COLOURS_RGB[name]
    colour, shape = name.split()
    return GEOMETRY[shape], COLOURS_RGB[colour]


# ---------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------
class TabletopEnv(gym.Env):
    """Planar pushing of coloured blocks (or one banana: BananaTable) by a round pusher, with language instructions.

    ``block_mode`` picks the objects (BLOCK_4, BLOCK_8, BANANA); unset, it is the task family's own
    (BANANA for ``banana2location``, else BLOCK_8).

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
    ) -> None:
        if task not in tasks_mod.TASK_FAMILIES:
            raise ConfigError(f"unknown task {task!r}; valid tasks: {', '.join(tasks_mod.TASK_FAMILIES)}")
        block_mode = block_mode if block_mode is not None else tasks_mod.DEFAULT_BLOCK_MODES[task]
        tasks_mod.check_block_mode(task, block_mode)
        if render_frames < 1 or physics_substeps < 1 or max_episode_steps < 1:
            raise ConfigError("render_frames, physics_substeps and max_episode_steps must be >= 1")
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
        self._renderer = _Renderer(self._geoms, [colour for _, colour in looks], self.image_hw or (96, 96))
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
        return self._task.instruction if self._task is not None else ""

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
        return task.instruction

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
        area = sum(abs(_signed_area(p)) for p in geom.pieces) * _S * _S
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


class _Renderer:
    """Top-down rasteriser: image rows follow +x (row 0 = 'top', near the robot), columns follow +y."""

    def __init__(self, geoms: list[BlockGeometry], colours: list[tuple[int, int, int]], hw: tuple[int, int]):
        self.h, self.w = hw
        self.colours = colours
        self.sx = self.h / (VIEW_X[1] - VIEW_X[0])
        self.sy = self.w / (VIEW_Y[1] - VIEW_Y[0])
        self.counts = [len(g.outline) for g in geoms]
        ends = np.cumsum(self.counts) * 2
        self.slices = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
        self.verts = np.concatenate([g.outline for g in geoms])
        self.owner = np.repeat(np.arange(len(geoms)), self.counts)
        self.background = Image.new("RGB", (self.w, self.h), BOARD_RGB)
        self.pr_row = PUSHER_RADIUS * self.sx
        self.pr_col = PUSHER_RADIUS * self.sy

    def draw(self, xy: np.ndarray, angles: np.ndarray, pusher: np.ndarray) -> np.ndarray:
        c, s = np.cos(angles)[self.owner], np.sin(angles)[self.owner]
        vx, vy = self.verts[:, 0], self.verts[:, 1]
        wx = c * vx - s * vy + xy[self.owner, 0]
        wy = s * vx + c * vy + xy[self.owner, 1]
        pix = np.empty((len(wx), 2))
        pix[:, 0] = (wy - VIEW_Y[0]) * self.sy - 0.5  # PIL x = column
        pix[:, 1] = (wx - VIEW_X[0]) * self.sx - 0.5  # PIL y = row
        img = self.background.copy()
        draw = ImageDraw.Draw(img)
        flat = pix.ravel().tolist()
        for (a, b), colour in zip(self.slices, self.colours):
            draw.polygon(flat[a:b], fill=colour)
        pr, pc = (pusher[0] - VIEW_X[0]) * self.sx - 0.5, (pusher[1] - VIEW_Y[0]) * self.sy - 0.5
        draw.ellipse((pc - self.pr_col, pr - self.pr_row, pc + self.pr_col, pr + self.pr_row), fill=PUSHER_RGB)
        return np.asarray(img)


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
        gym.register(id=env_id, entry_point="selfimprove.envs.tabletop:TabletopEnv", kwargs={"task": family})
