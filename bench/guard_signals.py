"""Which reward-model signal tracks true success during Self-Improvement? Measured on finished runs.

For each run folder it recomputes, with the frozen SFT model (``checkpoints/sft``), per-episode
signals at the frame where each stored practice episode ended (see ``selfimprove.train.guard``):
the spread of the steps-to-go distribution, the mass at or below ``s``, ``d`` under the left-right
mirror, and (``--replay``) the current policy's own steps-to-go head. The policy of every
iteration is rebuilt by replaying the REINFORCE updates on the stored batches (the runs keep only
the final policy). Each signal is then compared with the true-success eval points in
``metrics.jsonl`` (Spearman across eval points, practice episodes of policy versions within
``--window`` of the eval point) and with the practice batches' true success (Spearman across
iterations); ``auc`` is how well a per-episode signal separates truly successful from spurious
detector firings. True success is read here only to judge the signals.

Usage: ``python bench/guard_signals.py runs/lt-08 runs/lt-08-s1 [--replay] [--out guard_signals.json]``
(one torch thread; 5-45 s per 1,000-episode tabletop run, 1-4 min with ``--replay``). Results: docs/guard.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from selfimprove.config import load_config  # noqa: E402
from selfimprove.data.store import EpisodeStore  # noqa: E402
from selfimprove.model.checkpoint import load_checkpoint  # noqa: E402
from selfimprove.reward import StepsToGoReward  # noqa: E402
from selfimprove.runlog import torch_generator  # noqa: E402
from selfimprove.domains import views_for  # noqa: E402
from selfimprove.stats import spearman  # noqa: E402
from selfimprove.train.guard import blind, fire_frame_signals  # noqa: E402


def episode_table(run: Path, replay: bool, every: int) -> dict[str, np.ndarray]:
    """Per-episode signals of one run's practice episodes (every ``every``-th episode of each batch)."""
    # the runs' config.json may come from an older version of the config: only these fields are read
    cfg = json.loads((run / "config.json").read_text())
    threshold = json.loads((run / "detector.json").read_text())["threshold"]
    reward = StepsToGoReward.from_checkpoint(run / "checkpoints" / "sft", threshold)
    views = views_for(cfg["domain"], shifts=4)  # mirror, then 4 random scene shifts
    store = EpisodeStore(run / "improve_episodes")
    versions = np.array([store.episode_meta(i)["policy_version"] for i in range(store.num_episodes)])
    config = load_config("language-table" if cfg["domain"] == "language-table" else "pointmass",
                         [f"seed={cfg['seed']}"] + [f"improve.{k}={cfg['improve'][k]}" for k in
                                                     ("lr", "gamma", "loss_scale", "minibatch_size", "temperature")])
    policy, optimizer = None, None
    if replay:
        from selfimprove.train.improve import reinforce_batch
        from selfimprove.train.objectives import policy_update

        policy, _ = load_checkpoint(run / "checkpoints" / "sft")
        policy.eval()
        optimizer = torch.optim.Adam(policy.parameters(), lr=config.improve.lr)
    rows: dict[str, list] = {}
    for v in range(int(versions.max()) + 1):
        idx = np.flatnonzero(versions == v)
        if not len(idx):
            continue
        episodes = store.episodes(idx if replay else idx[::every])
        pick = list(range(0, len(episodes), every if replay else 1))
        chosen = [episodes[i] for i in pick]
        signals = fire_frame_signals(reward, [blind(e) for e in chosen], policy=policy, views=views)
        signals["true_success"] = np.array([bool(e.true_success) for e in chosen])  # to judge signals only
        signals["version"] = np.full(len(chosen), v)
        for k, val in signals.items():
            rows.setdefault(k, []).append(val)
        if replay:
            batch = reinforce_batch(episodes, policy, config.improve.gamma, config.improve.reward)
            policy_update(policy, optimizer, *batch, config, torch_generator(config.seed, 3, v))
    table = {k: np.concatenate(v) for k, v in rows.items()}
    table["threshold"] = np.full(len(table["d"]), threshold)
    return table


def per_episode_scores(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Candidate per-episode guard scores (0 for episodes the detector did not end)."""
    s = t["threshold"]
    det = t["detected"].astype(float)
    out = {
        "detected": det,
        "det_x_p_fire": det * t["p_fire"],
        "det_x_exp_-std/10": det * np.exp(-t["std"] / 10),
        "det_x_exp_-entropy": det * np.exp(-t["entropy"]),
        "det_and_mirror_fires": det * (t["d_views"][:, 0] <= s),
        "det_x_exp_-|d-d_mirror|": det * np.exp(-np.abs(t["d"] - t["d_views"][:, 0])),
        "det_x_views_firing": det * (t["d_views"] <= s[:, None]).mean(1),
        "det_x_exp_-view_mad": det * np.exp(-np.abs(t["d"][:, None] - t["d_views"]).mean(1)),
        "det_and_last_drop<=2": det * (t["last_drop"] <= 2),
    }
    if np.isfinite(t["d_policy"]).any():
        out["det_and_policy_fires"] = det * (t["d_policy"] <= s)
        out["det_x_exp_-|d-d_policy|"] = det * np.exp(-np.abs(t["d"] - t["d_policy"]))
    return out


def fire_signals(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw disagreement/uncertainty signals (higher = less trustworthy), at detector firings."""
    out = {"std": t["std"], "entropy": t["entropy"], "1-p_fire": 1 - t["p_fire"],
           "|d-d_mirror|": np.abs(t["d"] - t["d_views"][:, 0]),
           "view_mad": np.abs(t["d"][:, None] - t["d_views"]).mean(1),
           "views_not_firing": (t["d_views"] > t["threshold"][:, None]).mean(1),
           "max_drop": t["max_drop"], "last_drop": t["last_drop"], "d_at_fire": t["d"],
           "-length": -t["length"].astype(float)}
    if np.isfinite(t["d_policy"]).any():
        out["|d-d_policy|"] = np.abs(t["d"] - t["d_policy"])
    return out


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count half."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def analyse(run: Path, t: dict[str, np.ndarray], window: int) -> dict:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["iteration"], r["eval_success_rate"]) for r in metrics
             if r.get("stage") == "improve" and "eval_success_rate" in r]
    last = int(t["version"].max())
    scores = per_episode_scores(t)
    raw = fire_signals(t)
    det = t["detected"]

    def at(k: int) -> np.ndarray:
        return (t["version"] >= max(0, min(k, last) - window)) & (t["version"] <= min(k, last) + window)

    result: dict = {"eval_points": evals, "episodes": int(len(det)), "by_signal": {}}
    true_eval = np.array([e for _, e in evals])
    per_it = [t["version"] == v for v in range(last + 1)]
    batch_true = np.array([t["true_success"][m].mean() for m in per_it])
    for name, sc in {**scores, **{f"mean {k} at firings": v for k, v in raw.items()}}.items():
        is_raw = name.startswith("mean ")
        def agg(mask):
            m = mask & det if is_raw else mask
            return float(np.nanmean(sc[m])) if m.any() else float("nan")
        at_evals = np.array([agg(at(k)) for k, _ in evals])
        per_iter = np.array([agg(m) for m in per_it])
        entry = {"at_eval_points": [round(x, 3) for x in at_evals],
                 "spearman_eval_points": round(spearman(at_evals, true_eval), 3),
                 "spearman_iterations_vs_batch_true": round(spearman(per_iter, batch_true), 3)}
        if is_raw:  # low disagreement should mean a true success: AUC of -signal among firings
            entry["auc_true_vs_spurious_firings"] = round(auc(-sc[det], t["true_success"][det]), 3)
        result["by_signal"][name] = entry
    result["firings_truly_successful"] = round(float(t["true_success"][det].mean()), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--replay", action="store_true", help="rebuild each iteration's policy (d_policy)")
    parser.add_argument("--every", type=int, default=1, help="score every k-th episode of a batch")
    parser.add_argument("--window", type=int, default=2, help="policy versions either side of an eval point")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    parser.add_argument("--tables", type=Path, default=None, help="also save per-episode signals (npz) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {}
    for run in args.runs:
        t0 = time.time()
        table = episode_table(run, args.replay, args.every)
        if args.tables:
            args.tables.mkdir(parents=True, exist_ok=True)
            np.savez(args.tables / f"{run.name}.npz", **table)
        report[run.name] = analyse(run, table, args.window)
        report[run.name]["seconds"] = round(time.time() - t0, 1)
        print(run.name, json.dumps(report[run.name], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
