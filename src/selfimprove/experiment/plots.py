"""An experiment's figures: true success against the episodes used (data efficiency, and over
several experiments' summaries), and per setting as bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from selfimprove.experiment.summary import _settings_text, _split_x  # noqa: E402
from selfimprove.runlog import read_json, write_figure  # noqa: E402
from selfimprove.stats import wilson_interval  # noqa: E402


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
    write_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


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
    write_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def plot_episodes_vs_success(out: str | Path, summaries: dict[str, str | Path],
                             cells: dict[str, str] | None = None, method: str = "all",
                             sft_curve: list[tuple[float, float]] | None = None) -> Path:
    """One figure over several experiments' ``summary.json`` (label -> path): true success against
    the episodes used (demos + practice) for the start policy and, per ``cells`` (setting of the
    first axis -> legend label), Stage 2 from it: the mean over seeds with its interval, and each
    seed faintly; an arrow from SFT to the ``method`` cell. ``sft_curve``: (demos, success) points of
    SFT on more demos, drawn as the line practice is judged against (the exchange rate). E.g. the
    tabletop's ``self-improvement`` grids at 10% and 80% of the demos."""
    cells = cells or {"all": "Self-Improvement (preset)", "constant": "constant-reward control",
                      "paper-learner": "the paper's learner", "true-success": "true-success reward (ceiling)"}
    markers = {"sft": "o", **{k: m for k, m in zip(cells, "s^vDP")}}
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    if sft_curve:
        demos, success = zip(*sorted(sft_curve))
        ax.plot(demos, success, "-", color="0.55", lw=1.5, marker=".", zorder=1, label="SFT on more demos")
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
                        color=colour, capsize=3, mfc="white" if setting != method else colour, mew=1.5,
                        label=f"{label}: {name}")
            ax.plot([x1] * len(stage["per_seed"]), stage["per_seed"], ".", color=colour, alpha=0.35)
            if setting == method:
                ax.annotate("", xy=(x1, stage["mean"]), xytext=(x0, y0),
                            arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.2, "shrinkA": 4, "shrinkB": 4})
    ax.set_xlabel("episodes used (demonstrations + Self-Improvement practice)")
    ax.set_ylabel("true success rate (eval seeds)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(out)
    write_figure(fig, out, dpi=120)
    plt.close(fig)
    return out
