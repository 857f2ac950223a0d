"""Continuous actions <-> discrete tokens: uniform bins per action dimension.

Bin ``k`` of a dimension stands for ``low + k * (high - low) / (bins - 1)``, so both bounds are
exactly representable and ``detokenize(tokenize(a))`` is within half a bin of ``a`` (clipped to
the bounds); ``tokenize(detokenize(k)) == k`` exactly.
"""

from __future__ import annotations

import numpy as np
import torch


class ActionTokenizer:
    def __init__(self, low: np.ndarray | list[float], high: np.ndarray | list[float], bins: int) -> None:
        self.low = np.asarray(low, dtype=np.float64).reshape(-1)
        self.high = np.asarray(high, dtype=np.float64).reshape(-1)
        if self.low.shape != self.high.shape or np.any(self.high <= self.low):
            raise ValueError(f"action bounds must satisfy low < high per dimension, got {self.low} / {self.high}")
        if bins < 2:
            raise ValueError(f"need at least 2 bins per action dimension, got {bins}")
        self.bins = int(bins)
        self.step = (self.high - self.low) / (self.bins - 1)

    @property
    def action_dim(self) -> int:
        return int(self.low.shape[0])

    def centers(self) -> np.ndarray:
        """[action_dim, bins] value of every token."""
        return self.low[:, None] + np.arange(self.bins)[None, :] * self.step[:, None]

    def tokenize(self, actions: np.ndarray) -> np.ndarray:
        """[..., action_dim] continuous -> [..., action_dim] int64 tokens (nearest bin, clipped)."""
        a = np.clip(np.asarray(actions, dtype=np.float64), self.low, self.high)
        return np.rint((a - self.low) / self.step).astype(np.int64)

    def detokenize(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """[..., action_dim] tokens -> [..., action_dim] float32 bin centres."""
        t = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if t.size and (t.min() < 0 or t.max() >= self.bins):
            raise ValueError(f"action tokens must lie in [0, {self.bins - 1}]")
        return (self.low + t * self.step).astype(np.float32)
