"""Experiment summaries: per-cell results, aggregates over seeds, ``report.md`` with tables and plots.

Everything here is rebuilt from the run folders on disk (each cell's ``summary.json``), so a
summary can be made at any time, also while cells are still running.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from selfimprove.runlog import read_json, stored_episodes  # noqa: E402
from selfimprove.stats import seed_interval, wilson_interval  # noqa: E402

if TYPE_CHECKING:
    from selfimprove.experiment import ExperimentPlan

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
        summary = read_json(run_dir / "summary.json")
        entry: dict[str, Any] = {
            "cell": run.name, "settings": run.settings, "overrides": run.axis_overrides, "run_dir": str(run_dir),
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
        })
        best = summary.get("guard", {}).get("best", {})
        if best.get("success_rate") is not None:  # the guard's pick, chosen without true success
            entry["guarded"] = {**_stage(best, robot, demos), "iteration": best.get("iteration")}
        if run.control:
            control = read_json(plan.runs[run.control].config.run_dir / "summary.json")
            if control:
                entry["controls"]["constant_reward"] = {
                    **_stage(control["improve"], control["improve"].get("robot_episodes", 0), demos),
                    "run_dir": str(plan.runs[run.control].config.run_dir)}
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
        "config_file": str(plan.spec.path),
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
        "stage1_reused": {name: source for name, g in sorted(plan.groups.items())
                          if (source := read_json(g.config.run_dir / "stage1_source.json").get("copied_from"))},
        # runs copied from another experiment with an identical config (not run here)
        "runs_reused": {name: source for name, r in sorted(plan.runs.items())
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


# ------------------------------------------------------------------------------------------ report


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _agg_text(stage: dict[str, Any] | None) -> str:
    """``mean [t-interval]`` over seeds, or the pooled Wilson interval for a single seed."""
    if not stage:
        return "n/a"
    if stage.get("ci95_t"):
        lo, hi = stage["ci95_t"]
        return f"{_f(stage['mean'])} [{_f(lo)}, {_f(hi)}]"
    lo, hi = stage["pooled"]["ci95_wilson"]
    return f"{_f(stage['mean'])} [{_f(lo)}, {_f(hi)}]*"


def _cell_text(result: dict[str, Any] | None) -> str:
    if not result or result.get("success_rate") is None:
        return "n/a"
    lo, hi = result["ci95"]
    return f"{_f(result['success_rate'])} [{_f(lo)}, {_f(hi)}]"


def _control_names(aggregates: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for agg in aggregates:
        names += [s for s in agg["stages"] if s.startswith("controls.") and s not in names]
    return sorted(names, key=lambda s: (s != "controls.constant_reward", s))


def _control_label(stage: str, start: str = "SFT") -> str:
    if stage == "guarded":
        return "SI, guard's checkpoint"
    name = stage.split(".", 1)[1]
    if name == "constant_reward":
        return "constant-reward control"
    if name.startswith("sft_temperature_"):
        t = name[len("sft_temperature_"):]
        return f"{start} greedy" if float(t) == 0 else f"{start} at t={t}"
    return name.replace("_", " ")


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items()) or "all"


def write_experiment_report(root: str | Path, summary: dict[str, Any]) -> Path:
    """``report.md`` (and PNG plots) for the experiment in ``root`` from its summary."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    report = summary.get("report", {})
    kind = report.get("kind", "table")
    axes = list(summary["axes"])
    aggregates = summary["aggregates"]
    counts = summary["counts"]
    controls = _control_names(aggregates)
    first = "start policy" if summary.get("init_from") else "SFT"
    lines = [f"# Experiment `{summary['experiment']}`", ""]
    if summary.get("description"):
        lines += [summary["description"], ""]
    grid = " x ".join([f"{a} ({', '.join(summary['axes'][a])})" for a in axes] + [f"seeds {summary['seeds']}"])
    lines += [f"Base preset `{summary['preset']}`; grid: {grid}. Config: `{summary['config_file']}`.", ""]
    if summary.get("init_from"):
        lines += [f"Stage 2 starts from `{summary['init_from']}` (no SFT is trained).", ""]
    timing = summary.get("timing") or {}
    if timing.get("wall_time_s") is not None:
        runs = timing.get("invocations", [])
        lines += [f"Wall time: {timing['wall_time_s'] / 60:.1f} minutes over {len(runs)} invocation(s) "
                  f"({', '.join(str(r.get('parallel')) for r in runs)} workers).", ""]
    reused = summary.get("stage1_reused") or {}
    shared = (f"{counts['shared_sft']} start checkpoint(s) copied in" if summary.get("init_from") else
              f"{counts['shared_sft']} SFT checkpoints, each shared by the runs that differ only in Stage-2 settings"
              + (f"; {len(reused)} of them copied from another experiment with identical Stage-1 settings "
                 f"({', '.join(sorted({str(Path(v).parents[1].name) for v in reused.values()}))})" if reused else ""))
    copied = summary.get("runs_reused") or {}
    if copied:
        shared += (f"; {len(copied)} run(s) copied from another experiment with an identical config: "
                   + ", ".join(f"`{name}` = `{source}`" for name, source in copied.items()))
    lines += [f"Cells: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending, of "
              f"{counts['cells']} ({counts['runs']} runs with controls; {shared}).", "",
              "True success from the simulator on fixed eval seeds never used in training. Over seeds: mean and "
              "95% t-interval; `*`: a single seed, its 95% Wilson interval. `summary.json` also holds each "
              "setting's pooled Wilson interval over all eval episodes of all seeds.", ""]
    if kind == "data-efficiency":
        lines += _data_efficiency_section(root, summary, controls)
    elif kind == "ablation":
        lines += _ablation_section(summary)
    figure = _bar_plot(root, summary) if kind != "data-efficiency" else None
    if any("guarded" in a["stages"] for a in aggregates):  # the guard's pick sits beside the controls
        controls = ["guarded", *controls]
    lines += ["## Results per setting (over seeds)", "",
              "| " + " | ".join(axes or ["setting"]) + f" | seeds | demos | {first} | {first} + Self-Improvement | robot episodes | "
              + " | ".join(_control_label(c, first) for c in controls) + " |",
              "|" + "---|" * (max(1, len(axes)) + 5 + len(controls))]
    for agg in aggregates:
        s = agg["stages"]
        label = [str(agg["settings"][a]) for a in axes] or ["all"]
        demos = s.get("sft", {}).get("demo_episodes_mean")
        robot = s.get("improve", {}).get("robot_episodes_mean")
        lines.append("| " + " | ".join(label) + f" | {len(agg['seeds'])} | {_f(demos, 0)} | {_agg_text(s.get('sft'))} | "
                     f"{_agg_text(s.get('improve'))} | {_f(robot, 0)} | "
                     + " | ".join(_agg_text(s.get(c)) for c in controls) + " |")
    lines.append("")
    if figure:
        lines += [f"![results]({figure.name})", ""]
    lines += ["## Cells", "", f"| cell | status | {first} | {first} + Self-Improvement | robot episodes | "
              + " | ".join(_control_label(c, first) for c in controls) + " | wall time (s) |",
              "|" + "---|" * (6 + len(controls))]
    for cell in summary["cells"]:
        status = cell["status"]
        if cell.get("control_status") and status == "done":
            status += f" (control {cell['control_status']})"
        lines.append(f"| [{cell['cell']}]({cell['cell']}/report.md) | {status} | {_cell_text(cell.get('sft'))} | "
                     f"{_cell_text(cell.get('improve'))} | {cell.get('improve', {}).get('robot_episodes', 'n/a')} | "
                     + " | ".join(_cell_text(_get(cell, c)) for c in controls)
                     + f" | {_f(cell.get('wall_time_s'), 0)} |")
    lines.append("")
    errors = [(c["cell"], c.get("error")) for c in summary["cells"] if c["status"] == "failed"]
    errors += [(c["control_run"], c.get("control_error")) for c in summary["cells"] if c.get("control_error")]
    if errors:
        lines += ["## Failed", ""] + [f"- `{name}`: {error} (log: `{name}/experiment.log`)" for name, error in errors]
        lines += ["", "Fix the cause and rerun with `--resume`: finished cells are kept.", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _split_x(summary: dict[str, Any]) -> tuple[str, list[str]]:
    x_axis = summary["report"]["x"]
    return x_axis, [a for a in summary["axes"] if a != x_axis]


def _data_efficiency_section(root: Path, summary: dict[str, Any], controls: list[str]) -> list[str]:
    """The paper's table (SFT, SFT + SI, extra episodes as % of the dataset) and its figure."""
    x_axis, others = _split_x(summary)
    reference = summary["report"].get("reference", {})
    dataset = next((c["dataset_episodes"] for c in summary["cells"] if c.get("dataset_episodes")), None)
    figure = plot_data_efficiency(root / "data_efficiency.png", summary)
    lines = ["## Data efficiency: Self-Improvement against more demonstrations", ""]
    if figure:
        lines += [f"![data efficiency]({figure.name})", "",
                  "Each arrow goes from an SFT policy (x: its demonstrations) to the same policy after "
                  "Self-Improvement (x: demonstrations + practice episodes); error bars: 95% over seeds. "
                  "Crosses: the constant-reward control with the same practice budget.", ""]
    ref_source = summary["report"].get("reference_source", "the paper")
    guarded = any("guarded" in a["stages"] for a in summary["aggregates"])
    head = ["setting", "demos", "SFT", "SFT + Self-Improvement"] + (["SI, guard's checkpoint"] if guarded else [])
    head += ["extra episodes used"]
    if "controls.constant_reward" in controls:
        head.append("constant-reward control")
    if reference:
        head.append(f"{ref_source}: SFT -> SFT + SI")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for agg in summary["aggregates"]:
        s = agg["stages"]
        if "sft" not in s:
            continue
        label = str(agg["settings"][x_axis])
        setting = ", ".join([label] + [str(agg["settings"][o]) for o in others])
        demos = s["sft"].get("demo_episodes_mean")
        robot = s.get("improve", {}).get("robot_episodes_mean")
        extra = f"+{_f(robot, 0)}" + (f" (+{100 * robot / dataset:.1f}% of {dataset})" if dataset and robot is not None
                                      else "")
        row = [setting, _f(demos, 0), _agg_text(s.get("sft")), _agg_text(s.get("improve"))]
        row += ([_agg_text(s.get("guarded"))] if guarded else []) + [extra]
        if "controls.constant_reward" in controls:
            row.append(_agg_text(s.get("controls.constant_reward")))
        if reference:
            ref = reference.get(label)
            row.append(f"{ref[0]} -> {ref[1]}" + (f" ({ref[2]})" if len(ref) > 2 else "") if ref else "")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if guarded:
        lines += ["The guard's checkpoint: the Stage-2 checkpoint with the best held-out score of the frozen reward "
                  "model (`checkpoints/best`, picked without true success); its true success is measured only "
                  "for this table.", ""]
    return lines


def _errorbar(stage: dict[str, Any]) -> tuple[float, float]:
    lo, hi = stage["ci95_t"] if stage.get("ci95_t") else stage["pooled"]["ci95_wilson"]
    return max(0.0, stage["mean"] - lo), max(0.0, hi - stage["mean"])


def plot_data_efficiency(out: Path, summary: dict[str, Any]) -> Path | None:
    """True success against total episodes (demos + practice): SFT points, arrows to SI points."""
    x_axis, others = _split_x(summary)
    series: dict[tuple, list[dict[str, Any]]] = {}
    for agg in summary["aggregates"]:
        if "sft" in agg["stages"] and agg["stages"]["sft"].get("demo_episodes_mean") is not None:
            series.setdefault(tuple(agg["settings"][o] for o in others), []).append(agg)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, (key, aggs) in enumerate(series.items()):
        colour = f"C{i}"
        suffix = f" ({', '.join(map(str, key))})" if key else ""
        aggs = sorted(aggs, key=lambda a: a["stages"]["sft"]["demo_episodes_mean"])
        xs = [a["stages"]["sft"]["demo_episodes_mean"] for a in aggs]
        ys = [a["stages"]["sft"]["mean"] for a in aggs]
        ax.plot(xs, ys, "--", color=colour, alpha=0.5, lw=1)
        ax.errorbar(xs, ys, yerr=list(zip(*[_errorbar(a["stages"]["sft"]) for a in aggs])), fmt="o", color=colour,
                    capsize=3, label=f"SFT{suffix}")
        si = [a for a in aggs if "improve" in a["stages"] and a["stages"]["improve"].get("robot_episodes_mean")]
        if si:
            sx = [a["stages"]["improve"]["total_episodes_mean"] for a in si]
            sy = [a["stages"]["improve"]["mean"] for a in si]
            ax.errorbar(sx, sy, yerr=list(zip(*[_errorbar(a["stages"]["improve"]) for a in si])), fmt="s",
                        color=colour, capsize=3, mfc="white", mew=1.5, label=f"SFT + Self-Improvement{suffix}")
            for a, x1, y1 in zip(si, sx, sy):
                x0, y0 = a["stages"]["sft"]["demo_episodes_mean"], a["stages"]["sft"]["mean"]
                ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                            arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.5, "shrinkA": 4, "shrinkB": 4})
                ax.annotate(str(a["settings"][x_axis]), (x0, y0), textcoords="offset points", xytext=(4, -12),
                            fontsize=8, color=colour)
        const = [a for a in aggs if "controls.constant_reward" in a["stages"]]
        if const:
            ax.plot([a["stages"]["controls.constant_reward"]["total_episodes_mean"] for a in const],
                    [a["stages"]["controls.constant_reward"]["mean"] for a in const], "x", color=colour, ms=8,
                    label=f"constant-reward control{suffix}")
        for a in aggs:  # individual seeds, faint
            ax.plot([a["stages"]["sft"]["demo_episodes_mean"]] * len(a["stages"]["sft"]["per_seed"]),
                    a["stages"]["sft"]["per_seed"], ".", color=colour, alpha=0.3)
    ax.set_xlabel("episodes used (demonstrations + Self-Improvement practice)")
    ax.set_ylabel("true success rate (eval seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{summary['experiment']}: Self-Improvement vs more demonstrations")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _ablation_section(summary: dict[str, Any]) -> list[str]:
    """A pivot table: one row per setting of the row axes, SFT and SI per value of the column axis."""
    report = summary["report"]
    axes = list(summary["axes"])
    column = report.get("columns") or (axes[-1] if axes else None)
    if column is None:
        return []
    rows = [report["rows"]] if report.get("rows") else [a for a in axes if a != column]
    rows += [a for a in axes if a not in rows and a != column]
    labels = list(summary["axes"][column])
    table: dict[tuple, dict[str, dict[str, Any]]] = {}
    for agg in summary["aggregates"]:
        table.setdefault(tuple(agg["settings"][r] for r in rows), {})[agg["settings"][column]] = agg["stages"]
    head = rows + [f"{label}: {stage}" for label in labels for stage in ("SFT", "SFT + SI", "constant-reward")]
    lines = [f"## Ablation over `{column}`", "", "| " + " | ".join(head or ["setting"]) + " |",
             "|" + "---|" * len(head)]
    for key, by_label in table.items():
        row = [str(k) for k in key]
        for label in labels:
            s = by_label.get(label, {})
            row += [_agg_text(s.get("sft")), _agg_text(s.get("improve")), _agg_text(s.get("controls.constant_reward"))]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _bar_plot(root: Path, summary: dict[str, Any]) -> Path | None:
    """SFT, SFT + SI and the constant-reward control per setting, with 95% error bars."""
    aggs = [a for a in summary["aggregates"] if "sft" in a["stages"]]
    if not aggs:
        return None
    stages = [("sft", "SFT"), ("improve", "SFT + Self-Improvement"), ("controls.constant_reward", "constant reward")]
    width = 0.8 / len(stages)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(aggs) + 2), 3.8))
    for j, (stage, label) in enumerate(stages):
        xs, ys, errs = [], [], []
        for i, agg in enumerate(aggs):
            s = agg["stages"].get(stage)
            if s:
                xs.append(i + (j - 1) * width)
                ys.append(s["mean"])
                errs.append(_errorbar(s))
        if xs:
            ax.bar(xs, ys, width, yerr=list(zip(*errs)), capsize=3, label=label, color=f"C{j}")
    ax.set_xticks(range(len(aggs)))
    ax.set_xticklabels([_settings_text(a["settings"]) for a in aggs], fontsize=8, rotation=15)
    ax.set_ylabel("true success rate (eval seeds)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(summary["experiment"])
    fig.tight_layout()
    out = root / "results.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def format_summary(summary: dict[str, Any], runs_dir: Path | None = None) -> str:
    """A few lines for the terminal: per setting SFT -> SI over seeds, failures, where the report is."""
    axes = list(summary["axes"])
    counts = summary["counts"]
    lines = [f"\nexperiment {summary['experiment']}: {counts['done']}/{counts['cells']} cells done, "
             f"{counts['failed']} failed, {counts['pending']} pending"]
    for agg in summary["aggregates"]:
        s = agg["stages"]
        if not s:
            continue
        const = s.get("controls.constant_reward")
        lines.append(f"  {_settings_text({a: agg['settings'][a] for a in axes}):30s} seeds {len(agg['seeds'])}: "
                     f"{'start' if summary.get('init_from') else 'SFT'} {_agg_text(s.get('sft'))} -> "
                     f"SI {_agg_text(s.get('improve'))}"
                     + (f"; constant reward {_agg_text(const)}" if const else ""))
    for name in summary.get("failed_runs", []):
        lines.append(f"  failed: {name} (see its experiment.log; rerun with --resume)")
    if runs_dir is not None:
        lines.append(f"  report: {Path(runs_dir) / 'experiments' / summary['experiment'] / 'report.md'}")
    return "\n".join(lines)


def plot_episodes_vs_success(out: str | Path, summaries: dict[str, str | Path],
                             cells: dict[str, str] | None = None) -> Path:
    """One figure over several experiments' ``summary.json`` (label -> path): true success against
    the episodes used (demos + practice) for the start policy and, per ``cells`` (setting of the
    first axis -> legend label), Stage 2 from it: the mean over seeds with its interval, and each
    seed faintly. E.g. the tabletop's ``self-improvement`` grids at 10% and 80% of the demos."""
    cells = cells or {"all": "Self-Improvement (preset)", "constant": "constant-reward control",
                      "paper-learner": "the paper's learner", "true-success": "true-success reward (ceiling)"}
    markers = {"sft": "o", **{k: m for k, m in zip(cells, "s^vDP")}}
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, (label, path) in enumerate(summaries.items()):
        colour = f"C{i}"
        summary = read_json(Path(path))
        by_setting = {next(iter(a["settings"].values())): a for a in summary["aggregates"]}
        start = next(a["stages"]["sft"] for a in summary["aggregates"] if "sft" in a["stages"])
        x0, y0 = start["demo_episodes_mean"], start["mean"]
        if len(set(start["per_seed"])) == 1:  # one start checkpoint copied to every seed: one evaluation
            pooled = start["pooled"]
            lo, hi = wilson_interval(pooled["successes"] // start["n"], pooled["episodes"] // start["n"])
            bar = (y0 - lo, hi - y0)
        else:
            bar = _errorbar(start)
        ax.errorbar([x0], [y0], yerr=[[v] for v in bar], fmt="o", color=colour, capsize=3, label=f"{label}: SFT")
        for j, (setting, name) in enumerate(cells.items()):
            stage = by_setting.get(setting, {}).get("stages", {}).get("improve")
            if not stage or not stage.get("n"):
                continue
            x1 = stage["total_episodes_mean"] * (1 + 0.04 * j)  # side by side, not on top of each other
            ax.errorbar([x1], [stage["mean"]], yerr=[[v] for v in _errorbar(stage)], fmt=markers[setting],
                        color=colour, capsize=3, mfc="white" if setting != "all" else colour, mew=1.5,
                        label=f"{label}: {name}")
            ax.plot([x1] * len(stage["per_seed"]), stage["per_seed"], ".", color=colour, alpha=0.35)
            if setting == "all":
                ax.annotate("", xy=(x1, stage["mean"]), xytext=(x0, y0),
                            arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.2, "shrinkA": 4, "shrinkB": 4})
    ax.set_xlabel("episodes used (demonstrations + Self-Improvement practice)")
    ax.set_ylabel("true success rate (eval seeds)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
