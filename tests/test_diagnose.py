"""Reward-model diagnostics (`selfimprove diagnose`) on a tiny point-mass SFT checkpoint."""

import json
import math
import shutil

import numpy as np
import pytest

from selfimprove.cli import main
from selfimprove.diagnose import diagnose
from selfimprove.diagnose.checks import FrameSet, episode_table, frame_curve
from selfimprove.stats import spearman
from selfimprove.errors import CheckpointError
from selfimprove.reward import THRESHOLD_GRID, recommend_threshold
from selfimprove.train.improve import improve
from selfimprove.train.sft import sft_checkpoint

from conftest import quick_config

PLOTS = ("calibration.png", "error_by_horizon.png", "spearman.png", "pr.png", "roc.png")


@pytest.fixture(scope="module")
def diagnosed(trained_quick, tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnostics")
    result = diagnose(sft_checkpoint(trained_quick), config=trained_quick, rollouts=12, out=out)
    return trained_quick, out, result


def _in_unit(x):
    return x is None or 0.0 <= x <= 1.0


def test_diagnose_writes_json_report_and_plots(diagnosed):
    _, out, result = diagnosed
    saved = json.loads((out / "diagnostics.json").read_text())
    assert saved == result
    for key in ("recommended_s", "rule", "rule_table", "alternatives", "at_recommended_s", "demos", "rollouts"):
        assert key in saved
    for name in ("demos", "rollouts"):
        sec = saved[name]
        for key in ("calibration", "error_by_horizon", "spearman_d_vs_time", "detector_frames",
                    "detector_frames_curve", "detector_episodes", "mae", "true_steps_to_go_note"):
            assert key in sec, (name, key)
        assert sec["calibration"] and sec["error_by_horizon"]
        assert set(saved["at_recommended_s"][name]) == {"frame", "episode"}
    assert saved["rollouts"]["episodes"] == 12
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert f"s = {saved['recommended_s']:g}" in report and "Spearman" in report
    # strict JSON: no NaN anywhere
    assert "NaN" not in (out / "diagnostics.json").read_text()


def test_diagnostic_values_are_in_range(diagnosed):
    config, _, result = diagnosed
    demos, rollouts = result["demos"], result["rollouts"]
    for sec in (demos, rollouts):
        for part in sec["spearman_d_vs_time"].values():
            assert all(-1.0 - 1e-9 <= v <= 1.0 + 1e-9 for v in part["values"])
            if part["mean"] is not None:
                assert -1 <= part["mean"] <= 1
        for row in sec["detector_frames"] + sec["detector_episodes"]:
            assert _in_unit(row["precision"]) and _in_unit(row["recall"])
        curve = sec["detector_frames_curve"]
        assert _in_unit(curve["roc_auc"]) and _in_unit(curve["average_precision"])
        assert all(0 <= r["mean_d"] <= config.model.max_steps for r in sec["calibration"])
    # a trained steps-to-go head orders held-out demo frames: d falls with time on average
    assert demos["spearman_d_vs_time"]["all"]["mean"] < -0.3
    assert demos["detector_goal_frames_curve"]["roc_auc"] > 0.8
    # rollouts: a true steps-to-go only up to the first success of successful episodes
    succeeded = rollouts["spearman_d_vs_time"]["successful"]["episodes"]
    assert (rollouts["frames_with_true_steps_to_go"] > 0) == (succeeded > 0)
    assert rollouts["frames_with_true_steps_to_go"] <= rollouts["frames"]
    assert rollouts["best_s_by_episode_f1"]["threshold"] in [float(s) for s in THRESHOLD_GRID]


def test_recommended_s_follows_the_stated_rule(diagnosed):
    _, _, result = diagnosed
    table = result["rule_table"]
    assert [r["threshold"] for r in table] == [float(s) for s in THRESHOLD_GRID]
    best_f1 = max(r["f1"] for r in table)
    s = result["recommended_s"]
    assert s == min(r["threshold"] for r in table if r["f1"] == best_f1)
    at = next(r for r in result["demos"]["detector_goal_frames"] if r["threshold"] == s)
    assert at["f1"] == pytest.approx(best_f1)
    assert "F1" in result["rule"] and "goal frames" in result["rule"]


def test_improve_without_a_fixed_threshold_uses_the_recommended_s(trained_quick, tmp_path, diagnosed):
    _, _, result = diagnosed
    config = quick_config(tmp_path, "name=stage2", f"data.path={trained_quick.dataset_path}",
                          "improve.iterations=0", "improve.eval_every=0")
    improve(config, sft_path=sft_checkpoint(trained_quick), progress=False)
    detector = json.loads((config.run_dir / "detector.json").read_text())
    assert detector["threshold"] == detector["recommended"] == result["recommended_s"]
    assert detector["rule"] == result["rule"]
    fixed = quick_config(tmp_path, "name=fixed", f"data.path={trained_quick.dataset_path}", "improve.iterations=0",
                         "improve.eval_every=0", "improve.success_threshold=1.25")
    improve(fixed, sft_path=sft_checkpoint(trained_quick), progress=False)
    detector = json.loads((fixed.run_dir / "detector.json").read_text())
    assert detector["threshold"] == 1.25 and detector["source"] == "config"
    assert detector["recommended"] == result["recommended_s"]


def test_held_out_pass_is_cached_for_the_same_weights_only(diagnosed, tmp_path):
    """Stage 2 reads the diagnostics' pass over the held-out demos instead of repeating it."""
    import torch

    from selfimprove.model.checkpoint import load_checkpoint
    from selfimprove.reward import StepsToGoReward
    from selfimprove.reward import HELD_OUT_CACHE, demo_steps_to_go

    config, out, _ = diagnosed
    cache = out / HELD_OUT_CACHE
    assert cache.exists()  # written by diagnose
    model, _ = load_checkpoint(sft_checkpoint(config))
    fresh = demo_steps_to_go(StepsToGoReward(model, threshold=0.0), config)
    copy = tmp_path / HELD_OUT_CACHE
    shutil.copy(cache, copy)
    calls = []
    original = StepsToGoReward.read

    def counted(self, obs):
        calls.append(1)
        return original(self, obs)

    StepsToGoReward.read = counted
    try:
        cached = demo_steps_to_go(StepsToGoReward(model, threshold=0.0), config, copy)
        assert not calls  # read, not recomputed
        assert set(cached) == set(fresh)
        for key in fresh:
            np.testing.assert_array_equal(cached[key], fresh[key])
        with torch.no_grad():  # other weights: the cache is not theirs
            next(model.parameters()).add_(0.1)
        changed = demo_steps_to_go(StepsToGoReward(model, threshold=0.0), config, copy)
        assert calls and not np.array_equal(changed["d"], fresh["d"])
        copy.write_bytes(b"not an npz")  # corrupt: computed again, and rewritten
        again = demo_steps_to_go(StepsToGoReward(model, threshold=0.0), config, copy)
        np.testing.assert_array_equal(again["d"], changed["d"])
        assert np.load(copy)["d"].shape == changed["d"].shape
    finally:
        StepsToGoReward.read = original


def test_cli_reads_the_run_folder_and_writes_beside_the_checkpoint(trained_quick, tmp_path, capsys):
    run = tmp_path / "runs" / "old-run"
    shutil.copytree(sft_checkpoint(trained_quick), run / "checkpoints" / "sft")
    config = json.loads((trained_quick.run_dir / "config.json").read_text())
    config["data"]["path"] = str(trained_quick.dataset_path)
    config["improve"]["robots"] = 16  # a field an older version wrote: ignored with a warning
    (run / "config.json").write_text(json.dumps(config))
    assert main(["diagnose", str(run / "checkpoints" / "sft"), "--rollouts", "0"]) == 0
    saved = json.loads((run / "diagnostics" / "diagnostics.json").read_text())
    assert "rollouts" not in saved and saved["dataset"] == str(trained_quick.dataset_path)
    assert "recommended s =" in capsys.readouterr().out


def test_missing_or_corrupt_checkpoint_is_a_clear_error(trained_quick, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        diagnose(tmp_path / "nowhere", config=trained_quick, rollouts=0, out=tmp_path / "out")
    broken = tmp_path / "checkpoints" / "sft"
    broken.mkdir(parents=True)
    source = sft_checkpoint(trained_quick)
    (broken / "config.json").write_text((source / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        diagnose(broken, config=trained_quick, rollouts=0, out=tmp_path / "out")
    (broken / "config.json").write_text("{ not json")
    assert main(["diagnose", str(broken)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_statistics_on_known_inputs():
    assert spearman(np.arange(10), -np.arange(10) * 3.0) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.ones(5), np.arange(5)))
    d = np.array([0.1, 0.2, 5.0, 6.0])
    curve = frame_curve(d, np.array([True, True, False, False]))
    assert curve["roc_auc"] == pytest.approx(1.0) and curve["average_precision"] == pytest.approx(1.0)
    # two episodes: one reaches the goal at its last frame, one never does but d dips to 1.5 at frame 1
    frames = FrameSet(d=np.array([9.0, 4.0, 0.5, 9.0, 1.5, 8.0]),
                      success=np.array([False, False, True, False, False, False]),
                      true_stg=np.array([2.0, 1.0, 0.0, np.nan, np.nan, np.nan]), time=np.array([0, 1, 2, 0, 1, 2]),
                      starts=np.array([0, 3]), sizes=np.array([3, 3]))
    rows = {r["threshold"]: r for r in episode_table(frames, np.array([1.0, 2.0, 5.0]))}
    assert rows[1.0]["fired"] == 1 and rows[1.0]["precision"] == 1.0 and rows[1.0]["fpr"] == 0.0
    assert rows[2.0]["fired"] == 2 and rows[2.0]["precision"] == 0.5 and rows[2.0]["fpr"] == 1.0
    assert rows[5.0]["early"] == 1 and rows[5.0]["recall"] == 0.0 and rows[5.0]["steps_early_median"] == 1.0
    assert rows[5.0]["precision_near"] == 0.5 and rows[5.0]["recall_near"] == 1.0  # success 1 step after firing
    choice = recommend_threshold(np.array([0.3, 3.0, 8.0]), np.array([True, False, False]))
    assert choice["threshold"] == 0.5 and "goal frames" in choice["rule"]
