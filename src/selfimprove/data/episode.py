"""The unit of data everything speaks: one attempt at one instruction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Episode:
    """One episode: ``T`` actions and the ``T + 1`` observations around them.

    ``info`` holds per-step simulator diagnostics (e.g. ``is_success`` [T+1]); like ``true_success``
    it exists for evaluation and diagnostics only and is never read by a learner, so the same code
    runs on a real robot where it does not exist. ``stg`` holds the frozen reward model's predicted
    steps-to-go ``d(o_t, g)`` for each observation when the episode came from Self-Improvement.
    """

    observations: dict[str, np.ndarray]  # each [T+1, ...]
    actions: np.ndarray  # [T, action_dim], continuous
    instruction: str
    true_success: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    info: dict[str, np.ndarray] = field(default_factory=dict)
    stg: np.ndarray | None = None  # [T+1] predicted steps-to-go, Stage 2 only
    detector: np.ndarray | None = None  # [T+1] the success detector's score when it reads something other
    # than stg (improve.detector = "goal_probability": 1 - P(goal)); kept in memory for the diagnostics, never stored
    fused: np.ndarray | None = None  # [T+1, Z] the policy's fusion inputs, when the fleet computed them once for
    # the policy and the reward model (practice above the convs); a cache for the learner, never stored

    @property
    def length(self) -> int:
        """Number of actions (steps) in the episode."""
        return int(self.actions.shape[0])

    def validate(self) -> None:
        t = self.length
        for key, value in self.observations.items():
            if value.shape[0] != t + 1:
                raise ValueError(f"observation {key!r} has {value.shape[0]} frames; expected T+1 = {t + 1}")
        if self.stg is not None and self.stg.shape[0] != t + 1:
            raise ValueError(f"stg has {self.stg.shape[0]} entries; expected T+1 = {t + 1}")
        if self.detector is not None and self.detector.shape[0] != t + 1:
            raise ValueError(f"detector has {self.detector.shape[0]} entries; expected T+1 = {t + 1}")

