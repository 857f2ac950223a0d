"""The detector audit (diagnose/audit.py): replaying the detector on demos and rollouts, causes, the gate."""

import json

import numpy as np

from selfimprove.diagnose.audit import audit_demos, audit_rollouts, first_firings, gate, reward_signal
from selfimprove.data.episode import Episode
from selfimprove.experiment.plots import plot_episodes_vs_success


def _rollout(d, success, distance, positions=None):
    n = len(d)
    info = {"is_success": np.asarray(success, dtype=bool), "goal_distance": np.asarray(distance, dtype=float)}
    if positions is not None:
        info["block_positions"] = np.asarray(positions, dtype=float)
    return Episode(observations={"x": np.zeros((n, 1))}, actions=np.zeros((n - 1, 2)), instruction="push it",
                   true_success=bool(np.any(success)), info=info, stg=np.asarray(d, dtype=np.float32))


def test_first_firings_respect_the_hold():
    d = np.array([5, 1, 1, 5, 1, 1, 1, 9, 9])
    assert first_firings(d, np.array([7, 2]), 2.0, 1) == [1, None]
    assert first_firings(d, np.array([7, 2]), 2.0, 3) == [6, None]


def test_rollout_audit_counts_precision_and_causes():
    far_apart = [[0.3, 0.0], [0.3, 0.2], [0.5, 0.0]]
    adjacent = [[0.3, 0.0], [0.3, 0.2], [0.3, 0.03]]  # blocks 0 and 2 touch; the named pair is far
    episodes = [
        _rollout([9, 5, 1, 1], [0, 0, 1, 1], [0.2, 0.1, 0.04, 0.04]),  # fires at t=2, truly successful
        _rollout([9, 1, 9, 9], [0, 0, 0, 0], [0.2, 0.08, 0.2, 0.2]),  # fires at t=1: goal missed by < 10 cm
        _rollout([9, 1, 9, 9], [0, 0, 0, 0], [0.3] * 4, [far_apart] * 4),  # fires: named pair far apart
        _rollout([9, 1, 9, 9], [0, 0, 0, 0], [0.3] * 4, [adjacent] * 4),  # fires: another pair adjacent
        _rollout([9, 9, 9, 9], [0, 0, 0, 1], [0.2, 0.2, 0.2, 0.04]),  # never fires; succeeds at the end
    ]
    out = audit_rollouts(episodes, threshold=2.0, hold=1)
    assert out["fired"] == 4 and out["episode_precision"] == 0.25 and out["episode_recall"] == 0.5
    assert out["first_firings_named_pair_far"] == 0.5
    assert out["false_firings_by_cause"] == {"goal missed (named pair within 10 cm)": 1, "named pair far apart": 1,
                                             "another pair adjacent": 1}


def test_reward_signal_tells_a_reward_that_follows_progress_from_noise():
    rng = np.random.default_rng(0)
    distance = [np.clip(np.linspace(0.3, 0.0, 40) + rng.normal(0, 0.03, 40).cumsum() * 0.1, 0, None) for _ in range(20)]
    follows = [_rollout(200 * x, [0] * 40, x) for x in distance]  # d proportional to the true distance
    noise = [_rollout(rng.uniform(0, 80, 40), [0] * 40, x) for x in distance]  # d unrelated to it
    good, bad = reward_signal(follows, gamma=0.9), reward_signal(noise, gamma=0.9)
    assert good["step"] > 0.99 and good["return"] > 0.9
    assert abs(bad["step"]) < 0.1 and abs(bad["return"]) < 0.1
    # the baseline strips d(o_t)'s own frame noise from the return (steady progress at each episode's pace)
    steady = [np.linspace(0.3, 0.3 - rng.uniform(0, 0.3), 40) for _ in range(20)]
    noisy = [_rollout(200 * x + rng.normal(0, 15, 40), [0] * 40, x) for x in steady]
    out = reward_signal(noisy, gamma=0.9)
    assert out["return_with_baseline"] > out["return"]
    no_distance = [Episode(observations={"x": np.zeros((3, 1))}, actions=np.zeros((2, 2)), instruction="go",
                           stg=np.zeros(3, np.float32))]
    assert reward_signal(no_distance, gamma=0.9) is None


def test_demo_audit_and_the_gate():
    held_out = {"d": np.array([9, 4, 1, 0.5, 9, 1, 9]), "steps_to_go": np.array([3, 2, 0, 0, 2, 1, 0]),
                "episode_start": np.array([0, 4]), "d_mismatched": np.array([9, 9, 9, 9, 9, 1, 9])}
    demos = audit_demos(held_out, threshold=2.0, hold=1)
    assert demos["episode_recall"] == 0.5 and demos["fired_early"] == 0.5  # second episode fires 1 step early
    assert demos["mismatched_frame_firing"] == 1 / 7
    checks = gate(demos, {"episode_precision": 0.6, "first_firings_named_pair_far": 0.1,
                          "mismatched_frame_firing": 0.01})
    assert checks["demo_episode_recall"]["pass"] and checks["rollout_episode_precision"]["pass"]
    assert not checks["mismatched_frame_firing"]["pass"]  # the worse of demos (1/7) and rollouts
    assert gate(demos, None)["rollout_episode_precision"]["pass"] is None


def test_episodes_vs_success_plot_reads_experiment_summaries(tmp_path):
    def stage(mean, demos, robots, seeds):
        return {"n": len(seeds), "mean": mean, "ci95_t": [mean - 0.05, mean + 0.05], "per_seed": seeds,
                "demo_episodes_mean": demos, "total_episodes_mean": demos + robots,
                "pooled": {"ci95_wilson": [mean - 0.05, mean + 0.05], "successes": int(mean * 200) * len(seeds),
                           "episodes": 200 * len(seeds)}}
    summary = {"aggregates": [
        {"settings": {"lever": "all"}, "stages": {"sft": stage(0.4, 950, 0, [0.4]),
                                                  "improve": stage(0.45, 950, 1000, [0.44, 0.46])}},
        {"settings": {"lever": "constant"}, "stages": {"sft": stage(0.4, 950, 0, [0.4]),
                                                       "improve": stage(0.41, 950, 1000, [0.41])}}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    out = plot_episodes_vs_success(tmp_path / "plot.png", {"10%": tmp_path / "summary.json"})
    assert out.exists() and out.stat().st_size > 1000
    # another grid's names for its cells, and the SFT curve that practice is judged against
    curve = plot_episodes_vs_success(tmp_path / "curve.png", {"10%": tmp_path / "summary.json"},
                                     cells={"constant": "control", "all": "method"}, method="constant",
                                     sft_curve=[(1900, 0.5), (950, 0.4)])
    assert curve.stat().st_size > out.stat().st_size  # the curve's line and legend entry are drawn
