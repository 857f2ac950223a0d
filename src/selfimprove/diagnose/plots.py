"""The diagnosis as figures: calibration, error by horizon, Spearman per episode, PR and ROC curves.

matplotlib is imported inside :func:`write_plots`, so importing the package does not load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from selfimprove.diagnose.checks import HORIZONS, _at
from selfimprove.runlog import write_figure


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
    write_figure(fig, out / "calibration.png", dpi=110)
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
    write_figure(fig, out / "error_by_horizon.png", dpi=110)
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
    write_figure(fig, out / "spearman.png", dpi=110)
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
        write_figure(fig, out / f"{kind}.png", dpi=110)
        plt.close(fig)
        files[kind] = f"{kind}.png"
    return files


def _episode_curve(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {"recall": [r["recall"] for r in rows], "fpr": [r["fpr"] for r in rows],
            "precision": [r["precision"] for r in rows]}


def _episode_as_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"threshold": r["threshold"], "recall": r["recall"], "precision": r["precision"], "fpr": r["fpr"]}
