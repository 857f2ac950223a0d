"""How far a run has got, read from its folder alone, so a report can be built at any time.

A run writes its results step by step (metrics.jsonl, checkpoints, eval_*.json, videos, and
summary.json last). This module says which of them exist, so a report built while the run is
going, or after it stopped, says what is done and what is still missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from selfimprove.data.store import stored_episodes
from selfimprove.rundir import RunDir
from selfimprove.runlog import MetricsLog
from selfimprove.videos import read_index


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (json.JSONDecodeError, OSError):
        return {}


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """The state of each step of the run in ``run_dir`` (see ``status_lines`` for the wording)."""
    run = RunDir(run_dir)
    run_dir = run.root
    config = _json(run.config)
    metrics = MetricsLog(run.metrics)
    sft, improve = metrics.read("sft"), metrics.read("improve")
    data = config.get("data", {})
    demos = Path(data["path"]) if data.get("path") else run.demos
    demo_info = {"total_episodes": stored_episodes(demos)}
    last_improve = max((r for r in improve if "iteration" in r), key=lambda r: r["iteration"], default={})
    cfg_improve = config.get("improve", {})
    budget = int(cfg_improve.get("max_robot_episodes", 0) or 0)
    videos = read_index(run_dir)
    metrics_path = run.metrics
    return {
        "finished": run.summary.exists(),
        "demos": {"path": str(demos), "episodes": demo_info.get("total_episodes")},
        "sft": {"done": (run.sft_checkpoint / "model.safetensors").exists(),
                "step": max((int(r.get("step", 0)) for r in sft), default=0), "steps": config.get("sft", {}).get("steps")},
        "sft_eval": run.eval("sft").exists(),
        "improve": {"iteration": int(last_improve.get("iteration", 0)), "iterations": cfg_improve.get("iterations"),
                    "robot_episodes": int(last_improve.get("robot_episodes", 0)), "budget": budget,
                    "started": bool(improve),
                    "done": bool(last_improve) and (
                        last_improve.get("iteration") == cfg_improve.get("iterations")
                        or 0 < budget <= int(last_improve.get("robot_episodes", 0)))},
        "improve_eval": run.eval("improve").exists(),
        "videos": {stage: len(entries) for stage, entries in videos.items()},
        "videos_wanted": int(config.get("eval", {}).get("videos", 0) or 0),
        "metrics_updated": metrics_path.stat().st_mtime if metrics_path.exists() else None,
    }


def status_lines(status: dict[str, Any], name: str) -> list[str]:
    """The report's "Status" section for a run that has not finished (no summary.json yet)."""
    if status["finished"]:
        return []
    when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status["metrics_updated"]))
            if status["metrics_updated"] else "never")
    sft, imp = status["sft"], status["improve"]
    demos = status["demos"]
    rows = [("demonstrations", f"{demos['episodes']} episodes in `{demos['path']}`" if demos["episodes"]
             else "not collected yet")]
    if sft["done"]:
        rows.append(("Stage 1 (SFT)", "done"))
    elif sft["step"]:
        rows.append(("Stage 1 (SFT)", f"**in progress**: step {sft['step']} of {sft['steps']} logged"))
    else:
        rows.append(("Stage 1 (SFT)", "not started"))
    rows.append(("SFT evaluation", "done" if status["sft_eval"] else "not yet"))
    of = f" of {imp['iterations']}" + (f" (budget {imp['budget']} robot episodes)" if imp["budget"] else "")
    if imp["done"]:
        rows.append(("Stage 2 (Self-Improvement)", f"done: {imp['iteration']} iterations, "
                                                   f"{imp['robot_episodes']} robot episodes"))
    elif imp["started"]:
        rows.append(("Stage 2 (Self-Improvement)", f"**in progress**: iteration {imp['iteration']}{of}, "
                                                   f"{imp['robot_episodes']} robot episodes"))
    else:
        rows.append(("Stage 2 (Self-Improvement)", "not started"))
    rows.append(("Stage 2 evaluation", "done" if status["improve_eval"] else "not yet"))
    if status["videos_wanted"]:
        for stage, label in (("sft", "SFT videos"), ("improve", "Stage 2 videos")):
            n = status["videos"].get(stage, 0)
            rows.append((label, f"{n} recorded" if n else "not yet"))
    rows.append(("summary.json", "not yet"))
    return ["## Status: not finished", "",
            f"Run `{name}` has no summary.json yet: it is still running, or it stopped (continue it with the "
            f"same command and `--resume`). This report shows what exists so far; metrics last written "
            f"{when}.", "", "| step | state |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], ""]
