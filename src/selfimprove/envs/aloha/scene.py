"""The Aloha insertion scene, loaded from gym-aloha's MJCF and made cheap to render.

Physics is the stock scene's (ViperX meshes, contacts, gains, 2 ms time step). What changes is what
the cameras see: each arm mesh (~30k faces in all, which cost ~50 frames/s at 64x64) is drawn as the
box MuJoCo fits to it, the originals stay in the physics but move to a hidden geom group, and
shadows, reflections and multisampling are off. The 64x64 top view then draws at ~1,000 frames/s
on one core. The top camera looks straight down on the workspace (the stock one, aimed at the
table's far edge from 0.8 m, leaves the peg ~3 pixels long at 64x64).

The success test, the arms' joint layout and the start pose are the stock env's.
"""

from __future__ import annotations

import atexit
import logging
import os
import platform

from selfimprove.errors import ConfigError

#: the MuJoCo rendering backends by platform (mujoco's own list; it raises a RuntimeError at import otherwise)
_GL_BACKENDS = {"Linux": ("egl", "osmesa", "glfw", "glx"), "Windows": ("glfw", "wgl"), "Darwin": ("glfw", "cgl")}
_GL_SWITCHES = ("enable", "enabled", "on", "true", "1", "", "disable", "disabled", "off", "false", "0")
_GL_ADVICE = ("MUJOCO_GL=egl (GPU or Mesa EGL), MUJOCO_GL=osmesa (software; apt install libosmesa6) or, with a "
              "display, MUJOCO_GL=glfw; or run without cameras (env.kwargs.image_size = false)")


def check_gl_settings() -> None:
    """Raise ConfigError when ``MUJOCO_GL`` (or a ``PYOPENGL_PLATFORM`` that contradicts it) would make
    ``import mujoco`` or its first renderer fail: checked before mujoco is imported, and by every env."""
    value = os.environ.get("MUJOCO_GL", "")
    backend = value.lower().strip()
    backends = _GL_BACKENDS.get(platform.system(), ("glfw",))
    if backend not in backends + _GL_SWITCHES:
        raise ConfigError(f"MUJOCO_GL={value!r} is not a MuJoCo rendering backend; on {platform.system()} choose one "
                          f"of {list(backends)} (unset: egl): {_GL_ADVICE}")
    pyopengl = os.environ.get("PYOPENGL_PLATFORM", "")
    if backend in ("egl", "osmesa") and pyopengl and pyopengl.lower() != backend:
        raise ConfigError(f"MUJOCO_GL={value!r} but PYOPENGL_PLATFORM={pyopengl!r}: set both to the same backend "
                          f"or unset PYOPENGL_PLATFORM")


os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering without a display; read when mujoco loads
logging.getLogger("OpenGL.acceleratesupport").setLevel(logging.WARNING)  # PyOpenGL's INFO line on every import
check_gl_settings()

import numpy as np  # noqa: E402

try:
    import mujoco  # noqa: E402
except ImportError as exc:  # pragma: no cover - depends on the install
    if exc.name == "mujoco":
        raise ConfigError("the aloha domain needs the optional `aloha` extra (MuJoCo and gym-aloha's scene): "
                          "pip install 'selfimprove[aloha]'") from exc
    raise ConfigError(f"MuJoCo cannot load its MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} backend ({exc}). Try "
                      f"{_GL_ADVICE}") from exc

PHYSICS_GROUP, VISUAL_GROUP = 2, 3  # geom groups: the meshes (hidden from cameras), their box stand-ins
CAMERAS = ("top", "left_wrist", "right_wrist")
#: per arm: 6 joints (waist, shoulder, elbow, forearm roll, wrist angle, wrist rotate), 2 finger slides
ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
SIDES = ("left", "right")
START_ARM_POSE = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0])  # the stock start pose of each arm
#: finger slide position (m) at gripper 0 (closed) and 1 (open): the stock normalisation
FINGER_CLOSED, FINGER_OPEN = 0.01844, 0.05800
#: where the stock env samples the objects (x, y of the centre; z = 0.05 m on the table)
PEG_X, PEG_Y = (0.1, 0.2), (0.4, 0.6)
SOCKET_X, SOCKET_Y = (-0.2, -0.1), (0.4, 0.6)
OBJECT_Z = 0.05
#: the objects (m): the peg's half length, the pin's end and the socket's inner half width (from the socket's centre)
PEG_HALF_LENGTH, PIN_END, SOCKET_INNER = 0.06, 0.04, 0.018


def scene_path() -> str:
    """gym-aloha's bimanual insertion MJCF (joint-position actuators)."""
    try:
        from gym_aloha.constants import ASSETS_DIR
    except ImportError as exc:
        raise ConfigError("the aloha domain needs the optional `aloha` extra: pip install 'selfimprove[aloha]' "
                          "(gym-aloha with mujoco)") from exc
    return str(ASSETS_DIR / "bimanual_viperx_insertion.xml")


def build_model() -> mujoco.MjModel:
    """The stock insertion scene with box stand-ins for the arm meshes and a top-down camera."""
    spec = mujoco.MjSpec.from_file(scene_path())
    for geom in spec.worldbody.find_all(mujoco.mjtObj.mjOBJ_GEOM):
        if geom.type != mujoco.mjtGeom.mjGEOM_MESH or not geom.name.startswith("vx300s"):
            continue
        finger = "finger" in geom.name
        geom.parent.add_geom(type=mujoco.mjtGeom.mjGEOM_BOX, meshname=geom.meshname, pos=geom.pos, quat=geom.quat,
                             group=VISUAL_GROUP, contype=0, conaffinity=0, density=0,
                             rgba=[0.25, 0.25, 0.25, 1] if finger else [0.7, 0.7, 0.7, 1])
        geom.group = PHYSICS_GROUP
    for camera in spec.worldbody.find_all(mujoco.mjtObj.mjOBJ_CAMERA):
        if camera.name == "top":  # straight down on the workspace, 0.75 m up
            camera.mode = mujoco.mjtCamLight.mjCAMLIGHT_FIXED
            camera.pos = [0.0, 0.5, 0.75]
            camera.quat = [1.0, 0.0, 0.0, 0.0]
            camera.fovy = 52.0
    spec.visual.quality.offsamples = 0
    spec.visual.quality.shadowsize = 0
    return spec.compile()


class Cameras:
    """Draws the chosen cameras at ``size`` x ``size`` and tiles them side by side (one frame per step).

    Every env of a process builds the same model, so one renderer (one GL context) per image size
    serves them all: a fleet of 50 robots holds one context, not 50.
    """

    def __init__(self, model: mujoco.MjModel, names: tuple[str, ...], size: int) -> None:
        unknown = [n for n in names if n not in CAMERAS]
        if unknown or not names:
            raise ConfigError(f"env.kwargs.cameras {list(names)}: choose one or more of {list(CAMERAS)}")
        self.names, self.size = tuple(names), int(size)
        self._renderer = _renderer(model, self.size)
        self._option = mujoco.MjvOption()
        self._option.geomgroup[:] = [int(g != PHYSICS_GROUP) for g in range(len(self._option.geomgroup))]

    def draw(self, data: mujoco.MjData) -> np.ndarray:
        """[size, size * cameras, 3] uint8: the views left to right in ``names`` order."""
        views = []
        for name in self.names:
            self._renderer.update_scene(data, camera=name, scene_option=self._option)
            views.append(self._renderer.render())
        return views[0] if len(views) == 1 else np.concatenate(views, axis=1)


_RENDERERS: dict[int, "mujoco.Renderer"] = {}


def _renderer(model: mujoco.MjModel, size: int) -> "mujoco.Renderer":
    """This process's renderer for ``size`` x ``size`` frames (made on first use, freed at exit)."""
    if size not in _RENDERERS:
        try:
            renderer = mujoco.Renderer(model, size, size)
        except Exception as exc:  # mujoco raises plain Exceptions from its GL backends
            raise ConfigError(f"MuJoCo cannot render offscreen with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
                              f"({exc}). Try {_GL_ADVICE}") from exc
        if not _RENDERERS:  # after mujoco's own exit hook (EGL's terminate), so that it runs before it
            atexit.register(_close_renderers)
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        _RENDERERS[size] = renderer
    return _RENDERERS[size]


def _close_renderers() -> None:
    """Free GL contexts before the interpreter tears EGL down (else mujoco's destructors print errors)."""
    while _RENDERERS:
        renderer = _RENDERERS.popitem()[1]
        try:
            renderer.close()
        except Exception:  # another library (dm_control) terminated EGL first: nothing is left to free
            context = getattr(renderer, "_gl_context", None)
            if context is not None and hasattr(context, "_context"):
                context._context = None
            renderer._gl_context = renderer._mjr_context = None


#: The action's bounds per arm (waist, shoulder, elbow, forearm roll, wrist angle, wrist rotate, gripper).
#: ``action_mode = "delta"`` (the preset's): each joint's target relative to where the joint is now,
#: at most DELTA rad per control step (the scripted expert moves at most 0.15), and the gripper's
#: opening (0 closed, 1 open). ``"absolute"``: the targets themselves, in the box the task uses (the
#: expert's 0.5-99.5th percentiles over 200 episodes, widened a little; the two rolls stay near 0).
#: Why deltas: docs/aloha.md (the action bins).
DELTA = 0.2
DELTA_LOW = np.array([-DELTA] * 6 + [0.0], np.float32)
DELTA_HIGH = np.array([DELTA] * 6 + [1.0], np.float32)
ABSOLUTE_LOW = np.array([-0.45, -0.75, -1.6, -0.1, 0.0, -0.1, 0.0], np.float32)
ABSOLUTE_HIGH = np.array([0.45, 1.3, 1.25, 0.1, 2.234, 0.1, 1.0], np.float32)
ACTION_MODES = ("delta", "absolute")


def action_bounds(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the 14-D action (left arm, then right) in ``mode``."""
    if mode not in ACTION_MODES:
        raise ConfigError(f"env.kwargs.action_mode must be one of {list(ACTION_MODES)}, got {mode!r}")
    low, high = (DELTA_LOW, DELTA_HIGH) if mode == "delta" else (ABSOLUTE_LOW, ABSOLUTE_HIGH)
    return np.tile(low, 2), np.tile(high, 2)
