"""Guarding Self-Improvement against reward hacking, without the simulator's success.

The frozen detector ``d(o, g) <= s`` can fire on states that are not successes, and the policy then
learns to reach them: true success can peak and fall while the detected success stays high. This
module measures, from the frozen reward model alone, how much each detected success can be
trusted, and keeps the policy that scores best on a fixed set of held-out validation boards
(``checkpoints/best``).

Signals at the frame where the detector fired (per episode):
- ``d``, ``std``, ``entropy``, ``p_fire``: the frozen steps-to-go distribution there (its mean, spread,
  entropy and the probability mass at or below ``s``);
- ``d_view``: ``d`` of the same frame under a label-preserving view change (a left-right mirror of the
  board), which a true success survives and a spurious one often does not;
- ``d_policy``: the current policy trunk's own steps-to-go head (it drifts as the trunk is trained).

Nothing here reads ``true_success`` or ``info``: episodes are blinded (:func:`blind`) before they
are scored, as on a real robot where the simulator's flag does not exist.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from selfimprove.data.episode import Episode
from selfimprove.domains import mirror_instruction, shift_tabletop
from selfimprove.model.inputs import from_episodes
from selfimprove.model.policy import EmbodiedModel
from selfimprove.reward import StepsToGoReward

log = logging.getLogger(__name__)

# Validation boards: disjoint from demo seeds (0 + seed * 100_000 + i), eval seeds (eval.seed, 1e6 + i)
# and practice seeds (IMPROVE_SEED_BASE = 2e9 + seed * 1e8 + iteration * 1e5 + i).
GUARD_SEED_BASE = 1_500_000_000


def blind(episode: Episode) -> Episode:
    """A copy without the simulator's success (``true_success`` and ``info``): what a real robot has."""
    return replace(episode, true_success=None, info={})


def _mirror_tabletop_view(obs: dict) -> dict:
    """The board mirrored left-right (image columns, y coordinates, 'left'/'right'), as SFT augments."""
    out = dict(obs)
    out["image"] = obs["image"].flip(-2)
    for key in ("effector", "effector_target"):
        if key in obs:
            v = obs[key].clone()
            v[:, 1] = -v[:, 1]
            out[key] = v
    out["instruction"] = [mirror_instruction(t) for t in obs["instruction"]]
    return out


def _mirror_pointmass_view(obs: dict) -> dict:
    """The point mass mirrored about y = 0 (walls and goal region are symmetric): y, vy, gy flip."""
    out = dict(obs)
    state = obs["state"].clone()
    state[:, [1, 3, 5]] = -state[:, [1, 3, 5]]
    out["state"] = state
    return out


VIEWS: dict[str, Callable[[dict], dict]] = {"language-table": _mirror_tabletop_view,
                                             "pointmass": _mirror_pointmass_view}


def _shift_tabletop_view(seed: int, max_pixels: int = 3) -> Callable[[dict], dict]:
    """The scene translated by a few pixels (image and coordinates together), as SFT augments."""
    def view(obs: dict) -> dict:
        rows = torch.ones(len(obs["instruction"]), dtype=torch.bool)
        dummy = torch.zeros(len(rows), 2, dtype=torch.long)
        return shift_tabletop(obs, dummy, 3, rows, max_pixels, torch.Generator().manual_seed(seed))[0]
    return view


def views_for(domain: str, shifts: int = 0) -> list[Callable[[dict], dict]]:
    """Label-preserving view changes of ``domain``: the mirror first, then ``shifts`` random shifts."""
    views = [VIEWS[domain]] if domain in VIEWS else []
    if domain == "language-table":
        views += [_shift_tabletop_view(j) for j in range(shifts)]
    return views


@torch.no_grad()
def fire_frame_signals(reward: StepsToGoReward, episodes: list[Episode], policy: EmbodiedModel | None = None,
                       views: list[Callable[[dict], dict]] | None = None, batch_size: int = 256
                       ) -> dict[str, np.ndarray]:
    """Per-episode signals at each episode's last frame (where the detector fired, if it did).

    ``detected`` comes from ``meta["ended_by"]``; ``d``, ``std``, ``entropy``, ``p_fire`` from the
    frozen model; ``d_views`` [n, len(views)] is ``d`` under each view change and ``d_policy`` the
    policy's own steps-to-go head (NaN when not given). ``max_drop`` / ``last_drop`` are the largest
    and the last one-step fall of the recorded ``d`` (``episode.stg``). Episodes must be blinded.
    """
    for e in episodes:
        if e.true_success is not None or e.info:
            raise ValueError("fire_frame_signals takes blinded episodes (see guard.blind): the guard must not "
                             "see the simulator's success")
    views = list(views or [])
    n = len(episodes)
    out = {k: np.full(n, np.nan, dtype=np.float64)
           for k in ("d", "std", "entropy", "p_fire", "d_policy", "max_drop", "last_drop")}
    out["d_views"] = np.full((n, len(views)), np.nan, dtype=np.float64)
    out["detected"] = np.array([e.meta.get("ended_by") == "detector" for e in episodes], dtype=bool)
    out["length"] = np.array([e.length for e in episodes], dtype=np.int64)
    for i, e in enumerate(episodes):
        if e.stg is not None and len(e.stg) > 1:
            drops = np.asarray(e.stg[:-1], dtype=np.float64) - np.asarray(e.stg[1:], dtype=np.float64)
            out["max_drop"][i], out["last_drop"][i] = np.nanmax(drops), drops[-1]
    if n == 0:
        return out
    model = reward.model
    values = model.stg_values.double()
    for lo in range(0, n, batch_size):
        chunk = episodes[lo:lo + batch_size]
        source, _ = from_episodes(chunk, model.spec)
        last = torch.as_tensor(np.cumsum([e.length + 1 for e in chunk]) - 1)
        obs = source.obs(last)
        probs = torch.softmax(model.steps_to_go_distribution(obs).double(), -1)
        mean = probs @ values
        sl = slice(lo, lo + len(chunk))
        out["d"][sl] = mean.numpy()
        out["std"][sl] = torch.sqrt((probs * (values[None] - mean[:, None]) ** 2).sum(-1)).numpy()
        out["entropy"][sl] = (-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)).numpy()
        out["p_fire"][sl] = probs[:, values <= reward.threshold].sum(-1).numpy()
        for j, view in enumerate(views):
            out["d_views"][sl, j] = model.expected_steps_to_go(view(obs)).double().numpy()
        if policy is not None:
            out["d_policy"][sl] = policy.expected_steps_to_go(obs).double().numpy()
    return out

def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties; NaN pairs dropped; NaN if undefined)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return float("nan")

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
