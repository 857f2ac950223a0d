"""The whole method in one call: collect -> sft -> eval -> improve -> eval -> report.

Every step saves its result in the run folder and is skipped on ``resume`` when that result
exists, so a killed run continues where it stopped and nothing finished is recomputed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from selfimprove.config import RunConfig
from selfimprove.data.collect import collect_demos
from selfimprove.data.store import EpisodeStore, has_store, split_episodes
from selfimprove.errors import DatasetError, RunStateError
from selfimprove.folders import ensure_empty, locks_run, run_contents
from selfimprove.provenance import provenance
from selfimprove.evaluate import evaluate
from selfimprove.reward import detector_table
from selfimprove.diagnose.report import headline
from selfimprove.diagnose.run import run_diagnostics
from selfimprove.domains import expert_for, make_env
from selfimprove.rundir import RunDir
from selfimprove.runlog import MetricsLog, WallClock, check_resume, prepare_run, write_json
from selfimprove.train.guard import evaluate_best, guard_summary
from selfimprove.train.improve import episodes_dir, improve, reward_model_path
from selfimprove.train.sft import sft
from selfimprove.videos import record_videos

log = logging.getLogger(__name__)


def _json_step(path: Path, resume: bool, compute) -> dict[str, Any]:
    if resume and path.exists():
        return json.loads(path.read_text())
    result = compute()
    write_json(path, result)
    return result


def rollout_detector_diagnostics(config: RunConfig) -> dict[str, Any]:
    """Detector precision/recall per frame on Stage-2 rollouts against the simulator's success flag."""
    root = episodes_dir(config)
    if not has_store(root):
        return {}
    frames = EpisodeStore(root).frames()
    d, true = frames.extras.get("stg"), frames.extras.get("info.is_success")
    if d is None or true is None:
        return {}
    threshold = json.loads(RunDir(config.run_dir).detector.read_text())["threshold"]
    true = true.astype(bool)
    fired = detector_table(d, true, np.array([threshold]))[0]
    ends = frames.episode_start + frames.episode_lengths  # row of each episode's last frame
    detected = d[ends] <= threshold
    reached = np.logical_or.reduceat(true, frames.episode_start)
    episodes = {
        "episodes": int(len(ends)),
        "detector_ended": int(detected.sum()),
        "detector_ended_truly_successful": float(true[ends][detected].mean()) if detected.any() else None,
        "truly_successful_detected": float(detected[reached].mean()) if reached.any() else None,
    }
    return {"threshold": threshold, "frames": int(len(d)), **fired, "episode_level": episodes,
            "per_threshold": detector_table(d, true)}


def practice_summary(config: RunConfig, control_hz: float = 10.0) -> dict[str, Any]:
    """How much human help Stage 2 needed: resets (interventions) per 100 episodes, robot-hour and success.

    "setup" starts (each robot's first board) are not counted as interventions; in episodic mode
    (``fleet.reset_free = false``) every episode starts on a fresh board and none is counted.
    """
    root = episodes_dir(config)
    if not has_store(root):
        return {}
    store = EpisodeStore(root)
    metas = [store.episode_meta(i) for i in range(store.num_episodes)]
    n = len(metas)
    steps = int(store.episode_lengths.sum())
    reasons: dict[str, int] = {}
    for m in metas:
        if m.get("start") == "reset":
            reasons[m.get("reset_reason") or "unknown"] = reasons.get(m.get("reset_reason") or "unknown", 0) + 1
    interventions = sum(reasons.values())
    detected = sum(m.get("ended_by") == "detector" for m in metas)
    truly = sum(bool(t) for t in store.true_success)
    robot_hours = steps / control_hz / 3600.0
    humans = -(-config.fleet.robots // config.fleet.robots_per_human)
    return {
        "mode": "reset-free" if config.fleet.reset_free else "episodic (every episode on a fresh board)",
        "episodes": n, "env_steps": steps, "robot_hours": round(robot_hours, 3),
        "interventions": interventions, "intervention_reasons": reasons,
        "setups": sum(m.get("start") == "setup" for m in metas),
        "interventions_per_100_episodes": round(100.0 * interventions / n, 2) if n else None,
        "interventions_per_robot_hour": round(interventions / robot_hours, 2) if robot_hours else None,
        "interventions_per_detected_success": round(interventions / detected, 3) if detected else None,
        "interventions_per_true_success": round(interventions / truly, 3) if truly else None,
        "robots": config.fleet.robots, "robots_per_human": config.fleet.robots_per_human, "humans": humans,
        "episodes_per_human": round(n / humans, 1),
    }


@locks_run
def run_pipeline(config: RunConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every stage for ``config`` and return the summary (also written to ``summary.json``)."""
    run = RunDir(config.run_dir)
    run_dir = run.root
    if run_contents(run_dir) and not resume:
        raise RunStateError(f"{run_dir} already holds a run; pass --resume to continue it, or choose "
                            "another --name (nothing was changed)")
    if resume:
        check_resume(config, must_exist=False)
    collect = not has_store(config.dataset_path)
    make_env(config).close()  # a wrong env.id or env.module fails here, before any work
    if collect:
        expert_for(config)  # and so does a task with neither a demo store at data.path nor a scripted expert
        if config.data.path:  # a folder of the user's: never written into when it holds anything
            ensure_empty(config.dataset_path, "demos", "Point data.path (--dataset) at an episode store (with "
                         "meta/info.json) or at a new folder", DatasetError)
    prepare_run(config)
    timing_path = run.timing
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"wall_time_s": 0.0}
    clock = WallClock(timing_path, timing["wall_time_s"])
    try:
        if collect:
            log.info("collecting %d demos into %s", config.data.episodes, config.dataset_path)
            collect_demos(config, progress=progress)
        sft_path = sft(config, resume=True, progress=progress)
        sft_eval = _json_step(run.eval("sft"), resume, lambda: evaluate(config, sft_path))
        # runs/<name>/diagnostics/: of the frozen reward model Stage 2 will use (its own checkpoint when set)
        reward_model = run_diagnostics(config, reward_model_path(config, sft_path), resume)
        record_videos(config, sft_path, "sft", resume=resume)
        # the learning curve's first and last points are the SFT and final evaluations (not repeated)
        final_path = run.eval("improve")
        improve_path = improve(config, sft_path, resume=True, progress=progress, sft_eval=sft_eval,
                               final_eval=final_path)
        # a fresh run's folder started empty, so an eval_improve.json now is the one improve() just wrote
        improve_eval = _json_step(final_path, True, lambda: evaluate(config, improve_path))
        # the guard's checkpoints/best (true success: diagnostic); not re-run when it is the SFT or final policy
        best_eval = evaluate_best(config, resume, {sft_path: sft_eval, improve_path: improve_eval})
        record_videos(config, improve_path, "improve", resume=resume)
        controls = {f"sft_temperature_{t:g}": _json_step(
            run.eval("sft", t), resume, lambda t=t: evaluate(config, sft_path, temperature=t))
            for t in config.eval.control_temperatures}
        rollouts = rollout_detector_diagnostics(config)
        practice = practice_summary(config)
    finally:
        timing["wall_time_s"] = clock.stop()
    from selfimprove.report import write_report

    robot_episodes = 0
    metrics_path = run.metrics
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("stage") == "improve":
            robot_episodes = max(robot_episodes, int(record.get("robot_episodes", 0)))
    keys = ("success_rate", "ci95", "mean_episode_length", "eval_episodes")
    summary = {
        "domain": config.domain,
        "seed": config.seed,
        "wall_time_s": timing["wall_time_s"],
        "sft": {k: sft_eval[k] for k in keys},
        "improve": {**{k: improve_eval[k] for k in keys}, "robot_episodes": robot_episodes},
        "demo_episodes": int(len(split_episodes(EpisodeStore(config.dataset_path).num_episodes,
                                                config.data.val_fraction, config.data.fraction)[0])),
        "controls": {name: {k: result[k] for k in keys} for name, result in controls.items()},
        "reward": config.improve.reward,
        "detector": {"threshold": rollouts.get("threshold"), "rollout_precision": rollouts.get("precision"),
                     "rollout_recall": rollouts.get("recall")},
    }
    summary["practice"] = practice
    if config.improve.guard:
        summary["guard"] = guard_summary(run_dir, MetricsLog(metrics_path).read("improve"), best_eval)
    summary["reward_model"] = headline(reward_model)
    summary["provenance"] = provenance(config.precision)
    write_json(run.summary, summary)
    write_json(run.detector_rollouts, rollouts)
    write_report(run_dir)
    return summary
