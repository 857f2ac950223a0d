"""Scripted bimanual insertion expert: gripper waypoints (reach, grasp, lift, meet, insert) turned into the
14 joint targets the policy uses by inverse kinematics on the arm's own model.

Each arm's grasp point (between the fingers, near their tips) follows straight-line segments between
waypoints set on the objects' live poses (privileged state, as a demonstrator may read): the left arm
takes the socket (gripper pointing 60 degrees down), the right arm the peg (80 degrees); they carry
them to a meeting point over the table, line the peg up with the socket's axis and push it in. A
damped least-squares IK (position and pitch, four joints per arm) on a scratch copy of the state
turns each waypoint into joint targets, which move at most 0.15 rad per step. Human-like variation
per episode: the meeting point, the grasp spot along each object, the approach height, the pitch,
each segment's duration, and a little joint noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from selfimprove.envs.aloha import scene
from selfimprove.envs.aloha.scene import mujoco

GRASP_OFFSET = np.array([0.13, 0.0, 0.0])  # grasp point in the gripper link's frame: between the fingers, near the tips
FINGER_TIP, FINGER_HALF_HEIGHT = 0.154, 0.031  # the fingers' far end and half height in that frame (m)
PICK_TILT = np.deg2rad([60.0, 80.0])  # how far below the horizontal each gripper points (socket, peg arm)
MAX_JOINT_STEP = 0.15  # rad per control step: targets move smoothly (a delta action stays within +-0.2)
MAX_IK_STEP = 0.2  # rad per IK iteration: far targets are approached, never jumped to
SOLVED = np.array([True, True, True, False, True, False])  # the joints the IK moves (not the two rolls)
MEET = np.array([0.0, 0.5, 0.2])  # where the objects meet (socket left of it, peg right)
SOCKET_TO_MEET = 0.08  # the socket's centre this far left of the meeting point
SOCKET_MOUTH, PIN_END, PEG_HALF_LENGTH = 0.06, 0.04, 0.06  # along the objects' axes, from their centres (m)
PEG_PRE = 0.05  # the peg's end this far out of the socket's mouth before the push
PEG_PUSH = 0.01  # ... and pushed this far past the pin's end (the pin stops it)


@dataclass
class _Arm:
    side: str
    body: int
    qpos: np.ndarray  # qpos addresses of the 6 arm joints
    dofs: np.ndarray  # dof addresses of the same
    low: np.ndarray
    high: np.ndarray


class AlohaExpert:
    """See the module docstring. ``noise``: std of the joint-target noise (rad); ``jitter``: how much the
    waypoints and timings vary between episodes (0 = the same motion every time, up to the objects)."""

    def __init__(self, noise: float = 0.003, jitter: float = 1.0) -> None:
        self.noise, self.jitter = float(noise), float(jitter)
        self._model: mujoco.MjModel | None = None

    # -- setup ------------------------------------------------------------------------------
    def _bind(self, env) -> None:
        base = env.unwrapped
        if self._model is base.model:
            return
        m = self._model = base.model
        self._scratch = mujoco.MjData(m)
        self._bodies = (m.body("socket").id, m.body("peg").id)  # what each arm picks, left then right
        self._arms = []
        for side in scene.SIDES:
            joints = [m.joint(f"vx300s_{side}/{j}") for j in scene.ARM_JOINTS]
            self._arms.append(_Arm(side, m.body(f"vx300s_{side}/gripper_link").id,
                                   np.array([j.qposadr[0] for j in joints]), np.array([j.dofadr[0] for j in joints]),
                                   np.array([j.range[0] for j in joints]), np.array([j.range[1] for j in joints])))

    def reset(self, env, rng: np.random.Generator) -> None:
        """Starts an episode: draws this episode's variation from ``rng``."""
        self._bind(env)
        base = env.unwrapped
        self._rng = rng
        j = self.jitter
        self._meet = MEET + j * rng.uniform([-0.03, -0.04, -0.03], [0.03, 0.04, 0.03])
        self._grip_along = j * rng.uniform(-0.02, 0.02, 2)  # grasp spot along each object's x (socket, peg)
        self._hover = 0.06 + j * rng.uniform(-0.015, 0.02)
        base_durations = np.array([12, 6, 4, 14, 3, 10])  # reach, descend, close, carry, line up, push
        self._ends = np.cumsum(np.maximum(2, np.round(base_durations * (1 + j * rng.uniform(-0.2, 0.2, 6))))).astype(int)
        self._t = 0
        self._segment = -1  # the first act starts segment 0 from where the grasp points are
        self._targets = [base.data.qpos[arm.qpos].copy() for arm in self._arms]  # commanded joint angles
        self._grippers = [1.0, 1.0]
        self._tilt = PICK_TILT + j * rng.uniform(-0.08, 0.08, 2)
        # per arm, the lowest grasp point whose finger tips stay 5 mm above the table
        self._floor = (FINGER_TIP - GRASP_OFFSET[0]) * np.sin(self._tilt) + FINGER_HALF_HEIGHT * np.cos(self._tilt) + 0.005

    # -- acting -----------------------------------------------------------------------------
    def act(self, env) -> np.ndarray:
        base = env.unwrapped
        data = base.data
        segment = int(np.searchsorted(self._ends, self._t, side="right"))
        if segment != self._segment:  # a new segment starts from where each grasp point is now
            self._start = [self._grasp_point(data, arm) for arm in self._arms]
            self._segment = segment
        begin = self._ends[segment - 1] if segment > 0 else 0
        end = self._ends[segment] if segment < len(self._ends) else begin + 1
        frac = min(1.0, (self._t + 1 - begin) / max(1, end - begin))
        targets, grippers = [], []
        for i, arm in enumerate(self._arms):
            goal, gripper = self._waypoint(data, segment, i)
            targets.append(self._start[i] + frac * (goal - self._start[i]))
            grippers.append(gripper)
        self._t += 1
        qpos = self._ik(data, targets)
        for i, arm in enumerate(self._arms):
            step = np.clip(qpos[arm.qpos] - self._targets[i], -MAX_JOINT_STEP, MAX_JOINT_STEP)
            self._targets[i] = self._targets[i] + step + self._rng.normal(0.0, self.noise, 6)
            self._grippers[i] = grippers[i]
        return self._action(base)

    def _action(self, base) -> np.ndarray:
        """The joint targets in the env's action mode (relative to the joints now, or absolute)."""
        action = np.empty(14)
        for i, arm in enumerate(self._arms):
            now = base.data.qpos[arm.qpos] if base.action_mode == "delta" else 0.0
            action[7 * i:7 * i + 6] = self._targets[i] - now
            action[7 * i + 6] = self._grippers[i]
        return np.clip(action, base.action_space.low, base.action_space.high).astype(np.float32)

    def hold(self, env) -> np.ndarray:
        """The action that keeps everything where it is: the last joint targets (demos' goal hold)."""
        return self._action(env.unwrapped)

    def _waypoint(self, data: mujoco.MjData, segment: int, i: int) -> tuple[np.ndarray, float]:
        """Where arm ``i``'s grasp point heads in ``segment`` and its gripper (1 open, 0 closed).

        From the carry on, the goal is set on the object, not the hand: the grasp point goes where it
        would put the object's reference point (the socket's centre, the peg's leading end) at its goal,
        with the object where it is now in the hand. A slip or a turn in the fingers is corrected as
        it happens, and the peg's end follows the socket's axis as the socket really lies.
        """
        body = self._bodies[i]
        centre = data.xpos[body]
        if segment <= 2:
            spot = centre + np.array([self._grip_along[i], 0.0, 0.0])
            spot[2] = max(spot[2], self._floor[i])
            return (spot + [0.0, 0.0, self._hover], 1.0) if segment == 0 else (spot, 1.0 if segment == 1 else 0.0)
        grasp = self._grasp_point(data, self._arms[i])
        if i == 0:  # the socket's centre goes left of the meeting point and stays there
            return grasp + (self._meet - [SOCKET_TO_MEET, 0.0, 0.0]) - centre, 0.0
        socket, axis = data.xpos[self._bodies[0]], data.xmat[self._bodies[0]].reshape(3, 3)[:, 0]
        tip = centre - data.xmat[body].reshape(3, 3)[:, 0] * PEG_HALF_LENGTH  # the peg's end nearer the socket
        if segment == 3:  # carry: the peg's end 5 cm out of where the socket's mouth will be
            goal = self._meet + [SOCKET_MOUTH - SOCKET_TO_MEET + PEG_PRE, 0.0, 0.0]
        else:  # line up on the socket's axis 5 cm out, then push the end onto the pin
            goal = socket + axis * (SOCKET_MOUTH + PEG_PRE if segment == 4 else PIN_END - PEG_PUSH)
        return grasp + goal - tip, 0.0

    # -- kinematics ---------------------------------------------------------------------------
    @staticmethod
    def _grasp_point(data: mujoco.MjData, arm: _Arm) -> np.ndarray:
        return data.xpos[arm.body] + data.xmat[arm.body].reshape(3, 3) @ GRASP_OFFSET

    def _ik(self, data: mujoco.MjData, targets: list[np.ndarray], iterations: int = 20,
            damping: float = 0.01) -> np.ndarray:
        """Joint angles that put each arm's grasp point at its target, pitched down by PICK_TILT.

        Four joints per arm (waist, shoulder, elbow, wrist angle) solve position and pitch; the forearm
        roll and the wrist rotate stay at 0, so the gripper stays in the arm's vertical plane and picks
        each object at the waist's yaw (the object turns into the fingers' line as they close).
        """
        m, d = self._model, self._scratch
        d.qpos[:] = data.qpos
        jacp, jacr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        for _ in range(iterations):
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            for arm, target, tilt in zip(self._arms, targets, self._tilt):
                point = self._grasp_point(d, arm)
                axis = d.xmat[arm.body].reshape(3, 3)[:, 0]  # the gripper's pointing direction
                err = np.append(target - point, -np.sin(tilt) - axis[2])
                mujoco.mj_jac(m, d, jacp, jacr, point, arm.body)
                cols = arm.dofs[SOLVED]
                jac = np.vstack([jacp[:, cols], jacr[0, cols] * axis[1] - jacr[1, cols] * axis[0]])
                step = jac.T @ np.linalg.solve(jac @ jac.T + damping**2 * np.eye(4), err)
                step *= min(1.0, MAX_IK_STEP / (np.abs(step).max() + 1e-12))
                idx = arm.qpos[SOLVED]
                d.qpos[idx] = np.clip(d.qpos[idx] + step, arm.low[SOLVED], arm.high[SOLVED])
                d.qpos[arm.qpos[~SOLVED]] = 0.0
        return d.qpos.copy()
