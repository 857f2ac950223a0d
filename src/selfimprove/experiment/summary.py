"""An experiment's ``summary.json``: one entry per cell (stages sft, improve, controls) and the
aggregates over seeds (mean with its t-interval, pooled Wilson; ``selfimprove.stats``), and how to
read one back (a cell's stage, the x axis, a setting's label).

Everything here is rebuilt from the run folders on disk (each cell's ``summary.json``), so a
summary can be made at any time, also while cells are still running.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from selfimprove.rundir import RunDir
from selfimprove.data.store import stored_episodes
from selfimprove.provenance import provenance
from selfimprove.runlog import portable_path, read_json
from selfimprove.stats import seed_interval, wilson_interval

if TYPE_CHECKING:
    from selfimprove.experiment.plan import ExperimentPlan

_STAGE_KEYS = ("success_rate", "ci95", "mean_episode_length", "eval_episodes")


def _stage(result: dict[str, Any], robot_episodes: int, demo_episodes: int | None) -> dict[str, Any]:
    return {**{k: result.get(k) for k in _STAGE_KEYS}, "robot_episodes": int(robot_episodes),
            "demo_episodes": demo_episodes}


def summarize_experiment(plan: ExperimentPlan) -> dict[str, Any]:
    """The experiment's summary: one entry per cell (stages sft, improve, controls) and aggregates."""
    status = read_json(plan.root / "status.json")
    cells = []
    for run in plan.cells:
        run_dir = run.config.run_dir
        summary = read_json(RunDir(run_dir).summary)
        entry: dict[str, Any] = {
            "cell": run.name, "settings": run.settings, "overrides": run.axis_overrides,
            "run_dir": portable_path(run_dir),
            "stage1": run.stage1, "control_run": run.control,
            "status": "done" if summary else status.get(run.name, {}).get("status", "pending"),
            "dataset_episodes": stored_episodes(run.config.dataset_path),
            "data_fraction": run.config.data.fraction,
        }
        if not summary:
            if entry["status"] == "failed":
                entry["error"] = status.get(run.name, {}).get("error")
            cells.append(entry)
            continue
        demos = summary.get("demo_episodes")
        robot = summary.get("improve", {}).get("robot_episodes", 0)
        entry.update({
            "wall_time_s": summary.get("wall_time_s"),
            "sft": _stage(summary["sft"], 0, demos),
            "improve": _stage(summary["improve"], robot, demos),
            "controls": {name: _stage(result, 0, demos) for name, result in summary.get("controls", {}).items()},
            "detector": summary.get("detector"),
            "provenance": summary.get("provenance"),  # the code that made the cell (None: made before it was recorded)
        })
        best = summary.get("guard", {}).get("best", {})
        if best.get("success_rate") is not None:  # the guard's pick, chosen without true success
            entry["guarded"] = {**_stage(best, robot, demos), "iteration": best.get("iteration")}
        if run.control:
            control = read_json(RunDir(plan.runs[run.control].config.run_dir).summary)
            if control:
                entry["controls"]["constant_reward"] = {
                    **_stage(control["improve"], control["improve"].get("robot_episodes", 0), demos),
                    "run_dir": portable_path(plan.runs[run.control].config.run_dir)}
            else:
                entry["control_status"] = status.get(run.control, {}).get("status", "pending")
                if entry["control_status"] == "failed":
                    entry["control_error"] = status.get(run.control, {}).get("error")
        cells.append(entry)
    failed = sorted(n for n, s in status.items() if s.get("status") == "failed"
                    and not (plan.root / n / "summary.json").exists() and not n.startswith("stage1:"))
    return {
        "experiment": plan.spec.name,
        "description": plan.spec.description,
        "config_file": portable_path(plan.spec.path),
        "provenance": provenance(),  # the code that wrote this summary; each cell records the code that made it
        "preset": plan.spec.preset,
        "axes": {a.name: {v.label: ({"preset": v.preset, "set": v.overrides} if v.preset else v.overrides)
                          for v in a.values} for a in plan.spec.axes},
        "seeds": plan.spec.seeds,
        "set": plan.spec.overrides,
        "init_from": plan.spec.init_from or None,
        "report": plan.spec.report,
        "counts": {"cells": len(cells), "done": sum(c["status"] == "done" for c in cells),
                   "failed": sum(c["status"] == "failed" for c in cells),
                   "pending": sum(c["status"] == "pending" for c in cells),
                   "runs": len(plan.runs), "shared_sft": len(plan.groups)},
        "failed_runs": failed,
        # shared SFTs copied from another experiment with identical Stage-1 settings (not trained here)
        "stage1_reused": {name: portable_path(source) for name, g in sorted(plan.groups.items())
                          if (source := read_json(g.config.run_dir / "stage1_source.json").get("copied_from"))},
        # runs copied from another experiment with an identical config (not run here)
        "runs_reused": {name: portable_path(source) for name, r in sorted(plan.runs.items())
                        if (source := read_json(r.config.run_dir / "run_source.json").get("copied_from"))},
        "cells": cells,
        "aggregates": aggregate_cells(cells, [a.name for a in plan.spec.axes]),
    }


def aggregate_cells(cells: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """Cells that differ only in seed, pooled: mean with a t-interval over seeds, and pooled Wilson."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(tuple(cell["settings"][a] for a in axes), []).append(cell)
    out = []
    for key, members in groups.items():
        done = [c for c in members if c["status"] == "done"]
        stage_names = ["sft", "improve"] + (["guarded"] if any("guarded" in c for c in done) else [])
        for c in done:
            stage_names += [f"controls.{n}" for n in c["controls"] if f"controls.{n}" not in stage_names]
        stages = {}
        for stage in stage_names:
            results = [_get(c, stage) for c in done]
            results = [r for r in results if r and r.get("success_rate") is not None]
            if not results:
                continue
            rates = [float(r["success_rate"]) for r in results]
            wins = sum(round(float(r["success_rate"]) * int(r["eval_episodes"])) for r in results)
            total = sum(int(r["eval_episodes"]) for r in results)
            lo, hi = wilson_interval(wins, total)
            robot = [r["robot_episodes"] for r in results]
            demos = [r["demo_episodes"] for r in results if r.get("demo_episodes") is not None]
            stages[stage] = {
                **{k: v for k, v in seed_interval(rates).items()},
                "per_seed": rates,
                "pooled": {"successes": wins, "episodes": total, "success_rate": wins / total if total else None,
                           "ci95_wilson": [round(lo, 4), round(hi, 4)]},
                "robot_episodes_mean": sum(robot) / len(robot),
                "demo_episodes_mean": sum(demos) / len(demos) if demos else None,
                "total_episodes_mean": (sum(robot) / len(robot) + sum(demos) / len(demos)) if demos else None,
            }
        out.append({"settings": dict(zip(axes, key)), "cells": [c["cell"] for c in members],
                    "seeds": [c["settings"]["seed"] for c in done], "stages": stages})
    return out


def _get(cell: dict[str, Any], stage: str) -> dict[str, Any] | None:
    node: Any = cell
    for part in stage.split(".", 1):  # "controls.sft_temperature_0.5": the name itself may hold a dot
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items()) or "all"


def _split_x(summary: dict[str, Any]) -> tuple[str, list[str]]:
    x_axis = summary["report"]["x"]
    return x_axis, [a for a in summary["axes"] if a != x_axis]
