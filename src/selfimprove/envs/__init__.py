"""Gymnasium environments and their scripted experts; importing registers the ids."""

import gymnasium as gym

POINTMASS_ID = "selfimprove/PointMass-v0"
ALOHA_ID = "selfimprove/AlohaInsertion-v0"  # envs/aloha/ (the optional `aloha` extra: MuJoCo and gym-aloha's scene)


def register_envs() -> None:
    """Register every environment id of this package (idempotent)."""
    if POINTMASS_ID not in gym.registry:
        gym.register(id=POINTMASS_ID, entry_point="selfimprove.envs.pointmass:PointMassEnv",
                     max_episode_steps=100)
    if ALOHA_ID not in gym.registry:  # by name: mujoco is imported only when the env is made
        gym.register(id=ALOHA_ID, entry_point="selfimprove.envs.aloha.world:AlohaInsertionEnv")
    from selfimprove.envs.tabletop.world import register_tabletop_envs

    register_tabletop_envs()


register_envs()
