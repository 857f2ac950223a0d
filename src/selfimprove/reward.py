"""Stage 2's reward and success detector, both from a FROZEN steps-to-go model.

``r_t = d(o_t, g) - d(o_{t+1}, g)`` and ``success(o, g) = [d(o, g) <= s]``. The model is put in
eval mode with gradients off and is never handed to an optimizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from selfimprove.model.checkpoint import load_checkpoint
from selfimprove.model.inputs import FrameSource
from selfimprove.model.policy import EmbodiedModel, ModelSpec

log = logging.getLogger(__name__)


class StepsToGoReward:
    """The frozen model as reward ``d(o_t) - d(o_{t+1})`` and success detector.

    The detector fires once ``d <= s`` has held on ``hold`` consecutive observations
    (``improve.success_hold``; LanguageTable's delayed reward): a single optimistic frame, the most
    common false success, does not end an episode.
    """

    def __init__(self, model: EmbodiedModel, threshold: float, hold: int = 1) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.threshold = float(threshold)
        if hold < 1:
            raise ValueError(f"hold must be >= 1 consecutive steps, got {hold}")
        self.hold = int(hold)

    @classmethod
    def from_checkpoint(cls, path: str | Path, threshold: float, expect_domain: str | None = None,
                        hold: int = 1) -> "StepsToGoReward":
        model, _ = load_checkpoint(path, expect_domain=expect_domain)
        return cls(model, threshold, hold)

    @property
    def spec(self) -> ModelSpec:
        """The reward model's own input spec (its frames and observation keys, not the policy's)."""
        return self.model.spec

    @torch.no_grad()
    def steps_to_go(self, obs: dict[str, torch.Tensor], reachable: bool = False) -> np.ndarray:
        """d(o, g) for a batch of observations, as float32 numpy [B] (``reachable``: see
        :meth:`EmbodiedModel.expected_steps_to_go`)."""
        return self.model.expected_steps_to_go(obs, reachable).numpy().astype(np.float32)

    def steps_to_go_of(self, source: FrameSource, chunk: int = 1024, reachable: bool = False) -> np.ndarray:
        """d(o, g) on every row of ``source`` (stored frames with their history), in chunks."""
        n = len(source.frame_index)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([self.steps_to_go(source.obs(torch.arange(i, min(i + chunk, n))), reachable)
                               for i in range(0, n, chunk)])

    @staticmethod
    def reward(d_t: np.ndarray, d_next: np.ndarray) -> np.ndarray:
        return np.asarray(d_t, dtype=np.float32) - np.asarray(d_next, dtype=np.float32)

    def is_success(self, d: np.ndarray | float) -> np.ndarray:
        """``d <= s`` for each observation (one frame's verdict; see :meth:`detects`)."""
        return np.asarray(d) <= self.threshold

    def detects(self, d_history: Sequence[float]) -> bool:
        """The detector's verdict after the latest step: ``d <= s`` on each of the last ``hold`` observations."""
        if len(d_history) < self.hold:
            return False
        return bool(np.all(np.asarray(d_history[-self.hold:]) <= self.threshold))


def episode_ids(episode_start: np.ndarray, n: int) -> np.ndarray:
    """Per row of ``n`` consecutive frames, the index of its episode (from each episode's first row)."""
    return np.cumsum(np.isin(np.arange(n), episode_start)) - 1


def held_firing(d: np.ndarray, episode: np.ndarray, threshold: float, hold: int = 1) -> np.ndarray:
    """Per frame: would the detector fire here, i.e. ``d <= s`` on this frame and the ``hold - 1``
    frames before it in the same episode (rows of one episode consecutive, in order)."""
    fired = np.asarray(d) <= threshold
    out = fired.copy()
    episode = np.asarray(episode)
    for lag in range(1, hold):
        prev = np.zeros_like(fired)
        prev[lag:] = fired[:-lag] & (episode[lag:] == episode[:-lag])
        out &= prev
    return out


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Monte Carlo returns ``R_t = sum_i gamma^(i-t) r_i`` within one episode."""
    out = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out.astype(np.float32)


def past_average(d: np.ndarray, decay: float) -> np.ndarray:
    """``b_t = decay * b_{t-1} + (1 - decay) * d_t`` (``b_0 = d_0``): the level of ``d`` over the frames up
    to ``t``, none after it."""
    out = np.empty(len(d), dtype=np.float64)
    level = float(d[0]) if len(d) else 0.0
    for t, value in enumerate(np.asarray(d, dtype=np.float64)):
        level = decay * level + (1.0 - decay) * value
        out[t] = level
    return out.astype(np.float32)


def reward_model_baseline(d: np.ndarray, decay: float) -> np.ndarray:
    """The baseline ``d(o_t) - past_average(d)_t`` of each acting step ``t`` (``d`` over ``T + 1`` frames).

    ``R_t`` of the shaped reward telescopes to ``d(o_t)`` minus a discounted average of the ``d`` that
    follow, so one frame's noise in ``d(o_t)`` enters every advantage whole, although it cannot depend on
    ``a_t``. Subtracting it and adding back the level of ``d`` up to ``t`` leaves "the near future's ``d``
    against the recent past's": a function of frames before the action only, so the gradient stays
    unbiased, with far less noise (docs/self_improvement.md).
    """
    d = np.asarray(d, dtype=np.float32)
    return (d - past_average(d, decay))[:-1]


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


# The thresholds ``s`` the calibration chooses from (steps): fine below a few steps, where it matters.
THRESHOLD_GRID = np.round(np.arange(0.25, 20.01, 0.25), 2)
THRESHOLD_RULE = ("max F1 of d <= s against the goal frames of held-out demos, over s = 0.25, 0.5, ..., 20; "
                  "ties go to the smaller s")
PRECISION_RULE = ("the largest s = 0.25, 0.5, ..., 20 whose detector (d <= s held for {hold} steps) reaches a "
                  "per-frame precision of {target:g} on held-out demos plus the same frames under mismatched "
                  "instructions (positives: frames at the goal; negatives: frames more than {near} steps from it "
                  "and every mismatched frame)")
NEAR_GOAL = 2  # frames this close to the goal are neither positives nor negatives of the precision rule


def recommend_threshold(d: np.ndarray, is_goal_frame: np.ndarray) -> dict[str, Any]:
    """The ``"f1"`` rule: the ``s`` with the highest F1 of ``d <= s`` against held-out goal frames.

    It uses only what a real robot has (every demo ends where its goal was reached) and it favours
    recall: the frame one step before the goal counts as a false positive although stopping there
    costs one step. On the policy's own states that recall is bought with false successes (the
    tabletop's measured failure), so :func:`precision_threshold` is the rule the tabletop preset uses.
    """
    table = detector_table(d, is_goal_frame, THRESHOLD_GRID)
    best = max(table, key=lambda r: (r["f1"], -r["threshold"]))
    return {"threshold": best["threshold"], "rule": THRESHOLD_RULE, "table": table,
            "at_grid_edge": best["threshold"] == float(THRESHOLD_GRID[-1])}


def precision_threshold(d: np.ndarray, steps_to_go: np.ndarray, episode: np.ndarray, target: float,
                        hold: int = 1, d_mismatched: np.ndarray | None = None) -> dict[str, Any]:
    """The ``"precision"`` rule (see :data:`PRECISION_RULE`): a false success ends an episode and pays
    the whole remaining steps-to-go at once, a missed one only makes the episode longer.

    ``d`` and ``steps_to_go`` are per held-out demo frame (``episode`` ids, consecutive rows);
    ``d_mismatched`` is ``d`` on the same frames under an instruction that asks for something else
    (one per episode), or None for a model without that training. When no ``s`` reaches the target
    the most precise one is taken and ``target_met`` is False.
    """
    steps_to_go = np.asarray(steps_to_go)
    positive, far = steps_to_go <= 0, steps_to_go > NEAR_GOAL
    rows = []
    for s in THRESHOLD_GRID:
        fired = held_firing(d, episode, s, hold)
        tp, fp = int(np.sum(fired & positive)), int(np.sum(fired & far))
        fp_mismatched = int(held_firing(d_mismatched, episode, s, hold).sum()) if d_mismatched is not None else 0
        fired_total = tp + fp + fp_mismatched
        rows.append({"threshold": float(s), "precision": tp / fired_total if fired_total else float("nan"),
                     "recall": tp / max(1, int(positive.sum())), "true_positives": tp, "false_positives": fp,
                     "false_positives_mismatched": fp_mismatched})
    ok = [r for r in rows if r["true_positives"] and r["precision"] >= target]
    if ok:
        best = max(ok, key=lambda r: r["threshold"])
    else:
        scored = [r for r in rows if r["true_positives"]] or rows
        best = max(scored, key=lambda r: (np.nan_to_num(r["precision"]), -r["threshold"]))
    return {"threshold": best["threshold"], "rule": PRECISION_RULE.format(hold=hold, target=target, near=NEAR_GOAL),
            "table": rows, "target_met": bool(ok), "precision": best["precision"], "recall": best["recall"],
            "at_grid_edge": best["threshold"] == float(THRESHOLD_GRID[-1])}


def calibrate_threshold(held_out: dict[str, np.ndarray], rule: str = "f1", target: float = 0.9,
                        hold: int = 1) -> dict[str, Any]:
    """Choose ``s`` on the frozen model's pass over held-out demos (``held_out``: ``d``, ``goal_frame``,
    ``steps_to_go``, ``episode_start`` and, when the model was trained with negatives,
    ``d_mismatched``), by the ``"f1"`` or the ``"precision"`` rule. The one place ``s`` is chosen:
    Stage 2 and ``selfimprove diagnose`` both call it."""
    if rule == "f1":
        choice = recommend_threshold(held_out["d"], held_out["goal_frame"])
    elif rule == "precision":
        episode = episode_ids(held_out["episode_start"], len(held_out["d"]))
        choice = precision_threshold(held_out["d"], held_out["steps_to_go"], episode, target, hold,
                                     held_out.get("d_mismatched"))
        if not choice["target_met"]:
            log.warning("no success threshold reaches precision %.2f on held-out demos and mismatched instructions; "
                        "taking the most precise one, s = %g (precision %.3f)", target, choice["threshold"],
                        choice["precision"])
    else:
        raise ValueError(f"unknown threshold rule {rule!r}; use 'f1' or 'precision'")
    if not any(r.get("f1", 0) > 0 or r.get("true_positives", 0) > 0 for r in choice["table"]):
        log.warning("the steps-to-go head does not separate goal frames on held-out demos (no threshold "
                    "fires on them); Stage 2 will see no detected success. Train Stage 1 longer.")
    if choice["at_grid_edge"]:
        log.warning("the calibrated success threshold s = %g is the largest on the grid; d may be poorly "
                    "calibrated (check `selfimprove diagnose`) or fix improve.success_threshold", choice["threshold"])
    return choice
