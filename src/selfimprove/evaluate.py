"""Evaluation: true success rate (from the simulator) with a 95% interval, on fixed unseen seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from selfimprove.config import RunConfig
from selfimprove.data.episode import Episode
from selfimprove.domains import make_env
from selfimprove.fleet.local import LocalFleet, seed_stream
from selfimprove.model.checkpoint import load_checkpoint
from selfimprove.runlog import torch_generator
from selfimprove.stats import wilson_interval


#: a failed episode "stalled" when its last STALL_WINDOW actions take at most STALL_ACTIONS distinct
#: values: the policy pushes into something or swings between two states until the time limit (the
#: way a deterministic policy fails where sampling would have wandered out)
STALL_WINDOW, STALL_ACTIONS = 50, 3


def stalled(episode: Episode) -> bool:
    """Whether ``episode`` failed repeating a few actions over its last ``STALL_WINDOW`` steps."""
    if episode.true_success or episode.length < STALL_WINDOW:
        return False
    return len(np.unique(episode.actions[-STALL_WINDOW:], axis=0)) <= STALL_ACTIONS


def summarize_episodes(episodes: list[Episode]) -> dict[str, Any]:
    wins = sum(bool(e.true_success) for e in episodes)
    lengths = np.array([e.length for e in episodes], dtype=float)
    lo, hi = wilson_interval(wins, len(episodes))
    return {
        "success_rate": wins / len(episodes) if episodes else float("nan"),
        "ci95": [round(lo, 4), round(hi, 4)],
        "mean_episode_length": float(lengths.mean()) if len(lengths) else float("nan"),
        "eval_episodes": len(episodes),
        # share of all episodes that failed stalled (see ``stalled``)
        "stalled_rate": sum(map(stalled, episodes)) / len(episodes) if episodes else float("nan"),
    }


def evaluate(config: RunConfig, checkpoint: str | Path, episodes: int | None = None,
             temperature: float | None = None, return_episodes: bool = False) -> dict[str, Any]:
    """Roll out ``checkpoint`` on ``episodes`` fixed eval seeds; episodes end on true success.

    The eval seeds start at ``eval.seed`` (far from every training seed) and are the same for
    every checkpoint, so two policies are compared on the same boards.
    """
    model, meta = load_checkpoint(checkpoint, expect_domain=config.domain)
    n = int(episodes or config.eval.episodes)
    temp = config.eval.temperature if temperature is None else float(temperature)
    fleet = LocalFleet(lambda: make_env(config, terminate_on_success=True), model.spec,
                       min(config.eval.robots, n))
    try:
        rollouts = fleet.collect(model.state_dict(), version=int(meta.get("iteration", 0)),
                                 seeds=seed_stream(config.eval.seed), n_episodes=n, temperature=temp,
                                 generator=torch_generator(config.eval.seed, 7))
    finally:
        fleet.close()
    rollouts.sort(key=lambda e: e.meta["seed"])
    result = {**summarize_episodes(rollouts), "temperature": temp, "checkpoint": str(checkpoint)}
    if return_episodes:
        result["episodes"] = rollouts
    return result
