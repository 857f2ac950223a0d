"""What differs between domains: the env, its expert, and how observations reach the model.

Everything else (store, trainers, reward, fleet, evaluation) is domain-agnostic and talks through
the functions here.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

import selfimprove.envs  # noqa: F401  (registers the environment ids)
from selfimprove.config import RunConfig
from selfimprove.envs.experts import Expert, make_expert
from selfimprove.errors import ConfigError
from selfimprove.model.policy import ModelSpec

# Seed ranges are disjoint so evaluation never replays a board seen in training.
DEMO_SEED_BASE = 0  # + run seed * 100_000 + episode
IMPROVE_SEED_BASE = 2_000_000_000


def make_env(config: RunConfig, **overrides: Any) -> gym.Env:
    """A gymnasium env for this run; ``overrides`` change constructor kwargs (e.g. termination)."""
    kwargs = {**config.env.kwargs, **overrides}
    try:
        return gym.make(config.env.id, max_episode_steps=config.env.max_episode_steps, **kwargs)
    except gym.error.Error as exc:
        raise ConfigError(f"cannot make environment {config.env.id!r}: {exc}. Registered selfimprove ids: "
                          f"{sorted(k for k in gym.registry if k.startswith('selfimprove/'))}") from exc
    except TypeError as exc:
        raise ConfigError(f"env.kwargs {kwargs} are not accepted by {config.env.id!r}: {exc}") from exc


def expert_for(config: RunConfig) -> Expert:
    kwargs = {"n_waypoints": config.data.expert_waypoints} if "PointMass" in config.env.id else {}
    return make_expert(config.env.id, **kwargs)


def observation_dict(obs: Any) -> dict[str, np.ndarray]:
    """A gym observation -> the named arrays that the store keeps and the model reads."""
    if isinstance(obs, dict):
        return {k: np.asarray(v) for k, v in obs.items() if k != "instruction"}
    return {"state": np.asarray(obs, dtype=np.float32)}


def model_spec(config: RunConfig, env: gym.Env) -> ModelSpec:
    """The model architecture for this run's env and model config."""
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        raise ConfigError(f"{config.env.id} has a {type(space).__name__} action space; only Box is supported")
    obs, _ = env.reset(seed=0)
    shapes = {k: list(v.shape) for k, v in observation_dict(obs).items()}
    m = config.model
    return ModelSpec(domain=config.domain, obs_shapes=shapes, action_low=[float(x) for x in space.low],
                     action_high=[float(x) for x in space.high], action_bins=m.action_bins,
                     max_steps=m.max_steps, hidden=m.hidden, layers=m.layers, dropout=m.dropout)
