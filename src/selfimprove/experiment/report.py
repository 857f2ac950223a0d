"""An experiment's ``report.md`` (the tables per setting and per cell, the data-efficiency and
ablation sections, with the figures of ``plots.py``) and its few lines for the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfimprove.experiment.plots import _bar_plot, plot_data_efficiency
from selfimprove.experiment.summary import _get, _settings_text, _split_x
from selfimprove.runlog import write_text
from selfimprove.stats import fmt


def _agg_text(stage: dict[str, Any] | None) -> str:
    """``mean [t-interval]`` over seeds, or the pooled Wilson interval for a single seed."""
    if not stage:
        return "n/a"
    if stage.get("ci95_t"):
        lo, hi = stage["ci95_t"]
        return f"{fmt(stage['mean'])} [{fmt(lo)}, {fmt(hi)}]"
    lo, hi = stage["pooled"]["ci95_wilson"]
    return f"{fmt(stage['mean'])} [{fmt(lo)}, {fmt(hi)}]*"


def _cell_text(result: dict[str, Any] | None) -> str:
    if not result or result.get("success_rate") is None:
        return "n/a"
    lo, hi = result["ci95"]
    return f"{fmt(result['success_rate'])} [{fmt(lo)}, {fmt(hi)}]"


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
        lines.append("| " + " | ".join(label) + f" | {len(agg['seeds'])} | {fmt(demos, 0)} | {_agg_text(s.get('sft'))} | "
                     f"{_agg_text(s.get('improve'))} | {fmt(robot, 0)} | "
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
                     + f" | {fmt(cell.get('wall_time_s'), 0)} |")
    lines.append("")
    errors = [(c["cell"], c.get("error")) for c in summary["cells"] if c["status"] == "failed"]
    errors += [(c["control_run"], c.get("control_error")) for c in summary["cells"] if c.get("control_error")]
    if errors:
        lines += ["## Failed", ""] + [f"- `{name}`: {error} (log: `{name}/experiment.log`)" for name, error in errors]
        lines += ["", "Fix the cause and rerun with `--resume`: finished cells are kept.", ""]
    path = root / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


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
        extra = f"+{fmt(robot, 0)}" + (f" (+{100 * robot / dataset:.1f}% of {dataset})" if dataset and robot is not None
                                      else "")
        row = [setting, fmt(demos, 0), _agg_text(s.get("sft")), _agg_text(s.get("improve"))]
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
