"""The interface of the scripted demonstrators that make the Stage-1 datasets (each world ships its own:
``envs/pointmass.py``, ``envs/tabletop/expert.py``; the domain table names them).

Every expert has the interface ``reset(env, rng)`` then ``act(env) -> action``; it may read
privileged simulator state from ``env.unwrapped`` (a demonstrator is allowed to, a policy is not).
An expert whose actions carry deliberate perturbations (noise, detours) may also keep ``intended``:
the action its last ``act`` meant before them, which ``data.expert_labels = "intended"`` records as
the label while the perturbed action still moves the board (DART-style recovery data).
"""

from __future__ import annotations

from typing import Protocol

import gymnasium as gym
import numpy as np


class Expert(Protocol):
    def reset(self, env: gym.Env, rng: np.random.Generator) -> None: ...

    def act(self, env: gym.Env) -> np.ndarray: ...
