"""The fleet contract every backend keeps (``LocalFleet``, ``RayFleet``): Stage 2 and the guard talk
to robots only through it, so where robots live is the backend's business."""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

import torch

from selfimprove.data.episode import Episode


@runtime_checkable
class Fleet(Protocol):
    """Robots that run a given policy and hand back finished episodes."""

    failures: list[dict[str, Any]]  # one record per robot that crashed or hung (and was replaced)

    def collect(self, weights: dict[str, torch.Tensor], version: int, *, seeds: Iterator[int],
                n_steps: int | None = None, n_episodes: int | None = None,
                temperature: float = 1.0, generator: torch.Generator | None = None) -> list[Episode]:
        """Run the policy ``weights`` (tagged ``version``) and return finished episodes: exactly
        ``n_episodes``, or whole episodes until ``n_steps`` steps are taken (running ones are finished)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Where the robots run and what failed (written to the run's ``fleet.json``)."""
        ...

    def close(self) -> None:
        """Stop the robots (and the processes they run in)."""
        ...


@runtime_checkable
class BackgroundFleet(Fleet, Protocol):
    """A fleet that can collect while the learner trains (``improve.max_staleness >= 1``)."""

    def start(self, weights: dict[str, torch.Tensor], version: int, *, seeds: Iterator[int],
              n_steps: int | None = None, n_episodes: int | None = None,
              temperature: float = 1.0, generator: torch.Generator | None = None) -> Any:
        """Launch a collection and return a handle at once; :meth:`finish` waits for its episodes."""
        ...

    def finish(self, handle: Any) -> list[Episode]:
        ...
