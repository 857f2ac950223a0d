"""The numbers of a diagnosis: ``d`` against true steps-to-go, and ``d <= s`` as a detector.

On a :class:`FrameSet` (whole episodes of held-out demos or policy rollouts, with the model's ``d``
and the simulator's labels): the calibration and error-by-horizon tables, the rank order of ``d``
in time per episode, the detector per frame (with PR/ROC curves) and per episode (the first firing,
as Stage 2 uses it), and the other threshold rules the report compares. Arrays in, tables out; rank
correlations come from :mod:`selfimprove.stats`, the detector's frame table from
:mod:`selfimprove.reward`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from selfimprove.reward import REPORT_PROBABILITIES, THRESHOLD_GRID, detector_table
from selfimprove.stats import spearman

# true steps-to-go ranges (inclusive) of the error-by-horizon table
HORIZONS = [(0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 200), (201, 500), (501, 10_000)]
REPORT_THRESHOLDS = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10)  # rows of the report's tables
CURVE_POINTS = 200  # points of each stored PR/ROC curve
NEAR_STEPS = 2  # "near" success: a true success within this many steps after the detector fires


@dataclass
class FrameSet:
    """Frames of whole episodes, in order, with the model's ``d`` and the diagnostic labels."""

    d: np.ndarray  # [N] predicted steps-to-go
    success: np.ndarray  # [N] simulator's success flag at the frame (diagnostics only)
    true_stg: np.ndarray  # [N] true steps-to-go, NaN where undefined
    time: np.ndarray  # [N] frame index within the episode
    starts: np.ndarray  # [E] first row of each episode
    sizes: np.ndarray  # [E] frames (T + 1) of each episode

    def episodes(self) -> list[slice]:
        return [slice(int(a), int(a + n)) for a, n in zip(self.starts, self.sizes)]


def value_order(frames: FrameSet, up_to_success: bool) -> list[float]:
    """Per episode: Spearman of ``d`` against time (-1: ``d`` falls at every step, as a value should).

    With ``up_to_success`` an episode that reached the goal counts only up to its first success.
    """
    out = []
    for sl in frames.episodes():
        d = frames.d[sl]
        if up_to_success and frames.success[sl].any():
            d = d[:int(np.argmax(frames.success[sl])) + 1]
        out.append(spearman(d, np.arange(len(d))))
    return out


def _summary(values: list[float]) -> dict[str, Any]:
    v = np.asarray([x for x in values if not math.isnan(x)])
    if not len(v):
        return {"episodes": 0, "mean": None, "median": None, "q10": None, "q90": None, "values": []}
    return {"episodes": int(len(v)), "mean": float(v.mean()), "median": float(np.median(v)),
            "q10": float(np.quantile(v, 0.1)), "q90": float(np.quantile(v, 0.9)),
            "values": [round(float(x), 4) for x in v]}


def calibration_table(d: np.ndarray, true_stg: np.ndarray) -> list[dict[str, Any]]:
    """Mean and spread of predicted ``d`` for each true steps-to-go (frames where it is defined)."""
    ok = ~np.isnan(true_stg)
    d, true = d[ok], true_stg[ok].astype(np.int64)
    rows = []
    for k in np.unique(true):
        sel = d[true == k]
        rows.append({"true_steps_to_go": int(k), "frames": int(len(sel)), "mean_d": float(sel.mean()),
                     "std_d": float(sel.std()), "mae": float(np.abs(sel - k).mean())})
    return rows


def horizon_table(d: np.ndarray, true_stg: np.ndarray) -> list[dict[str, Any]]:
    """Mean absolute error (and bias) of ``d`` per range of true steps-to-go."""
    ok = ~np.isnan(true_stg)
    d, true = d[ok], true_stg[ok]
    rows = []
    for lo, hi in HORIZONS:
        sel = (true >= lo) & (true <= hi)
        if sel.any():
            err = d[sel] - true[sel]
            rows.append({"horizon": f"{lo}" if lo == hi else f"{lo}-{hi}", "lo": lo, "hi": hi,
                         "frames": int(sel.sum()), "mean_true": float(true[sel].mean()),
                         "mean_d": float(d[sel].mean()), "mae": float(np.abs(err).mean()), "bias": float(err.mean())})
    return rows


def frame_curve(d: np.ndarray, positive: np.ndarray) -> dict[str, Any]:
    """Precision, recall and false-positive rate of ``d <= s`` for every ``s``, with ROC AUC and AP.

    Exact over all distinct ``d``; the stored curve keeps about :data:`CURVE_POINTS` of them.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    out: dict[str, Any] = {"frames": int(len(d)), "positives": n_pos, "roc_auc": None, "average_precision": None,
                           "threshold": [], "precision": [], "recall": [], "fpr": []}
    if not len(d):
        return out
    order = np.argsort(d, kind="stable")
    ds, pos = np.asarray(d)[order], positive[order]
    last = np.append(np.flatnonzero(np.diff(ds)), len(ds) - 1)  # last row of each distinct threshold
    tp, fp = np.cumsum(pos)[last], np.cumsum(~pos)[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos if n_pos else np.full(len(tp), np.nan)
    fpr = fp / n_neg if n_neg else np.full(len(fp), np.nan)
    if n_pos and n_neg:
        out["roc_auc"] = float(np.trapezoid(np.append(0.0, recall), np.append(0.0, fpr)))
    if n_pos:
        out["average_precision"] = float(np.sum(np.diff(np.append(0.0, recall)) * precision))
    keep = np.unique(np.linspace(0, len(last) - 1, min(len(last), CURVE_POINTS)).round().astype(int))
    out.update(threshold=ds[last][keep].tolist(), precision=precision[keep].tolist(),
               recall=recall[keep].tolist(), fpr=fpr[keep].tolist())
    return out


def episode_table(frames: FrameSet, thresholds: np.ndarray) -> list[dict[str, Any]]:
    """The detector as Stage 2 uses it: does the FIRST frame with ``d <= s`` show a true success?

    Per ``s``: ``fired`` episodes (the detector would end them), ``correct`` (truly successful at that
    frame), ``early`` (fired before the first true success of an episode that later succeeds),
    precision = correct / fired, recall = correct / episodes that truly succeed at some frame, and
    fpr = fired / episodes that never succeed. ``steps_early_median``: how many steps before the first
    success the early firings came (a detector at ``s`` steps tends to fire about ``s`` steps early);
    ``precision_near``/``recall_near`` also count a firing correct when a true success follows within
    :data:`NEAR_STEPS` steps (``d`` cannot resolve single steps near the goal, see the horizon table).
    """
    episodes = frames.episodes()
    reached = np.array([frames.success[sl].any() for sl in episodes])
    first_success = np.array([int(np.argmax(frames.success[sl])) if r else -1 for sl, r in zip(episodes, reached)])
    min_d = [np.minimum.accumulate(frames.d[sl]) for sl in episodes]
    rows = []
    for s in thresholds:
        fired = correct = near = fired_negative = 0
        early: list[int] = []
        for sl, run_min, ok, first in zip(episodes, min_d, reached, first_success):
            hit = int(np.searchsorted(-run_min, -s))  # first frame with d <= s (running min is non-increasing)
            if hit >= len(run_min):
                continue
            fired += 1
            if frames.success[sl][hit:hit + NEAR_STEPS + 1].any():
                near += 1
            if frames.success[sl][hit]:
                correct += 1
            elif ok and hit < first:
                early.append(first - hit)
            if not ok:
                fired_negative += 1
        n_pos, n_neg = int(reached.sum()), int((~reached).sum())
        rows.append({"threshold": float(s), "fired": fired, "correct": correct, "early": len(early),
                     "steps_early_median": float(np.median(early)) if early else None,
                     "precision": correct / fired if fired else None,
                     "recall": correct / n_pos if n_pos else None,
                     "fpr": fired_negative / n_neg if n_neg else None,
                     "precision_near": near / fired if fired else None,
                     "recall_near": near / n_pos if n_pos else None,
                     "episodes": len(episodes), "successful_episodes": n_pos})
    return rows


def _at(rows: list[dict[str, Any]], s: float) -> dict[str, Any]:
    return next(r for r in rows if abs(r["threshold"] - s) < 1e-9)


def alternatives(table: list[dict[str, Any]]) -> dict[str, float | None]:
    """What other common rules would pick on the same demo table (for the report; not used by Stage 2)."""
    def f_beta(r: dict[str, Any], beta: float) -> float:
        p, q = r["precision"], r["recall"]
        if not r["fired"] or not p or not q or math.isnan(p) or math.isnan(q):
            return 0.0
        return (1 + beta ** 2) * p * q / (beta ** 2 * p + q)

    out: dict[str, float | None] = {}
    for beta in (0.5, 2.0):
        best = max(table, key=lambda r: (f_beta(r, beta), -r["threshold"]))
        out[f"max_f{beta:g}"] = best["threshold"] if f_beta(best, beta) > 0 else None
    for target in (0.5, 0.9):
        ok = [r["threshold"] for r in table if r["fired"] and r["precision"] >= target]
        out[f"largest_s_with_precision_{target:g}"] = max(ok) if ok else None
    return out


def _section(frames: FrameSet, s: float, goal_frame: np.ndarray | None, score: np.ndarray | None = None,
             grid: np.ndarray = THRESHOLD_GRID) -> dict[str, Any]:
    """Every table for one set of episodes (demos or rollouts). ``score``: the detector's score per frame
    when it reads something other than ``d`` (its tables then replay it on ``grid``; the steps-to-go
    tables still read ``d``)."""
    defined = ~np.isnan(frames.true_stg)
    thresholds = np.union1d(grid, REPORT_THRESHOLDS if np.array_equal(grid, THRESHOLD_GRID) else REPORT_PROBABILITIES)
    det = frames if score is None else dataclasses.replace(frames, d=np.asarray(score, dtype=np.float64))
    section: dict[str, Any] = {
        "episodes": int(len(frames.starts)), "frames": int(len(frames.d)),
        "frames_with_true_steps_to_go": int(defined.sum()),
        "mae": float(np.abs(frames.d[defined] - frames.true_stg[defined]).mean()) if defined.any() else None,
        "calibration": calibration_table(frames.d, frames.true_stg),
        "error_by_horizon": horizon_table(frames.d, frames.true_stg),
        "detector_frames": detector_table(det.d, frames.success, thresholds),
        "detector_frames_curve": frame_curve(det.d, frames.success),
        "detector_episodes": episode_table(det, thresholds),
        "detector_episodes_curve": episode_table(det, _curve_thresholds(det.d, grid)),
    }
    if goal_frame is None:  # rollouts: only successful episodes have a true steps-to-go
        successful = [frames.success[sl].any() for sl in frames.episodes()]
        rho = value_order(frames, up_to_success=True)
        section["best_s_by_episode_f1"] = _best_on_rollouts(section["detector_episodes"], grid)
        section["true_steps_to_go_note"] = ("defined only for frames up to the first true success of the "
                                            f"{int(np.sum(successful))} successful rollouts")
        section["spearman_d_vs_time"] = {
            "successful": _summary([r for r, ok in zip(rho, successful) if ok]),
            "failed": _summary([r for r, ok in zip(rho, successful) if not ok]),
        }
    else:
        section["true_steps_to_go_note"] = "T - t on every frame (every demo ends at its goal)"
        section["spearman_d_vs_time"] = {"all": _summary(value_order(frames, up_to_success=False))}
        section["detector_goal_frames"] = detector_table(det.d, goal_frame, thresholds)
        section["detector_goal_frames_curve"] = frame_curve(det.d, goal_frame)
        section["d_goal_frames_mean"] = float(frames.d[goal_frame].mean())
        section["d_other_frames_mean"] = float(frames.d[~goal_frame].mean()) if (~goal_frame).any() else None
    return section


def _best_on_rollouts(rows: list[dict[str, Any]], grid: np.ndarray = THRESHOLD_GRID) -> dict[str, Any]:
    """The grid ``s`` with the best episode-level F1 on the rollouts: uses the simulator, so a diagnostic only."""
    def f1(r: dict[str, Any]) -> float:
        p, q = r["precision"], r["recall"]
        return 2 * p * q / (p + q) if p and q else 0.0

    on_grid = [r for r in rows if np.isclose(grid, r["threshold"]).any()]
    best = max(on_grid, key=lambda r: (f1(r), -r["threshold"]))
    return {"threshold": best["threshold"], "f1": f1(best), "precision": best["precision"], "recall": best["recall"],
            "note": "chosen with the simulator's success on these rollouts: a diagnostic, not available on a robot"}


def _curve_thresholds(d: np.ndarray, grid: np.ndarray = THRESHOLD_GRID) -> np.ndarray:
    """Thresholds for the episode-level curves: the rule's grid plus quantiles of ``d`` (up to always firing)."""
    q = np.quantile(d, np.linspace(0, 1, 61)) if len(d) else np.zeros(0)
    return np.unique(np.round(np.concatenate([grid, q]), 4))
