"""Can the frozen reward model be trusted as a success detector on the policy's own states?

``selfimprove diagnose`` runs this audit beside its tables. It replays the detector Stage 2 uses
(``d <= s`` held for ``hold`` consecutive frames, see :mod:`selfimprove.reward`) on

* the held-out demos: how often the first firing lands at the goal (recall), and how often the
  detector fires on the same frames under an instruction that asks for something else;
* rollouts of the checkpoint's policy run to the time limit (the simulator's success and block
  positions are read here, for evaluation only): how many first firings are true successes
  (precision per episode), and why the others fired: the named pair far apart, another pair of
  blocks adjacent, or the goal missed narrowly.

It ends with the gate the tabletop must pass before Stage 2 is worth running (:data:`GATE`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from selfimprove.data.episode import Episode
from selfimprove.domain_table import GOAL_DISTANCE
from selfimprove.model.inputs import from_episodes
from selfimprove.reward import StepsToGoReward, discounted_returns, held_firing, reward_model_baseline
from selfimprove.stats import spearman

NEAR = 2  # a firing followed by true success within this many steps counts as "near"
FAR_APART = 0.10  # m: the named pair is "far apart" beyond this (block2block success is < 0.05)
ADJACENT = 0.05  # m: another pair of blocks "adjacent" (what a confused detector may see as success)
#: name -> (metric, comparison, bound): the detector gate (docs/self_improvement.md)
GATE = {
    "rollout_episode_precision": (">=", 0.5),
    "demo_episode_recall": (">=", 0.4),
    "mismatched_frame_firing": ("<=", 0.02),
    "first_firings_named_pair_far": ("<=", 0.15),
}


def first_firings(d: np.ndarray, sizes: np.ndarray, threshold: float, hold: int) -> list[int | None]:
    """Per episode (consecutive rows of ``sizes`` frames), the first frame where the detector fires."""
    episode = np.repeat(np.arange(len(sizes)), sizes)
    fired = held_firing(d, episode, threshold, hold)
    out: list[int | None] = []
    start = 0
    for n in sizes:
        hits = np.flatnonzero(fired[start:start + n])
        out.append(int(hits[0]) if len(hits) else None)
        start += n
    return out


def audit_demos(held_out: dict[str, np.ndarray], threshold: float, hold: int) -> dict[str, Any]:
    """The detector on held-out demos (``d``, ``steps_to_go``, ``episode_start``, ``d_mismatched``)."""
    starts = np.asarray(held_out["episode_start"])
    sizes = np.diff(np.append(starts, len(held_out["d"])))
    firsts = first_firings(held_out["d"], sizes, threshold, hold)
    at_goal = early = 0
    for start, first in zip(starts, firsts):
        if first is None:
            continue
        if held_out["steps_to_go"][start + first] == 0:
            at_goal += 1
        else:
            early += 1
    out: dict[str, Any] = {"episodes": len(sizes), "episode_recall": at_goal / max(1, len(sizes)),
                           "fired_early": early / max(1, len(sizes))}
    if "d_mismatched" in held_out:
        episode = np.repeat(np.arange(len(sizes)), sizes)
        out["mismatched_frame_firing"] = float(held_firing(held_out["d_mismatched"], episode, threshold, hold).mean())
        firsts_wrong = first_firings(held_out["d_mismatched"], sizes, threshold, hold)
        out["mismatched_episode_firing"] = float(np.mean([f is not None for f in firsts_wrong]))
    return out


def _cause(info: dict[str, np.ndarray], t: int) -> str:
    """Why a first firing at frame ``t`` was false, from the simulator's state (diagnostics only)."""
    distance = float(info[GOAL_DISTANCE][t]) if GOAL_DISTANCE in info else float("nan")
    if distance <= FAR_APART:
        return "goal missed (named pair within 10 cm)"
    xy = info.get("block_positions")
    if xy is not None:
        gaps = np.linalg.norm(xy[t][:, None] - xy[t][None], axis=-1)
        np.fill_diagonal(gaps, np.inf)
        if gaps.min() < ADJACENT:
            return "another pair adjacent"
    return "named pair far apart"


def _mismatched_d(reward: StepsToGoReward, episodes: list[Episode], draw) -> np.ndarray:
    """The detector's score (``d`` for the ``"steps_to_go"`` detector) on every rollout frame under an
    instruction that asks for something else (one per episode)."""
    wrong = [Episode(observations=e.observations, actions=e.actions, instruction=t) for e, t in
             zip(episodes, draw([e.instruction for e in episodes]))]
    source, _ = from_episodes(wrong, reward.spec)
    return reward.score_of(source)


def audit_rollouts(episodes: list[Episode], threshold: float, hold: int, reward: StepsToGoReward | None = None,
                   draw=None) -> dict[str, Any]:
    """The detector on the policy's own rollouts (run to the time limit, ``stg`` recorded on every frame;
    the detector's own score where it reads another, ``Episode.detector``).

    ``draw`` (texts -> mismatched texts) with ``reward`` (the frozen model): also the firing rate under wrong
    instructions.
    """
    sizes = np.array([e.length + 1 for e in episodes])
    d = np.concatenate([np.asarray(e.stg if e.detector is None else e.detector, dtype=np.float64) for e in episodes])
    firsts = first_firings(d, sizes, threshold, hold)
    fired = correct = near = far = 0
    causes: dict[str, int] = {}
    has_distance = any(GOAL_DISTANCE in e.info for e in episodes)
    for e, first in zip(episodes, firsts):
        if first is None:
            continue
        fired += 1
        success = np.asarray(e.info["is_success"], dtype=bool)
        if GOAL_DISTANCE in e.info and float(e.info[GOAL_DISTANCE][first]) > FAR_APART:
            far += 1
        if success[first]:
            correct += 1
        else:
            cause = _cause(e.info, first)
            causes[cause] = causes.get(cause, 0) + 1
        if success[first:first + NEAR + 1].any():
            near += 1
    reached = sum(bool(np.asarray(e.info["is_success"]).any()) for e in episodes)
    out: dict[str, Any] = {
        "episodes": len(episodes), "true_success_rate": reached / max(1, len(episodes)),
        "fired": fired, "detected_rate": fired / max(1, len(episodes)),
        "episode_precision": correct / fired if fired else None,
        "episode_precision_near": near / fired if fired else None,
        "episode_recall": correct / reached if reached else None,
        "first_firings_named_pair_far": far / fired if fired and has_distance else None,
        "false_firings_by_cause": dict(sorted(causes.items(), key=lambda kv: -kv[1])),
    }
    if reward is not None and draw is not None and episodes:
        out["mismatched_frame_firing"] = float(held_firing(_mismatched_d(reward, episodes, draw),
                                                           np.repeat(np.arange(len(sizes)), sizes), threshold,
                                                           hold).mean())
    return out


def reward_signal(episodes: list[Episode], gamma: float, clip: float = 0.0, decay: float = 0.9,
                  d_per_episode: list[np.ndarray] | None = None) -> dict[str, Any] | None:
    """Does the shaped reward point the way the task goes, on the policy's own states? Rank correlations,
    over every acting step, of what the learner would see against the same quantity of true progress
    (the named pair's distance falling, from the simulator: diagnostics only):

    * ``step``: ``r_t`` against the distance's fall over that step;
    * ``return``: ``R_t`` (discount ``gamma``, each ``r_t`` clipped to ``clip`` when > 0) against the
      discounted return of the distance's falls;
    * ``return_with_baseline``: ``R_t`` minus :func:`~selfimprove.reward.reward_model_baseline` against the same.

    ``d_per_episode`` replaces each episode's ``stg`` (e.g. the reward's ``d`` without the "never" class).
    None when the env reports no ``goal_distance``. 0 means the learner's signal is noise on these states.
    """
    if not episodes or not all(GOAL_DISTANCE in e.info for e in episodes):
        return None
    step, progress, returns, baselined, true_returns = [], [], [], [], []
    for i, e in enumerate(episodes):
        d = np.asarray(e.stg if d_per_episode is None else d_per_episode[i], dtype=np.float64)
        distance = np.asarray(e.info[GOAL_DISTANCE], dtype=np.float64)
        r = d[:-1] - d[1:]
        if clip > 0:
            r = np.clip(r, -clip, clip)
        step.append(r)
        progress.append(distance[:-1] - distance[1:])
        R = discounted_returns(r, gamma)
        returns.append(R)
        baselined.append(R - reward_model_baseline(d, decay))
        true_returns.append(discounted_returns(progress[-1], gamma))
    cat = np.concatenate
    return {"steps": int(sum(len(x) for x in step)), "step": spearman(cat(step), cat(progress)),
            "return": spearman(cat(returns), cat(true_returns)),
            "return_with_baseline": spearman(cat(baselined), cat(true_returns))}


def gate(demos: dict[str, Any], rollouts: dict[str, Any] | None) -> dict[str, Any]:
    """Each :data:`GATE` check: its value (the worse of demos and rollouts where both have it) and pass/fail."""
    values = {"demo_episode_recall": demos.get("episode_recall")}
    wrong = [v for v in (demos.get("mismatched_frame_firing"), (rollouts or {}).get("mismatched_frame_firing"))
             if v is not None]
    values["mismatched_frame_firing"] = max(wrong) if wrong else None
    if rollouts is not None:
        values["rollout_episode_precision"] = rollouts.get("episode_precision")
        values["first_firings_named_pair_far"] = rollouts.get("first_firings_named_pair_far")
    out = {}
    for name, (op, bound) in GATE.items():
        value = values.get(name)
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[name] = {"value": value, "bound": f"{op} {bound:g}", "pass": ok}
    return out
