"""Reward-model diagnostics: how good is a frozen SFT checkpoint's ``d(o, g)`` as a value and a detector?

Stage 2 trusts the frozen model twice: its steps-to-go ``d`` is the reward (so ``d`` must fall as the
robot gets closer to the goal) and ``d <= s`` ends episodes (so it must fire on successes and not
before). This module measures both, before any robot practises, on

* the **held-out demos** (the store's validation split, never trained on), where the true
  steps-to-go of every frame is known (``T - t``);
* **policy rollouts**: ``diagnose.rollouts`` episodes of the checkpoint's own policy on the fixed eval
  seeds. They do not end on the simulator's success nor on the detector: they run to the time limit,
  so "the first frame where ``d <= s``" replays what Stage 2 would do at every ``s`` at once. The
  simulator's success is recorded per step for these diagnostics only; a true steps-to-go exists only
  for frames up to the first true success of a successful episode.

The recommended ``s`` comes from :func:`selfimprove.reward.recommend_threshold`, the same function
Stage 2 calls, on held-out demo goal frames only (what a real robot has); the rollout numbers check it.
Outputs: ``diagnostics.json`` (every table, ``recommended_s``, the rule), ``report.md`` and PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfimprove.config import RunConfig, _merge, config_from_dict, load_config, parse_override
from selfimprove.domains import goal_key_for, make_env
from selfimprove.errors import CheckpointError, ConfigError, DatasetError
from selfimprove.fleet.local import LocalFleet, seed_stream
from selfimprove.model.checkpoint import load_checkpoint, read_checkpoint_config
from selfimprove.model.policy import EmbodiedModel
from selfimprove.audit import audit_demos, audit_rollouts, gate, reward_signal
from selfimprove.data.store import EpisodeStore
from selfimprove.reward import (HELD_OUT_CACHE, THRESHOLD_GRID, MismatchedInstructions, StepsToGoReward, calibrate_threshold,
                                demo_steps_to_go, detector_table, reachable_steps_to_go, recommend_threshold)
from selfimprove.runlog import dumps_json, torch_generator
from selfimprove.stats import spearman

log = logging.getLogger(__name__)

# preset used for a checkpoint outside a run folder, by the domain its spec names
DOMAIN_PRESETS = {"pointmass": "pointmass", "language-table": "language-table"}
# true steps-to-go ranges (inclusive) of the error-by-horizon table
HORIZONS = [(0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 200), (201, 500), (501, 10_000)]
REPORT_THRESHOLDS = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10)  # rows of the report's tables
CURVE_POINTS = 200  # points of each stored PR/ROC curve
NEAR_STEPS = 2  # "near" success: a true success within this many steps after the detector fires
NO_NEGATIVES_WARNING = ("this checkpoint was trained without mismatched-instruction negatives (sft.negatives = 0): "
                        "its steps-to-go head cannot say 'not on the way', so as a reward model its detector fires "
                        "on states that are not the goal; retrain Stage 1 with sft.negatives > 0")


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


# ----------------------------------------------------------------------------------------------- inputs

def default_out_dir(checkpoint: str | Path) -> Path:
    """``runs/<name>/diagnostics`` for ``runs/<name>/checkpoints/sft``; else a folder beside the checkpoint."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "checkpoints":
        suffix = "" if checkpoint.name == "sft" else f"_{checkpoint.name}"
        return checkpoint.parent.parent / f"diagnostics{suffix}"
    return checkpoint.parent / f"{checkpoint.name}_diagnostics"


def _known_fields(cls: type, data: dict[str, Any], where: str, dropped: list[str]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        if key not in hints:
            dropped.append(where + key)
            continue
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = _known_fields(hints[key], value, f"{where}{key}.", dropped)
        out[key] = value
    return out


def resolve_config(checkpoint: str | Path, preset: str | None = None, overrides: list[str] | None = None,
                   dataset: str | Path | None = None) -> RunConfig:
    """The config a checkpoint was made with: its run folder's ``config.json``, else a preset.

    A checkpoint at ``runs/<name>/checkpoints/<ckpt>`` takes ``runs/<name>/config.json`` (fields this
    version no longer knows are dropped with a warning); elsewhere, ``preset`` or the preset of the
    checkpoint's domain, with the dataset its metadata names. ``dataset`` beats both.
    """
    checkpoint = Path(checkpoint)
    meta = read_checkpoint_config(checkpoint)  # clear CheckpointError when missing or corrupt
    domain = meta.get("spec", {}).get("domain")
    run_config = checkpoint.parent.parent / "config.json"
    if preset is None and checkpoint.parent.name == "checkpoints" and run_config.exists():
        try:
            data = json.loads(run_config.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{run_config} is not valid JSON ({exc}); pass a preset with --config") from exc
        dropped: list[str] = []
        data = _known_fields(RunConfig, data, "", dropped)
        if dropped:
            log.warning("%s: ignoring fields this version does not know: %s", run_config, ", ".join(dropped))
        for item in overrides or []:
            data = _merge(data, parse_override(item))
        if not data.get("data", {}).get("path"):  # the run's own demos, wherever the run folder is now
            data.setdefault("data", {})["path"] = str(checkpoint.parent.parent / "demos")
        config = config_from_dict(data)
    else:
        if preset is None:
            if domain not in DOMAIN_PRESETS:
                raise CheckpointError(f"{checkpoint} names domain {domain!r}; pass a preset with --config")
            preset = DOMAIN_PRESETS[domain]
        config = load_config(preset, overrides)
        if not config.data.path and meta.get("meta", {}).get("dataset"):
            config.data.path = str(meta["meta"]["dataset"])
    if dataset is not None:
        config.data.path = str(dataset)
    if not (config.dataset_path / "meta" / "info.json").exists():
        raise DatasetError(f"no episode store at {config.dataset_path} for the held-out demos; pass the store "
                           "the checkpoint was trained on with --dataset")
    return config


def held_out_demos(model: EmbodiedModel, config: RunConfig, cache: Path | None = None
                   ) -> tuple[FrameSet, np.ndarray, dict[str, np.ndarray]]:
    """``d`` on the validation split of the store (the frames Stage 2 calibrates ``s`` on), goal-frame
    labels, and the arrays as Stage 2 reads them (with ``d_mismatched``).

    ``cache``: see :func:`selfimprove.reward.demo_steps_to_go` (a run's Stage 2 reads it).
    """

    frames = demo_steps_to_go(StepsToGoReward(model, threshold=0.0), config, cache)
    starts = np.asarray(frames["episode_start"], dtype=np.int64)
    sizes = np.diff(np.append(starts, len(frames["d"])))
    return FrameSet(d=frames["d"].astype(np.float64), success=frames["true_success"],
                    true_stg=frames["steps_to_go"].astype(np.float64), time=frames["frame_index"].astype(np.int64),
                    starts=starts, sizes=sizes), frames["goal_frame"], frames


def policy_rollouts(model: EmbodiedModel, config: RunConfig, n: int) -> tuple[FrameSet, list]:
    """``n`` episodes of the checkpoint's policy on the fixed eval seeds, run to the time limit.

    Sampling at ``improve.temperature`` (Stage 2's practice distribution). The reward model is the
    checkpoint itself with a detector that never fires, so ``d`` is recorded on every frame and no
    episode is cut: the detector at any ``s`` can be replayed offline. Also returns the episodes,
    with the simulator's goal distance and block positions per frame where the env reports them.
    """
    never = StepsToGoReward(model, threshold=-math.inf)
    fleet = LocalFleet(lambda: make_env(config, terminate_on_success=False), model.spec,
                       min(config.eval.robots, n), never, record_info=("goal_distance", "block_positions"))
    try:
        episodes = fleet.collect(model.state_dict(), version=0, seeds=seed_stream(config.eval.seed), n_episodes=n,
                                 temperature=config.improve.temperature,
                                 generator=torch_generator(config.eval.seed, 13))
    finally:
        fleet.close()
    episodes.sort(key=lambda e: e.meta["seed"])
    d, success, true_stg, time = [], [], [], []
    for e in episodes:
        flags = np.asarray(e.info.get("is_success", np.zeros(e.length + 1)), dtype=bool)
        steps = np.full(e.length + 1, np.nan)
        if flags.any():
            first = int(np.argmax(flags))
            steps[:first + 1] = first - np.arange(first + 1)
        d.append(np.asarray(e.stg, dtype=np.float64))
        success.append(flags)
        true_stg.append(steps)
        time.append(np.arange(e.length + 1))
    sizes = np.array([len(x) for x in d], dtype=np.int64)
    return FrameSet(d=np.concatenate(d), success=np.concatenate(success), true_stg=np.concatenate(true_stg),
                    time=np.concatenate(time), starts=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
                    sizes=sizes), episodes


# ------------------------------------------------------------------------------------------- statistics

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


def _clean(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------- main

def diagnose(checkpoint: str | Path, config: RunConfig | None = None, dataset: str | Path | None = None,
             rollouts: int | None = None, out: str | Path | None = None, preset: str | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Diagnose the steps-to-go head of ``checkpoint``; writes ``out``/diagnostics.json, report.md, PNGs.

    ``config`` defaults to the checkpoint's run config, else ``preset`` with ``overrides`` (see
    :func:`resolve_config`); ``rollouts`` to ``config.diagnose.rollouts``; ``out`` to
    :func:`default_out_dir`. Returns what ``diagnostics.json`` holds.
    """
    checkpoint = Path(checkpoint)
    if config is None:
        config = resolve_config(checkpoint, preset, overrides, dataset)
    elif dataset is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(dataset)))
    n_rollouts = config.diagnose.rollouts if rollouts is None else int(rollouts)
    if n_rollouts < 0:
        raise ConfigError(f"rollouts must be >= 0, got {n_rollouts}")
    out = Path(out) if out is not None else default_out_dir(checkpoint)
    torch.set_num_threads(config.torch_threads)
    model, meta = load_checkpoint(checkpoint, expect_domain=config.domain)
    log.info("diagnosing %s: held-out demos of %s", checkpoint, config.dataset_path)

    demos, goal, held_out = held_out_demos(model, config, out / HELD_OUT_CACHE)
    cfg = config.improve
    choice = calibrate_threshold(held_out, cfg.threshold_rule, cfg.threshold_precision, cfg.success_hold)
    f1_table = recommend_threshold(demos.d, goal)["table"]
    s = choice["threshold"]
    several_goals = "d_mismatched" in held_out
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "checkpoint_meta": meta, "domain": config.domain,
        "dataset": str(config.dataset_path), "recommended_s": s, "rule": choice["rule"],
        "rule_table": f1_table, "alternatives": alternatives(f1_table),
        "at_recommended_s": {},
        "demos": _section(demos, s, goal_frame=goal),
        "audit": {"hold": cfg.success_hold, "negatives_trained": bool(model.spec.stg_never),
                  "demos": audit_demos(held_out, s, cfg.success_hold)},
    }
    if several_goals and not model.spec.stg_never:
        result["warning"] = NO_NEGATIVES_WARNING
        log.warning(NO_NEGATIVES_WARNING)
    rollout_audit = None
    if n_rollouts:
        log.info("diagnosing %s: %d policy rollouts on eval seeds from %d", checkpoint, n_rollouts, config.eval.seed)
        rolls, episodes = policy_rollouts(model, config, n_rollouts)
        draw = None
        if several_goals:

            mismatched = MismatchedInstructions(EpisodeStore(config.dataset_path).instructions,
                                                goal_key_for(config.domain))
            generator = torch.Generator().manual_seed(0)
            draw = lambda texts: mismatched.draw(texts, generator)  # noqa: E731
        rollout_audit = audit_rollouts(episodes, s, cfg.success_hold, model, draw)
        rollout_audit["reward_signal"] = reward_signal(episodes, cfg.gamma, cfg.reward_clip, cfg.baseline_decay)
        if model.spec.stg_never and rollout_audit["reward_signal"] is not None:

            reachable = reachable_steps_to_go(episodes, StepsToGoReward(model, threshold=0.0))
            rollout_audit["reward_signal_reachable"] = reward_signal(episodes, cfg.gamma, cfg.reward_clip,
                                                                     cfg.baseline_decay, reachable)
        result["audit"]["rollouts"] = rollout_audit
        result["rollouts"] = _section(rolls, s, goal_frame=None)
        reached = [rolls.success[sl].any() for sl in rolls.episodes()]
        result["rollouts"].update(temperature=config.improve.temperature, first_seed=config.eval.seed,
                                  true_success_rate=float(np.mean(reached)))
    result["audit"]["gate"] = gate(result["audit"]["demos"], rollout_audit)
    for name in ("demos", "rollouts"):
        if name in result:
            sec = result[name]
            result["at_recommended_s"][name] = {
                "frame": {k: _at(sec["detector_frames"], s)[k] for k in ("precision", "recall", "f1", "fired")},
                "episode": {k: _at(sec["detector_episodes"], s)[k] for k in (
                    "precision", "recall", "fpr", "fired", "correct", "early", "steps_early_median",
                    "precision_near", "recall_near")},
            }
    result = _clean(result)
    out.mkdir(parents=True, exist_ok=True)
    result["out"] = str(out)
    result["plots"] = write_plots(result, out)
    tmp = out / "diagnostics.json.tmp"
    tmp.write_text(dumps_json(result, indent=2) + "\n")
    tmp.replace(out / "diagnostics.json")
    write_markdown(result, out)
    log.info("diagnostics written to %s (recommended s = %g)", out, s)
    return result


def print_summary(result: dict[str, Any]) -> None:
    """The headline numbers, for the command line."""
    print(f"recommended s = {result['recommended_s']:g} ({result['rule']})")
    for name, at in result["at_recommended_s"].items():
        fr, ep = at["frame"], at["episode"]
        rho = result[name]["spearman_d_vs_time"]
        rho = rho.get("all", rho.get("successful"))
        print(f"  {name:8s} frame P/R {_f(fr['precision'])}/{_f(fr['recall'])}, episode P/R "
              f"{_f(ep['precision'])}/{_f(ep['recall'])}, MAE {_f(result[name]['mae'], 2)}, "
              f"Spearman(d, time) mean {_f(rho['mean'])}")
    if result.get("warning"):
        print(f"  warning: {result['warning']}")
    audit = result.get("audit")
    if audit:
        checks = ", ".join(f"{k.replace('_', ' ')} {_f(g['value'])} ({g['bound']}: "
                           f"{ {True: 'pass', False: 'FAIL', None: 'n/a'}[g['pass']]})" for k, g in audit["gate"].items())
        print(f"  detector gate (hold {audit['hold']}): {checks}")
        signal = (audit.get("rollouts") or {}).get("reward_signal")
        if signal:
            print(f"  reward signal vs true progress (rank corr.): step {_f(signal['step'])}, return "
                  f"{_f(signal['return'])}, with baseline {_f(signal['return_with_baseline'])}")
            other = audit["rollouts"].get("reward_signal_reachable")
            if other:
                print(f"    ... with reachable d: step {_f(other['step'])}, return {_f(other['return'])}, "
                      f"with baseline {_f(other['return_with_baseline'])}")
    print(f"  report: {Path(result['out']) / 'report.md'}")


def _section(frames: FrameSet, s: float, goal_frame: np.ndarray | None) -> dict[str, Any]:
    """Every table for one set of episodes (demos or rollouts)."""
    defined = ~np.isnan(frames.true_stg)
    thresholds = np.union1d(THRESHOLD_GRID, REPORT_THRESHOLDS)
    section: dict[str, Any] = {
        "episodes": int(len(frames.starts)), "frames": int(len(frames.d)),
        "frames_with_true_steps_to_go": int(defined.sum()),
        "mae": float(np.abs(frames.d[defined] - frames.true_stg[defined]).mean()) if defined.any() else None,
        "calibration": calibration_table(frames.d, frames.true_stg),
        "error_by_horizon": horizon_table(frames.d, frames.true_stg),
        "detector_frames": detector_table(frames.d, frames.success, thresholds),
        "detector_frames_curve": frame_curve(frames.d, frames.success),
        "detector_episodes": episode_table(frames, thresholds),
        "detector_episodes_curve": episode_table(frames, _curve_thresholds(frames.d)),
    }
    if goal_frame is None:  # rollouts: only successful episodes have a true steps-to-go
        successful = [frames.success[sl].any() for sl in frames.episodes()]
        rho = value_order(frames, up_to_success=True)
        section["best_s_by_episode_f1"] = _best_on_rollouts(section["detector_episodes"])
        section["true_steps_to_go_note"] = ("defined only for frames up to the first true success of the "
                                            f"{int(np.sum(successful))} successful rollouts")
        section["spearman_d_vs_time"] = {
            "successful": _summary([r for r, ok in zip(rho, successful) if ok]),
            "failed": _summary([r for r, ok in zip(rho, successful) if not ok]),
        }
    else:
        section["true_steps_to_go_note"] = "T - t on every frame (every demo ends at its goal)"
        section["spearman_d_vs_time"] = {"all": _summary(value_order(frames, up_to_success=False))}
        section["detector_goal_frames"] = detector_table(frames.d, goal_frame, thresholds)
        section["detector_goal_frames_curve"] = frame_curve(frames.d, goal_frame)
        section["d_goal_frames_mean"] = float(frames.d[goal_frame].mean())
        section["d_other_frames_mean"] = float(frames.d[~goal_frame].mean()) if (~goal_frame).any() else None
    return section


def _best_on_rollouts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid ``s`` with the best episode-level F1 on the rollouts: uses the simulator, so a diagnostic only."""
    def f1(r: dict[str, Any]) -> float:
        p, q = r["precision"], r["recall"]
        return 2 * p * q / (p + q) if p and q else 0.0

    grid = [r for r in rows if np.isclose(THRESHOLD_GRID, r["threshold"]).any()]
    best = max(grid, key=lambda r: (f1(r), -r["threshold"]))
    return {"threshold": best["threshold"], "f1": f1(best), "precision": best["precision"], "recall": best["recall"],
            "note": "chosen with the simulator's success on these rollouts: a diagnostic, not available on a robot"}


def _curve_thresholds(d: np.ndarray) -> np.ndarray:
    """Thresholds for the episode-level curves: the rule's grid plus quantiles of ``d`` (up to always firing)."""
    q = np.quantile(d, np.linspace(0, 1, 61)) if len(d) else np.zeros(0)
    return np.unique(np.round(np.concatenate([THRESHOLD_GRID, q]), 4))


# ------------------------------------------------------------------------------------------ plots, report

def write_plots(result: dict[str, Any], out: Path) -> dict[str, str]:
    """calibration.png, error_by_horizon.png, spearman.png, pr.png, roc.png; returns name -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [(name, result[name]) for name in ("demos", "rollouts") if name in result]
    label = {"demos": "held-out demos", "rollouts": "policy rollouts (successful, up to success)"}
    s = result["recommended_s"]
    files = {}

    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    top = 1
    for i, (name, sec) in enumerate(sections):
        rows = [r for r in sec["calibration"] if r["frames"] >= 3]
        if rows:
            x = np.array([r["true_steps_to_go"] for r in rows])
            m, sd = np.array([r["mean_d"] for r in rows]), np.array([r["std_d"] for r in rows])
            ax.plot(x, m, "-", color=f"C{i}", label=label[name])
            ax.fill_between(x, m - sd, m + sd, color=f"C{i}", alpha=0.15)
            top = max(top, int(x.max()))
    ax.plot([0, top], [0, top], "k--", lw=1, label="ideal (d = true)")
    ax.set_xlabel("true steps-to-go")
    ax.set_ylabel("predicted d(o, g), mean ± sd")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)
    files["calibration"] = "calibration.png"

    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / max(1, len(sections))
    names = [h for h, _ in HORIZONS]
    for i, (name, sec) in enumerate(sections):
        rows = {r["lo"]: r for r in sec["error_by_horizon"]}
        xs = [k for k, lo in enumerate(names) if lo in rows]
        ax.bar(np.array(xs) + i * width, [rows[names[k]]["mae"] for k in xs], width, color=f"C{i}", label=label[name])
    ax.set_xticks(np.arange(len(HORIZONS)) + width * (len(sections) - 1) / 2)
    ax.set_xticklabels([f"{a}" if a == b else f"{a}-{b}" for a, b in HORIZONS], rotation=30, fontsize=8)
    ax.set_xlabel("true steps-to-go")
    ax.set_ylabel("mean |d - true|")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "error_by_horizon.png", dpi=110)
    plt.close(fig)
    files["error_by_horizon"] = "error_by_horizon.png"

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    bins = np.linspace(-1, 1, 41)
    k = 0
    for name, sec in sections:
        for part, values in sec["spearman_d_vs_time"].items():
            if values["values"]:
                ax.hist(values["values"], bins=bins, alpha=0.5, color=f"C{k}", density=True,
                        label=f"{name} ({part}), mean {values['mean']:.2f}")
            k += 1
    ax.set_xlabel("Spearman of d against time, per episode (-1: d falls every step)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "spearman.png", dpi=110)
    plt.close(fig)
    files["spearman"] = "spearman.png"

    curves = []
    for name, sec in sections:
        curves.append((f"{name}: frames vs true success", sec["detector_frames_curve"], sec["detector_frames"]))
        if "detector_goal_frames_curve" in sec:
            curves.append((f"{name}: frames vs goal frame (rule)", sec["detector_goal_frames_curve"],
                           sec["detector_goal_frames"]))
        curves.append((f"{name}: episodes, first firing", _episode_curve(sec["detector_episodes_curve"]),
                       [_episode_as_row(r) for r in sec["detector_episodes"]]))
    for kind, xkey, ykey, xlabel, ylabel in (("pr", "recall", "precision", "recall", "precision"),
                                              ("roc", "fpr", "recall", "false-positive rate", "true-positive rate")):
        fig, ax = plt.subplots(figsize=(5.6, 4.4))
        for i, (title, curve, table) in enumerate(curves):
            x, y = np.array(curve[xkey], dtype=float), np.array(curve[ykey], dtype=float)
            ok = ~(np.isnan(x) | np.isnan(y))
            if not ok.any():
                continue
            ax.plot(x[ok], y[ok], "-", color=f"C{i}", label=title)
            row = _at(table, s)
            if row.get(xkey) is not None and row.get(ykey) is not None:
                ax.plot([row[xkey]], [row[ykey]], "o", color=f"C{i}")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"detector d <= s (dots: recommended s = {s:g})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=110)
        plt.close(fig)
        files[kind] = f"{kind}.png"
    return files


def _episode_curve(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {"recall": [r["recall"] for r in rows], "fpr": [r["fpr"] for r in rows],
            "precision": [r["precision"] for r in rows]}


def _episode_as_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"threshold": r["threshold"], "recall": r["recall"], "precision": r["precision"], "fpr": r["fpr"]}


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def audit_lines(audit: dict[str, Any] | None) -> list[str]:
    """The detector audit (audit.py) as a markdown section: the gate, then its parts."""
    if not audit:
        return []
    hold = audit["hold"]
    lines = [f"## Detector audit (d <= s held for {hold} step{'s' if hold > 1 else ''})", "",
             "| check | value | bound | pass |", "|---|---|---|---|"]
    for name, g in audit["gate"].items():
        mark = {True: "yes", False: "**no**", None: "n/a"}[g["pass"]]
        lines.append(f"| {name.replace('_', ' ')} | {_f(g['value'])} | {g['bound']} | {mark} |")
    d = audit["demos"]
    lines += ["", f"Held-out demos ({d['episodes']}): the first firing is at the goal in {_f(d['episode_recall'])} "
              f"of them and earlier in {_f(d['fired_early'])}"
              + (f"; under a mismatched instruction the detector fires on {_f(d['mismatched_frame_firing'])} of "
                 f"frames ({_f(d['mismatched_episode_firing'])} of episodes)" if "mismatched_frame_firing" in d else "")
              + "."]
    r = audit.get("rollouts")
    if r:
        causes = ", ".join(f"{k}: {v}" for k, v in r["false_firings_by_cause"].items()) or "none"
        lines += ["", f"Policy rollouts ({r['episodes']}, true success {_f(r['true_success_rate'])}): the detector "
                  f"fires in {r['fired']}; precision per episode {_f(r['episode_precision'])} "
                  f"({_f(r['episode_precision_near'])} counting a success within 2 steps), recall "
                  f"{_f(r['episode_recall'])}; first firings with the named pair > 10 cm apart "
                  f"{_f(r['first_firings_named_pair_far'])}"
                  + (f"; mismatched-instruction frame firing {_f(r['mismatched_frame_firing'])}"
                     if "mismatched_frame_firing" in r else "")
                  + f". False first firings by cause: {causes}."]
        signal = r.get("reward_signal")
        if signal:
            lines += ["", f"Reward signal on the rollouts ({signal['steps']} steps; rank correlation with the named "
                      f"pair's true progress, 0 = noise): per step {_f(signal['step'])}, return R_t "
                      f"{_f(signal['return'])}, R_t with the reward-model baseline {_f(signal['return_with_baseline'])}."]
            other = r.get("reward_signal_reachable")
            if other:
                lines[-1] += (f" With d without the \"never\" class (`improve.reward_steps = \"reachable\"`): per step "
                              f"{_f(other['step'])}, return {_f(other['return'])}, with the baseline "
                              f"{_f(other['return_with_baseline'])}.")
    return lines + [""]


def write_markdown(result: dict[str, Any], out: Path) -> Path:
    """``report.md``: the recommendation, the headline numbers and the tables, with the plots."""
    s = result["recommended_s"]
    lines = [f"# Reward-model diagnostics: `{result['checkpoint']}`", "",
             f"Held-out demos: validation split of `{result['dataset']}` (never trained on).",
             "Simulator success is used here for diagnostics only; the recommendation uses demo labels only.", "",
             f"## Recommended success threshold: **s = {s:g}**", "", f"Rule: {result['rule']}.", ""]
    if result.get("warning"):
        lines += [f"**Warning:** {result['warning']}.", ""]
    lines += audit_lines(result.get("audit"))
    alt = result["alternatives"]
    lines += ["Other rules on the same demo table (for comparison; Stage 2 uses the rule above unless "
              "`improve.success_threshold` is set): "
              + ", ".join(f"{k.replace('_', ' ')}: {_f(v)}" for k, v in alt.items()) + ".", "",
              "| at s | frame precision | frame recall | episode precision | episode recall | episode FPR | "
              f"episode P / R, success within {NEAR_STEPS} steps | episodes ended early (median steps early) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, at in result["at_recommended_s"].items():
        fr, ep = at["frame"], at["episode"]
        lines.append(f"| {name} | {_f(fr['precision'])} | {_f(fr['recall'])} | {_f(ep['precision'])} | "
                     f"{_f(ep['recall'])} | {_f(ep['fpr'])} | {_f(ep['precision_near'])} / {_f(ep['recall_near'])} | "
                     f"{ep['early']} ({_f(ep['steps_early_median'], 1)}) |")
    lines += ["", "Frame level: `d <= s` on a frame vs the simulator's success at that frame. Episode level: the "
              "first frame where `d <= s` (where Stage 2 would end the episode) vs a true success at that frame; "
              "recall over episodes that truly succeed somewhere, FPR over those that never do.", ""]
    if "rollouts" in result:
        r = result["rollouts"]
        b = r["best_s_by_episode_f1"]
        lines += [f"Policy rollouts: {r['episodes']} episodes from eval seed {r['first_seed']} at temperature "
                  f"{r['temperature']:g}, run to the time limit (not ended on success or by the detector); "
                  f"true success rate {r['true_success_rate']:.3f}. On them, the grid s with the best "
                  f"episode-level F1 is {b['threshold']:g} (precision {_f(b['precision'])}, recall {_f(b['recall'])}); "
                  "that choice uses the simulator's success, so it is a check, not a rule a robot can apply.", ""]
    lines += ["## Steps-to-go as a value", "", "![calibration](calibration.png) ![error](error_by_horizon.png)", "",
              "| episodes | count | frames with a true steps-to-go | MAE of d | Spearman(d, time) mean | median "
              "| 10%-90% |", "|---|---|---|---|---|---|---|"]
    for name in ("demos", "rollouts"):
        if name in result:
            sec = result[name]
            for part, v in sec["spearman_d_vs_time"].items():
                has_true = part != "failed"
                lines.append(f"| {name} ({part}) | {v['episodes']} | "
                             f"{sec['frames_with_true_steps_to_go'] if has_true else 0} | "
                             f"{_f(sec['mae'], 2) if has_true else 'n/a'} | {_f(v['mean'])} | {_f(v['median'])} | "
                             f"{_f(v['q10'])} to {_f(v['q90'])} |")
    lines += ["", "True steps-to-go: demos, " + result["demos"]["true_steps_to_go_note"] + "; rollouts, "
              + result.get("rollouts", {}).get("true_steps_to_go_note", "none run") + ". "
              "Spearman per episode (demos and successful rollouts up to the first success): -1 when d falls at every "
              "step.", "", "![spearman](spearman.png)", "", "MAE by horizon (true steps-to-go):", "",
              "| horizon | "
              + " | ".join(f"{n} frames | {n} MAE | {n} bias" for n in ("demos", "rollouts") if n in result) + " |",
              "|---|" + "---|---|---|" * sum(n in result for n in ("demos", "rollouts"))]
    for lo, hi in HORIZONS:
        cells = []
        for name in ("demos", "rollouts"):
            if name in result:
                row = next((r for r in result[name]["error_by_horizon"] if r["lo"] == lo), None)
                cells += [str(row["frames"]), _f(row["mae"], 2), _f(row["bias"], 2)] if row else ["0", "", ""]
        if any(c not in ("0", "") for c in cells):
            lines.append(f"| {lo if lo == hi else f'{lo}-{hi}'} | " + " | ".join(cells) + " |")
    lines += ["", "## Success detector `d <= s`", "", "![pr](pr.png) ![roc](roc.png)", ""]
    for name in ("demos", "rollouts"):
        if name not in result:
            continue
        sec = result[name]
        auc, ap = sec["detector_frames_curve"]["roc_auc"], sec["detector_frames_curve"]["average_precision"]
        lines += [f"{name}: frame-level ROC AUC {_f(auc)}, average precision {_f(ap)}.", "",
                  "| s | frame precision | frame recall | episode precision | episode recall | episode FPR | "
                  f"episode P / R within {NEAR_STEPS} steps | fired |", "|---|---|---|---|---|---|---|---|"]
        wanted = sorted(set(REPORT_THRESHOLDS) | {s})
        for t in wanted:
            fr, ep = _at(sec["detector_frames"], t), _at(sec["detector_episodes"], t)
            mark = " (recommended)" if abs(t - s) < 1e-9 else ""
            lines.append(f"| {t:g}{mark} | {_f(fr['precision'])} | {_f(fr['recall'])} | {_f(ep['precision'])} | "
                         f"{_f(ep['recall'])} | {_f(ep['fpr'])} | {_f(ep['precision_near'])} / "
                         f"{_f(ep['recall_near'])} | {ep['fired']} |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------- pipeline hooks

def run_diagnostics(config: RunConfig, sft_path: str | Path, resume: bool) -> dict[str, Any]:
    """The ``selfimprove run`` step: diagnostics of the SFT checkpoint in ``runs/<name>/diagnostics``.

    Cheap next to the run (the held-out demos Stage 2 calibrates on anyway, plus
    ``diagnose.rollouts`` episodes); kept on ``--resume``.
    """
    out = config.run_dir / "diagnostics"
    if resume and (out / "diagnostics.json").exists():
        try:
            return json.loads((out / "diagnostics.json").read_text())
        except json.JSONDecodeError:
            log.warning("%s is unreadable; diagnosing again", out / "diagnostics.json")
    return diagnose(sft_path, config=config, out=out)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a diagnosis that a run summary keeps."""
    if not result:
        return {}
    out: dict[str, Any] = {"recommended_s": result["recommended_s"]}
    if "audit" in result:
        out["gate"] = {k: g["value"] for k, g in result["audit"]["gate"].items()}
        out["gate_passed"] = all(g["pass"] is not False for g in result["audit"]["gate"].values())
    for name, at in result.get("at_recommended_s", {}).items():
        rho = result[name]["spearman_d_vs_time"]
        out[name] = {"frame_precision": at["frame"]["precision"], "frame_recall": at["frame"]["recall"],
                     "episode_precision": at["episode"]["precision"], "episode_recall": at["episode"]["recall"],
                     "mae": result[name]["mae"], "spearman_mean": rho.get("all", rho.get("successful", {})).get("mean")}
    return out


def report_lines(run_dir: Path) -> list[str]:
    """A short section of the run report pointing at ``diagnostics/report.md``."""
    path = Path(run_dir) / "diagnostics" / "diagnostics.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    lines = ["## Reward model (SFT checkpoint)", ""]
    if result.get("warning"):
        lines += [f"**Warning:** {result['warning']}.", ""]
    lines += [f"Recommended s = {result['recommended_s']:g} ({result['rule']}). Full diagnostics: "
             "[diagnostics/report.md](diagnostics/report.md).", "", *audit_lines(result.get("audit")),
             "| episodes | frame precision / recall at s | episode precision / recall at s | MAE of d | "
             "Spearman(d, time) mean |", "|---|---|---|---|---|"]
    for name, h in headline(result).items():
        if isinstance(h, dict) and name != "gate":
            lines.append(f"| {name} | {_f(h['frame_precision'])} / {_f(h['frame_recall'])} | "
                         f"{_f(h['episode_precision'])} / {_f(h['episode_recall'])} | {_f(h['mae'], 2)} | "
                         f"{_f(h['spearman_mean'])} |")
    return lines + [""]
