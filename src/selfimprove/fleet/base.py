"""The fleet interface: where robots live is the backend's business."""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from selfimprove.data.episode import Episode


class Fleet(Protocol):
    def collect(self, weights: dict[str, torch.Tensor], version: int, *, seeds: Iterator[int],
                n_steps: int | None = None, n_episodes: int | None = None,
                temperature: float = 1.0, generator: torch.Generator | None = None) -> list[Episode]:
        """Run the policy ``weights`` (tagged ``version``) and return finished episodes."""
        ...

    def describe(self) -> dict:
        """Where the robots run and what failed (written to the run's ``fleet.json``)."""
        ...

    def close(self) -> None: ...
