"""Run reports: ``report.md`` with plots, rebuilt from the files a run writes (metrics.jsonl, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from selfimprove.diagnose.report import report_lines as diagnostics_lines  # noqa: E402
from selfimprove.rundir import RunDir  # noqa: E402
from selfimprove.data.store import stored_episodes  # noqa: E402
from selfimprove.runlog import MetricsLog, read_json, resolve_run_dir, write_figure, write_text  # noqa: E402
from selfimprove.runstatus import run_status, status_lines  # noqa: E402
from selfimprove.stats import fmt  # noqa: E402
from selfimprove.domains import describe_views  # noqa: E402
from selfimprove.train.guard import GUARD_SHIFTS, guard_records  # noqa: E402
from selfimprove.videos import report_lines as video_lines  # noqa: E402



def plot_improvement(records: list[dict[str, Any]], sft_eval: dict[str, Any], out: Path) -> Path | None:
    """Success rate and episode length against robot episodes during Self-Improvement."""
    evals = [r for r in records if "eval_success_rate" in r]
    if not evals:
        return None
    x = [r["robot_episodes"] for r in evals]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    lo = [r["eval_ci95"][0] for r in evals]
    hi = [r["eval_ci95"][1] for r in evals]
    ax1.fill_between(x, lo, hi, alpha=0.25, color="C0")
    ax1.plot(x, [r["eval_success_rate"] for r in evals], "o-", color="C0", label="policy (eval seeds)")
    batch = [r for r in records if "batch_true_success_rate" in r]
    if batch:
        ax1.plot([r["robot_episodes"] for r in batch], [r["detected_success_rate"] for r in batch],
                 "-", color="C1", alpha=0.6, label="detected success (practice)")
        ax1.plot([r["robot_episodes"] for r in batch], [r["batch_true_success_rate"] for r in batch],
                 ":", color="C3", alpha=0.6, label="true success (practice, diagnostic)")
    if sft_eval:
        ax1.axhline(sft_eval["success_rate"], ls="--", color="gray", label="SFT")
    ax1.set_xlabel("robot episodes of Self-Improvement")
    ax1.set_ylabel("success rate")
    ax1.set_ylim(0, 1.02)
    ax1.legend(loc="lower right", fontsize=8)
    ax2.plot(x, [r["eval_mean_length"] for r in evals], "o-", color="C2", label="policy (eval seeds)")
    if sft_eval:
        ax2.axhline(sft_eval["mean_episode_length"], ls="--", color="gray", label="SFT")
    ax2.set_xlabel("robot episodes of Self-Improvement")
    ax2.set_ylabel("mean episode length (steps)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    write_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def plot_sft(records: list[dict[str, Any]], out: Path) -> Path | None:
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax1.plot(steps, [r["train_bc"] for r in records], label="train BC")
    ax1.plot(steps, [r["val_bc"] for r in records], label="held-out BC")
    ax1.plot(steps, [r["train_stg"] for r in records], label="train steps-to-go")
    ax1.plot(steps, [r["val_stg"] for r in records], label="held-out steps-to-go")
    ax1.set_xlabel("SFT step")
    ax1.set_ylabel("cross-entropy")
    ax1.legend(fontsize=8)
    ax2.plot(steps, [r["val_stg_mae"] for r in records], color="C3", label="d")
    if all("val_stg_mae_reachable" in r for r in records):
        ax2.plot(steps, [r["val_stg_mae_reachable"] for r in records], color="C4",
                 label='d without the "never" class')
    if "val_stg_mae_constant" in records[-1]:
        ax2.axhline(records[-1]["val_stg_mae_constant"], color="0.5", ls="--", label="a constant guess")
    ax2.legend(fontsize=8)
    ax2.set_xlabel("SFT step")
    ax2.set_ylabel("held-out |d(o) - true steps-to-go|")
    fig.tight_layout()
    write_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def _detector_rows(rows: list[dict[str, Any]], chosen: float | None) -> list[str]:
    lines = ["| s | precision | recall | F1 | frames fired |", "|---|---|---|---|---|"]
    for r in rows:
        mark = " (used)" if chosen is not None and abs(r["threshold"] - chosen) < 1e-9 else ""
        lines.append(f"| {r['threshold']:g}{mark} | {fmt(r['precision'])} | {fmt(r['recall'])} | "
                     f"{fmt(r['f1'])} | {r['fired']} |")
    return lines


def _demo_count(config: dict[str, Any], run_dir: Path) -> Any:
    """Episodes in the run's demo store; ``data.episodes`` only says how many to collect, not what was imported."""
    count = stored_episodes(config.get("data", {}).get("path") or RunDir(run_dir).demos)
    return count if count is not None else config.get("data", {}).get("episodes")


def write_report(run: str | Path, runs_dir: str | Path = "runs") -> Path:
    """(Re)build ``report.md`` and its plots from the run folder (a path, or a run name in ``runs_dir``).

    Safe at any time, also while the run is going: what is missing is said in a Status section.
    """
    run_dir = resolve_run_dir(run, runs_dir)
    files = RunDir(run_dir)
    metrics = MetricsLog(files.metrics)
    config = read_json(files.config)
    summary = read_json(files.summary)
    sft_eval, improve_eval = read_json(files.eval("sft")), read_json(files.eval("improve"))
    detector, rollouts = read_json(files.detector), read_json(files.detector_rollouts)
    improve_records = metrics.read("improve")
    fig_improve = plot_improvement(improve_records, sft_eval, run_dir / "improvement.png")
    fig_sft = plot_sft(metrics.read("sft"), run_dir / "sft.png")
    lines = [f"# Run `{run_dir.name}`", ""]
    if config:
        lines += [f"Domain `{config.get('domain')}`, env `{config.get('env', {}).get('id')}`, seed {config.get('seed')}, "
                  f"{_demo_count(config, run_dir)} demos (fraction {config.get('data', {}).get('fraction')}).", ""]
    if summary:
        lines += [f"Wall time: {summary.get('wall_time_s', 0):.0f} s.", ""]
    lines += status_lines(run_status(run_dir), run_dir.name)
    lines += ["## Results (true success from the simulator, fixed unseen eval seeds)", "",
              "| stage | success rate | 95% interval | mean episode length | eval episodes | robot episodes |",
              "|---|---|---|---|---|---|"]
    for name, result in (("SFT (stage 1)", sft_eval), ("Self-Improvement (stage 2)", improve_eval)):
        if result:
            robot = summary.get("improve", {}).get(
                "robot_episodes", max((r.get("robot_episodes", 0) for r in improve_records), default="")
            ) if "Self" in name else 0
            lines.append(f"| {name} | {fmt(result['success_rate'])} | [{fmt(result['ci95'][0])}, "
                         f"{fmt(result['ci95'][1])}] | {fmt(result['mean_episode_length'], 1)} | "
                         f"{result['eval_episodes']} | {robot} |")
    lines += _eval_point_rows(improve_records, sft_eval, improve_eval, config)
    lines += guard_table_rows(summary)
    for name, result in summary.get("controls", {}).items():
        lines.append(f"| control: {name.replace('_', ' ')} | {fmt(result['success_rate'])} | "
                     f"[{fmt(result['ci95'][0])}, {fmt(result['ci95'][1])}] | "
                     f"{fmt(result['mean_episode_length'], 1)} | {result['eval_episodes']} | 0 |")
    if lines[-1] == "|---|---|---|---|---|---|":
        lines.append("| no evaluation yet | | | | | |")
    lines.append("")
    if summary.get("reward") == "constant":
        lines += ["This run is the **constant-reward control** (r_t = 1): same REINFORCE loop and detector, "
                  "no steps-to-go reward.", ""]
    if fig_improve:
        lines += ["## Self-Improvement", "", f"![improvement]({fig_improve.name})", "",
                  "Eval points use fixed eval seeds and the simulator's success (diagnostic only: the learner "
                  "sees only the frozen model's reward and detector).", ""]
    lines += detection_lines(improve_records, detector)
    lines += guard_report_lines(run_dir, improve_records, summary)
    lines += video_lines(run_dir)
    lines += _practice_lines(summary.get("practice", {}) if summary else {}, read_json(files.fleet))
    if fig_sft:
        lines += ["## Stage 1 (SFT)", "", f"![sft]({fig_sft.name})", ""]
    if detector:
        probability = detector.get("detector") == "goal_probability"
        heading = ("`1 - P(steps-to-go = 0 | o, g) <= s` (`improve.detector = \"goal_probability\"`)" if probability
                   else "`d(o, g) <= s`, `d` without the \"never\" class (`improve.detector = \"reachable_steps_to_go\"`)"
                   if detector.get("detector") == "reachable_steps_to_go" else "`d(o, g) <= s`")
        lines += ["## Success detector " + heading, "",
                  f"Threshold used: **s = {detector['threshold']:g}** ({detector.get('source', '')}); "
                  f"recommended on held-out demos: {detector.get('recommended')}. "
                  f"Mean d on goal frames {fmt(detector.get('d_goal_frames_mean'), 2)}, "
                  f"on other frames {fmt(detector.get('d_other_frames_mean'), 2)}.", "",
                  "Per frame against the simulator's true success, on held-out demos:", ""]
        lines += _detector_rows(detector.get("held_out_demos_vs_true_success", []), detector["threshold"])
        lines.append("")
    if rollouts:
        ep = rollouts.get("episode_level", {})
        if ep:
            lines += [f"Self-Improvement episodes: {ep['detector_ended']} of {ep['episodes']} ended by the detector; "
                      f"of those, {fmt(ep['detector_ended_truly_successful'])} were truly successful at the last "
                      f"frame (episode-level precision). Of the episodes that truly reached the goal, "
                      f"{fmt(ep['truly_successful_detected'])} were ended by the detector (episode-level recall).", ""]
        lines += [f"Per frame, on the {rollouts['frames']} frames of Self-Improvement rollouts:", ""]
        lines += _detector_rows(rollouts.get("per_threshold", []), rollouts.get("threshold"))
        lines.append("")
    lines += diagnostics_lines(run_dir)
    write_text(files.report, "\n".join(lines) + "\n")
    return files.report


def detection_lines(records: list[dict[str, Any]], detector: dict | None) -> list[str]:
    """Detected vs true success of each practice batch: the moment the reward model is fooled shows as
    detected success running away from true success (true success is read for this table only)."""
    rows = [r for r in records if r.get("iteration", 0) >= 1 and "detected_success_rate" in r]
    lines = []
    if detector and detector.get("negatives_trained") is False and detector.get("mismatched_firing_rate") is not None:
        lines += ["**Warning:** the reward model was trained without mismatched-instruction negatives "
                  "(`sft.negatives = 0`); its detector is known to fire on states that are not the goal.", ""]
    if not rows:
        return lines
    lines += ["### Detected vs true success per practice batch", "",
              "| iteration | robot episodes | detected | truly successful | detector precision | detected / true |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        det, true = r["detected_success_rate"], r.get("batch_true_success_rate", float("nan"))
        ratio = det / true if true else float("inf")
        flag = " **fooled**" if ratio > 2 else ""
        lines.append(f"| {r['iteration']} | {r.get('robot_episodes', '')} | {fmt(det)} | {fmt(true)} | "
                     f"{fmt(r.get('detector_precision'))} | {ratio:.2f}{flag} |")
    return lines + ["", "**fooled**: the detector ended more than twice as many episodes as truly succeeded.", ""]


def _eval_point_rows(records: list[dict[str, Any]], sft_eval: dict, improve_eval: dict, config: dict) -> list[str]:
    """Stage 2's eval points standing in for final evaluations that are not written yet."""
    points = [r for r in records if "eval_success_rate" in r]
    chosen = []
    if not sft_eval and points and points[0].get("iteration") == 0:
        chosen.append(("SFT (Stage-2 eval point, iteration 0)", points[0]))
    if not improve_eval and points and points[-1].get("iteration", 0) > 0:
        chosen.append((f"Self-Improvement so far (eval point, iteration {points[-1]['iteration']})", points[-1]))
    n = config.get("improve", {}).get("eval_episodes", "")
    rows = []
    for label, r in chosen:
        ci = r.get("eval_ci95") or [None, None]
        rows.append(f"| {label} | {fmt(r['eval_success_rate'])} | [{fmt(ci[0])}, {fmt(ci[1])}] | "
                    f"{fmt(r.get('eval_mean_length'), 1)} | {r.get('eval_episodes', n)} | "
                    f"{r.get('robot_episodes', '')} |")
    return rows


def _practice_lines(practice: dict, fleet: dict) -> list[str]:
    """The fleet and the human help Stage 2 needed."""
    if not practice:
        return []
    lines = ["## Practice and human help", ""]
    if fleet:
        where = f"{fleet.get('robots')} robots on the `{fleet.get('backend')}` backend"
        if fleet.get("backend") == "ray":
            where += f" ({len(fleet.get('actors', []))} actors on {fleet.get('nodes')} node(s))"
        failures = fleet.get("failures", [])
        lines += [f"Fleet: {where}; robot failures survived: {len(failures)}."]
        lines += [f"- robots {f['robots'][0]}-{f['robots'][-1]}: {f['what']} (policy version "
                  f"{f.get('policy_version')})" for f in failures[:10]]
        lines.append("")
    lines += [f"Mode: {practice['mode']}. {practice['episodes']} episodes, {practice['env_steps']} env steps "
              f"({practice['robot_hours']:.2f} robot-hours at 10 Hz).", ""]
    if practice["mode"] == "reset-free":
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(practice["intervention_reasons"].items())) or "none"
        lines += ["| human interventions (resets) | per 100 episodes | per robot-hour | per detected success "
                  "| per true success | episodes per human |",
                  "|---|---|---|---|---|---|",
                  f"| {practice['interventions']} ({reasons}) | {fmt(practice['interventions_per_100_episodes'])} "
                  f"| {fmt(practice['interventions_per_robot_hour'])} "
                  f"| {fmt(practice['interventions_per_detected_success'])} "
                  f"| {fmt(practice['interventions_per_true_success'])} "
                  f"| {practice['episodes_per_human']} (one person per {practice['robots_per_human']} robots) |", "",
                  f"Each robot's first board ({practice['setups']} set-ups) is not counted as an intervention.", ""]
    return lines


def plot_guard(records: list[dict[str, Any]], out: Path) -> Path | None:
    """True success at the eval points and the guard score at its checks, against iterations."""
    checks = guard_records(records)
    if not checks:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    x = [r["iteration"] for r in checks]
    score = np.array([r["guard_score"] for r in checks])
    se = np.nan_to_num(np.array([r.get("guard_score_se", np.nan) for r in checks], dtype=float))
    ax.fill_between(x, score - se, score + se, color="C1", alpha=0.2)
    ax.plot(x, score, "s-", color="C1", label="guard score (validation boards, frozen model only)")
    ax.plot(x, [r["guard_detected_rate"] for r in checks], ":", color="C1", alpha=0.7,
            label="detected success (validation boards)")
    evals = [r for r in records if "eval_success_rate" in r]
    if evals:
        ax.plot([r["iteration"] for r in evals], [r["eval_success_rate"] for r in evals], "o-", color="C0",
                label="true success (eval seeds, diagnostic)")
    best = checks[-1].get("guard_best_iteration")
    if best is not None:
        ax.axvline(best, ls="--", color="gray", label=f"kept as best (iteration {best})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("Self-Improvement iteration")
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    write_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def guard_table_rows(summary: dict[str, Any]) -> list[str]:
    """A row for the report's results table: the guarded best checkpoint's true success."""
    best = (summary or {}).get("guard", {}).get("best", {})
    if "success_rate" not in best:
        return []
    return [f"| Self-Improvement, guarded best (iteration {best['iteration']}, guard score "
            f"{fmt(best['guard_score'])}) | {fmt(best['success_rate'])} | [{fmt(best['ci95'][0])}, "
            f"{fmt(best['ci95'][1])}] | {fmt(best['mean_episode_length'], 1)} | {best['eval_episodes']} | |"]


def guard_report_lines(run_dir: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    """The report's guard section: what was kept, why, and the plot of score vs true success."""
    fig = plot_guard(records, Path(run_dir) / "guard.png")
    if fig is None:
        return []
    summary = summary or {}
    g = summary.get("guard", {})
    checks = guard_records(records)
    last = checks[-1]
    domain = read_json(RunDir(run_dir).config).get("domain")
    views = describe_views(domain, GUARD_SHIFTS)
    if views:
        score = ("the share of episodes the detector ended, each counted by the fraction of label-preserving view "
                 f"changes ({views}) under which the detector also fires")
    else:
        score = ("the plain detector rate on the validation boards, the share of episodes the detector ended (no "
                 f"view changes: {f'domain {domain!r}' if domain else 'the domain'} defines none to confirm a "
                 "detection with)")
    lines = ["## Guard: keeping the best policy without true success", "",
             f"Every check scores the policy on {last['guard_episodes']} fixed validation boards with the frozen "
             f"reward model only: {score}. The best-scoring policy is `checkpoints/best` (iteration "
             f"{last.get('guard_best_iteration')}, score {fmt(last.get('guard_best_score'))}). Validation "
             f"episodes: {last['guard_robot_episodes']} (robot episodes, not counted as practice).", ""]
    rows = [("SFT", g.get("sft", {}), summary.get("sft", {})), ("final policy", g.get("final", {}), summary.get("improve", {})),
            ("guarded best", g.get("best", {}), g.get("best", {}))]
    if g:
        lines += ["| policy | iteration | guard score | true success (eval seeds, diagnostic) |", "|---|---|---|---|"]
        lines += [f"| {name} | {at.get('iteration', 'n/a')} | {fmt(at.get('guard_score'))} | "
                  f"{fmt(result.get('success_rate'))} |" for name, at, result in rows if at]
        lines.append("")
    if g.get("spearman_score_vs_eval") is not None:
        lines += [f"Spearman rank correlation of the guard score with true success across the eval points "
                  f"(diagnostic): {fmt(g['spearman_score_vs_eval'], 2)}.", ""]
    lines += [f"![guard]({fig.name})", ""]
    return lines
