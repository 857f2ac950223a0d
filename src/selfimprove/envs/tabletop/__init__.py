"""LanguageTable-style planar pushing world: pymunk physics, a fast top-down renderer, gymnasium API.

The original (PyBullet + xArm6 + a 180x320 camera) runs ~27 steps/s on one core; a 2-D world with
the same workspace, blocks, action space and instructions runs two orders of magnitude faster,
which is what makes on-policy self-improvement affordable on a CPU. See docs/tabletop.md for
every difference from the original.

- ``board.py``: the original's workspace and physical constants, the objects' shapes and colours
- ``render.py``: the top-down renderer
- ``world.py``: ``TabletopEnv`` (physics, observations, success, reset-free support) and its gymnasium ids
- ``tasks.py``: the instruction families (BananaTable's too), their sampling, success tests and grammar
- ``expert.py``: the scripted pushing expert that makes the demonstrations
"""

from selfimprove.envs.tabletop.world import ENV_IDS, TabletopEnv, register_tabletop_envs

__all__ = ["ENV_IDS", "TabletopEnv", "register_tabletop_envs"]
