"""The diagnosis in words: ``report.md``, the run report's section, the headline numbers, the terminal lines.

Reads only the result (what ``diagnostics.json`` holds), so the run report can rebuild its section
from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfimprove.diagnose.checks import HORIZONS, NEAR_STEPS, REPORT_THRESHOLDS, _at
from selfimprove.reward import REPORT_PROBABILITIES


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def score_name(detector: str | None) -> str:
    """What a detector compares with ``s``, as the reports write it."""
    return {"goal_probability": "1 - P(goal)", "reachable_steps_to_go": "d without the never class"}.get(detector or "", "d")


def audit_lines(audit: dict[str, Any] | None) -> list[str]:
    """The detector audit (audit.py) as a markdown section: the gate, then its parts."""
    if not audit:
        return []
    hold, score = audit["hold"], score_name(audit.get("detector"))
    lines = [f"## Detector audit ({score} <= s held for {hold} step{'s' if hold > 1 else ''})", "",
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
    score = score_name(result.get("detector"))
    lines += ["", f"Frame level: `{score} <= s` on a frame vs the simulator's success at that frame. Episode level: "
              f"the first frame where `{score} <= s` (where Stage 2 would end the episode) vs a true success at that frame; "
              "recall over episodes that truly succeed somewhere, FPR over those that never do.", ""]
    if "rollouts" in result:
        r = result["rollouts"]
        b = r["best_s_by_episode_f1"]
        lines += [f"Policy rollouts: {r['episodes']} episodes from eval seed {r['first_seed']} at temperature "
                  f"{r['temperature']:g}, run to the time limit (not ended on success or by the detector); "
                  f"true success rate {r['true_success_rate']:.3f}. On them, the grid s with the best "
                  f"episode-level F1 is {b['threshold']:g} (precision {_f(b['precision'])}, recall {_f(b['recall'])}); "
                  "that choice uses the simulator's success, so it is a check, not a rule a robot can apply.", ""]
    lines += setback_lines(result, "")
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
    probability = result.get("detector", "steps_to_go") == "goal_probability"
    title = "`1 - P(goal) <= s` (`improve.detector = \"goal_probability\"`)" if probability else "`d <= s`"
    lines += ["", f"## Success detector {title}", "", "![pr](pr.png) ![roc](roc.png)", ""]
    for name in ("demos", "rollouts"):
        if name not in result:
            continue
        sec = result[name]
        auc, ap = sec["detector_frames_curve"]["roc_auc"], sec["detector_frames_curve"]["average_precision"]
        lines += [f"{name}: frame-level ROC AUC {_f(auc)}, average precision {_f(ap)}.", "",
                  "| s | frame precision | frame recall | episode precision | episode recall | episode FPR | "
                  f"episode P / R within {NEAR_STEPS} steps | fired |", "|---|---|---|---|---|---|---|---|"]
        wanted = sorted(set(REPORT_PROBABILITIES if probability else REPORT_THRESHOLDS) | {s})
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
    return lines + [""] + setback_lines(result, "diagnostics/")


def setback_lines(result: dict[str, Any], prefix: str) -> list[str]:
    """The setback figure (diagnose/setback.py) with what it shows, when a rollout had one."""
    sb = result.get("setback")
    if not sb:
        return []
    modes = (f" Local peaks of the distribution above 0.05: {_f(sb['modes_before'], 2)} per frame before, "
             f"{_f(sb['modes_after'], 2)} in the 10 frames from it." if sb.get("modes_before") is not None else "")
    return ["### Steps-to-go through a setback", "",
            f"Eval seed {sb['seed']}: the setback comes at step {sb['step']} of {sb['length']} "
            f"({'the episode still succeeds' if sb['success'] else 'the episode fails'}).{modes}", "",
            f"![setback]({prefix}{sb['file']})", ""]


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
