"""Stage 2's reward and success detector, both from a FROZEN steps-to-go model.

``r_t = d(o_t, g) - d(o_{t+1}, g)`` and ``success(o, g) = [d(o, g) <= s]``. The model is put in
eval mode with gradients off and is never handed to an optimizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfimprove.model.checkpoint import load_checkpoint
from selfimprove.model.policy import EmbodiedModel


class StepsToGoReward:
    def __init__(self, model: EmbodiedModel, threshold: float) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.threshold = float(threshold)

    @classmethod
    def from_checkpoint(cls, path: str | Path, threshold: float, expect_domain: str | None = None
                        ) -> "StepsToGoReward":
        model, _ = load_checkpoint(path, expect_domain=expect_domain)
        return cls(model, threshold)

    @torch.no_grad()
    def steps_to_go(self, obs: dict[str, torch.Tensor]) -> np.ndarray:
        """d(o, g) for a batch of observations, as float32 numpy [B]."""
        return self.model.expected_steps_to_go(obs).numpy().astype(np.float32)

    @staticmethod
    def reward(d_t: np.ndarray, d_next: np.ndarray) -> np.ndarray:
        return np.asarray(d_t, dtype=np.float32) - np.asarray(d_next, dtype=np.float32)

    def is_success(self, d: np.ndarray | float) -> np.ndarray:
        return np.asarray(d) <= self.threshold


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Monte Carlo returns ``R_t = sum_i gamma^(i-t) r_i`` within one episode."""
    out = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out.astype(np.float32)


def detector_table(d: np.ndarray, positive: np.ndarray, thresholds: np.ndarray | None = None
                   ) -> list[dict[str, Any]]:
    """Precision/recall/F1 of ``d <= s`` against boolean labels, for each threshold ``s``."""
    d = np.asarray(d, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if thresholds is None:
        thresholds = np.array([0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10])
    rows = []
    for s in thresholds:
        fired = d <= s
        tp = int(np.sum(fired & positive))
        fp = int(np.sum(fired & ~positive))
        fn = int(np.sum(~fired & positive))
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        rows.append({"threshold": float(s), "precision": precision, "recall": recall, "f1": f1,
                     "fired": int(fired.sum()), "positives": int(positive.sum())})
    return rows


def calibrate_threshold(d: np.ndarray, is_goal_frame: np.ndarray) -> tuple[float, list[dict[str, Any]]]:
    """Pick ``s`` maximising F1 of ``d <= s`` against the goal-reached frames of held-out demos.

    Uses only what a real robot has: the last frame of each demo is where the goal was achieved.
    """
    grid = np.round(np.arange(0.25, 10.01, 0.25), 2)
    table = detector_table(d, is_goal_frame, grid)
    best = max(table, key=lambda r: (r["f1"], -r["threshold"]))
    return best["threshold"], table
