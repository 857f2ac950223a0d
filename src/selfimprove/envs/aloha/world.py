"""``AlohaInsertionEnv``: bimanual peg-in-socket insertion on gym-aloha's MuJoCo scene, as a gymnasium env.

Control at 10 Hz (the paper's rate): an action is the 14 joint targets of the two arms, per arm six
joint angles (rad) then the gripper (0 closed, 1 open, the stock normalisation), held for 50 physics
steps of 2 ms. With ``action_mode="delta"`` (the default) the six joint targets are given relative to
where the joints are when the action is taken; ``"absolute"`` gives them as angles. Each reset places the peg and the socket uniformly in the stock env's regions.

Observation keys: ``rgb`` uint8 [render_frames, S, S * len(cameras), 3] (the chosen cameras side
by side, oldest frame first; absent when ``image_size`` is None), ``joints`` float32 (14,) (the arms'
joint angles and gripper openings in the action's layout) and ``instruction`` (str).
``info["is_success"]`` (the peg touches the pin inside the socket, the stock env's full reward, or
rests within 8 mm of it) is the simulator's success and never part of the observation.
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from selfimprove.envs.aloha import scene
from selfimprove.envs.aloha.scene import mujoco
from selfimprove.errors import ConfigError

INSTRUCTION = "insert the peg into the socket"
CONTROL_HZ = 10


class AlohaInsertionEnv(gym.Env):
    """Two ViperX arms: one picks the socket, the other the peg, and they meet to insert it."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, image_size: int | None = 64, cameras: tuple[str, ...] | list[str] = ("top",),
                 render_frames: int = 2, max_episode_steps: int = 80, terminate_on_success: bool = True,
                 control_hz: int = CONTROL_HZ, action_mode: str = "delta", render_mode: str | None = None) -> None:
        if render_frames < 1 or max_episode_steps < 1 or control_hz < 1:
            raise ConfigError("render_frames, max_episode_steps and control_hz must be >= 1")
        if image_size is not None and int(image_size) < 8:
            raise ConfigError(f"image_size must be >= 8 pixels (or None for no image), got {image_size!r}")
        self.model = scene.build_model()
        self.data = mujoco.MjData(self.model)
        self.substeps = max(1, round(1.0 / (control_hz * self.model.opt.timestep)))
        self.image_size = None if image_size is None else int(image_size)
        self.cameras = tuple(cameras)
        self.render_frames = int(render_frames)
        self.max_episode_steps = int(max_episode_steps)
        self.terminate_on_success = bool(terminate_on_success)
        self.render_mode = render_mode
        if self.image_size:
            scene.check_gl_settings()  # mujoco may have been imported with other settings earlier
        self._views = scene.Cameras(self.model, self.cameras, self.image_size) if self.image_size else None
        m = self.model
        self._arm_qpos = np.array([[m.joint(f"vx300s_{s}/{j}").qposadr[0] for j in scene.ARM_JOINTS] for s in scene.SIDES])
        self._finger_qpos = np.array([m.joint(f"vx300s_{s}/left_finger").qposadr[0] for s in scene.SIDES])
        self._peg_qpos = m.joint("red_peg_joint").qposadr[0]
        self._socket_qpos = m.joint("blue_socket_joint").qposadr[0]
        self._peg_geom, self._pin_geom = m.geom("red_peg").id, m.geom("pin").id
        self._peg_body, self._socket_body = m.body("peg").id, m.body("socket").id
        self.action_mode = action_mode
        self.action_space = spaces.Box(*scene.action_bounds(action_mode), dtype=np.float32)
        obs_spaces: dict[str, spaces.Space] = {}
        if self.image_size:
            shape = (self.render_frames, self.image_size, self.image_size * len(self.cameras), 3)
            obs_spaces["rgb"] = spaces.Box(0, 255, shape, np.uint8)
        obs_spaces["joints"] = spaces.Box(-2 * np.pi, 2 * np.pi, (14,), np.float32)  # limits are soft
        obs_spaces["instruction"] = spaces.Text(64, min_length=0, charset=string.ascii_lowercase + " ")
        self.observation_space = spaces.Dict(obs_spaces)
        self._frames: np.ndarray | None = None
        self._steps = 0
        self._reset_done = False

    # -- public state (privileged: for the expert and diagnostics) --------------------------
    @property
    def instruction(self) -> str:
        return INSTRUCTION

    @property
    def peg_position(self) -> np.ndarray:
        return self.data.qpos[self._peg_qpos:self._peg_qpos + 3].copy()

    @property
    def socket_position(self) -> np.ndarray:
        return self.data.qpos[self._socket_qpos:self._socket_qpos + 3].copy()

    def joints(self) -> np.ndarray:
        """The arms' joint angles and normalised gripper openings, in the action's layout (14,)."""
        q = self.data.qpos
        out = np.empty(14)
        for i in range(2):
            out[7 * i:7 * i + 6] = q[self._arm_qpos[i]]
            out[7 * i + 6] = (q[self._finger_qpos[i]] - scene.FINGER_CLOSED) / (scene.FINGER_OPEN - scene.FINGER_CLOSED)
        return out

    # -- gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """The stock start pose with the peg and the socket placed from the seeded generator."""
        super().reset(seed=seed)
        m, d = self.model, self.data
        mujoco.mj_resetDataKeyframe(m, d, 0)
        rng = self.np_random
        peg = [rng.uniform(*scene.PEG_X), rng.uniform(*scene.PEG_Y), scene.OBJECT_Z]
        socket = [rng.uniform(*scene.SOCKET_X), rng.uniform(*scene.SOCKET_Y), scene.OBJECT_Z]
        d.qpos[self._peg_qpos:self._peg_qpos + 7] = [*peg, 1, 0, 0, 0]
        d.qpos[self._socket_qpos:self._socket_qpos + 7] = [*socket, 1, 0, 0, 0]
        d.ctrl[:] = d.qpos[:16]
        mujoco.mj_forward(m, d)
        self._steps = 0
        self._frames = None
        self._reset_done = True
        return self._observation(), self._info(self._is_success())

    def step(self, action: np.ndarray):
        if not self._reset_done:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float64).reshape(14)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action must be finite, got {action!r}")
        a = np.clip(a, self.action_space.low, self.action_space.high)
        ctrl, qpos = self.data.ctrl, self.data.qpos
        for i in range(2):
            ctrl[8 * i:8 * i + 6] = a[7 * i:7 * i + 6] + (qpos[self._arm_qpos[i]] if self.action_mode == "delta" else 0.0)
            finger = scene.FINGER_CLOSED + a[7 * i + 6] * (scene.FINGER_OPEN - scene.FINGER_CLOSED)
            ctrl[8 * i + 6], ctrl[8 * i + 7] = finger, -finger
        unstable = self._instabilities()
        mujoco.mj_step(self.model, self.data, nstep=self.substeps)
        self._steps += 1
        # MuJoCo resets a diverged simulation to its initial state (and counts a warning): end the
        # episode there rather than go on from a teleported scene
        diverged = self._instabilities() > unstable
        success = self._is_success() and not diverged
        terminated = bool(success and self.terminate_on_success)
        truncated = (self._steps >= self.max_episode_steps or diverged) and not terminated
        info = self._info(success)
        if diverged:
            info["diverged"] = True
        return self._observation(), float(success), terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """The latest camera frame (the chosen views side by side)."""
        return self._draw() if self._reset_done else None

    def close(self) -> None:
        self._views = None  # the renderer is the process's (scene.Cameras), freed at exit

    # -- internals ------------------------------------------------------------------------------
    def _instabilities(self) -> int:
        """How often MuJoCo has found a NaN or a huge position, velocity or acceleration (and reset)."""
        w = self.data.warning
        return sum(int(w[k].number) for k in (mujoco.mjtWarning.mjWARN_BADQPOS, mujoco.mjtWarning.mjWARN_BADQVEL,
                                               mujoco.mjtWarning.mjWARN_BADQACC))

    def _is_success(self) -> bool:
        """The peg touches the pin (the stock test), or its end sits in the socket within 8 mm of the pin.

        The second clause keeps a peg that rests on the pin a success on the frames where the
        contact flickers off (a stock-only test dropped ~1 in 6 held demos that way).
        """
        d = self.data
        pair = {self._peg_geom, self._pin_geom}
        if any({int(d.contact[i].geom1), int(d.contact[i].geom2)} == pair for i in range(d.ncon)):
            return True
        socket, axes = d.xpos[self._socket_body], d.xmat[self._socket_body].reshape(3, 3)
        peg_axis = d.xmat[self._peg_body].reshape(3, 3)[:, 0]
        ends = [d.xpos[self._peg_body] + sign * scene.PEG_HALF_LENGTH * peg_axis for sign in (-1.0, 1.0)]
        end = axes.T @ (min(ends, key=lambda e: np.linalg.norm(e - socket)) - socket)  # in the socket's frame
        along = abs(float(axes[:, 0] @ peg_axis)) > 0.9
        return bool(along and abs(end[1]) < scene.SOCKET_INNER and abs(end[2]) < scene.SOCKET_INNER
                    and scene.PIN_END - 0.002 <= end[0] <= scene.PIN_END + 0.008)

    def _draw(self) -> np.ndarray:
        views = self._views or scene.Cameras(self.model, self.cameras, self.image_size or 64)
        if self._views is None:
            self._views = views
        return views.draw(self.data)

    def _observation(self) -> dict[str, Any]:
        obs: dict[str, Any] = {}
        if self.image_size:
            frame = self._draw()
            if self._frames is None:
                self._frames = np.repeat(frame[None], self.render_frames, axis=0)
            else:
                self._frames[:-1] = self._frames[1:]
                self._frames[-1] = frame
            obs["rgb"] = self._frames.copy()
        obs["joints"] = self.joints().astype(np.float32)
        obs["instruction"] = INSTRUCTION
        return obs

    def _info(self, success: bool) -> dict[str, Any]:
        return {"is_success": success, "steps": self._steps, "peg_position": self.peg_position,
                "socket_position": self.socket_position}
