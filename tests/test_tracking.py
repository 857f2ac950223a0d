"""Tracking and media: TensorBoard scalars mirror metrics.jsonl, rollout videos, reports of partial runs."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from selfimprove.cli import main
from selfimprove.config import load_config
from selfimprove.data.episode import Episode
from selfimprove.domains import instruction_of, make_env, observation_dict
from selfimprove.errors import ConfigError
from selfimprove.pipeline import run_pipeline
from selfimprove.runlog import MetricsLog
from selfimprove.videos import episode_frames, read_index, record_videos, write_gif

from conftest import quick_config

TINY = ["data.episodes=40", "sft.steps=200", "sft.eval_every=100", "sft.checkpoint_every=100",
        "improve.iterations=2", "improve.steps_per_iteration=128", "improve.eval_every=1",
        "improve.eval_episodes=5", "eval.episodes=10", "fleet.robots=4", "eval.videos=2"]


def tensorboard_scalars(logdir):
    """{tag: [(step, value), ...]} read back with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(records):
    """What metrics.jsonl says TensorBoard should hold: numbers (and entries of number lists) per stage."""
    out = {}
    for r in records:
        step = r["step"] if "step" in r else r["iteration"]
        for key, value in r.items():
            if key in ("stage", "step", "iteration"):
                continue
            items = [(f"{key}_{i}", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
            for name, v in items:
                if isinstance(v, (int, float)):
                    out.setdefault(f"{r['stage']}/{name}", []).append((step, float(v)))
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    config = quick_config(tmp_path_factory.mktemp("runs"), "name=tiny", "tensorboard=true", *TINY)
    run_pipeline(config, progress=False)
    return config


def test_tensorboard_events_hold_every_metric_of_the_run(tiny_run):
    records = MetricsLog(tiny_run.run_dir / "metrics.jsonl").read()
    assert {r["stage"] for r in records} == {"sft", "improve"}
    got = tensorboard_scalars(tiny_run.run_dir / "tensorboard")
    want = expected_scalars(records)
    assert set(got) == set(want) and "sft/val_bc" in got and "improve/eval_success_rate" in got
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in points], rtol=1e-6, atol=1e-6)
    assert [s for s, _ in got["sft/val_bc"]] == [100, 200]
    assert [s for s, _ in got["improve/eval_success_rate"]] == [0, 1, 2]


def test_restarted_stage_rebuilds_tensorboard_from_the_kept_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    for step in (1, 2, 3):
        log.append({"stage": "sft", "step": step, "loss": float(step), "note": "text is not a scalar"})
    log.keep(lambda r: r["step"] <= 2)  # a resume at step 2 forgets step 3
    MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True).append({"stage": "sft", "step": 3, "loss": 30.0})
    assert tensorboard_scalars(tmp_path / "tensorboard") == {"sft/loss": [(1, 1.0), (2, 2.0), (3, 30.0)]}


def test_tensorboard_setting_off_auto_and_required(tmp_path, monkeypatch):
    import selfimprove.tracking as tracking

    off = quick_config(tmp_path, "name=off", "tensorboard=false")
    MetricsLog.for_run(off).append({"stage": "sft", "step": 1, "loss": 1.0})
    assert (off.run_dir / "metrics.jsonl").exists() and not (off.run_dir / "tensorboard").exists()
    monkeypatch.setattr(tracking, "tensorboard_available", lambda: False)
    auto = quick_config(tmp_path, "name=auto")
    assert auto.tensorboard is None
    MetricsLog.for_run(auto).append({"stage": "sft", "step": 1, "loss": 1.0})
    assert not (auto.run_dir / "tensorboard").exists()
    with pytest.raises(ConfigError, match=r"pip install 'selfimprove\[tensorboard\]'"):
        MetricsLog.for_run(quick_config(tmp_path, "name=required", "tensorboard=true"))


def test_rollout_videos_are_written_and_shown_in_the_report(tiny_run):
    run_dir = tiny_run.run_dir
    index = read_index(run_dir)
    assert set(index) == {"sft", "improve"}
    report = (run_dir / "report.md").read_text()
    assert "## Rollouts" in report and "## Status" not in report  # a finished run
    for stage, entries in index.items():
        assert len(entries) == 2
        assert [e["seed"] for e in entries] == [tiny_run.eval.seed, tiny_run.eval.seed + 1]  # same boards
        for e in entries:
            assert f"(videos/{e['file']})" in report
            gif = Image.open(run_dir / "videos" / e["file"])
            assert gif.n_frames == e["length"] + 1 and gif.size[0] >= 256
    before = {e["file"]: (run_dir / "videos" / e["file"]).stat().st_mtime_ns for e in index["sft"]}
    assert record_videos(tiny_run, run_dir / "checkpoints" / "sft", "sft") == index["sft"]  # resume: kept
    assert {f: (run_dir / "videos" / f).stat().st_mtime_ns for f in before} == before


def test_tabletop_video_frames_are_the_upscaled_camera_with_a_caption(tmp_path):
    config = load_config("language-table-quick")
    env = make_env(config)
    obs, info = env.reset(seed=5)
    frames, actions, success = [observation_dict(obs)], [], [info["is_success"]]
    for _ in range(4):
        obs, _, _, _, info = env.step(env.action_space.sample())
        frames.append(observation_dict(obs))
        actions.append(np.zeros(2, np.float32))
        success.append(info["is_success"])
    episode = Episode({k: np.stack([f[k] for f in frames]) for k in frames[0]}, np.stack(actions),
                      instruction_of(obs, info, env), true_success=False, info={"is_success": np.array(success)})
    env.close()
    out = episode_frames(episode, config, "SFT")
    image = episode.observations["image"]  # [T+1, 32, 32, 3]
    assert len(out) == episode.length + 1 and out[0].shape[1] == 256  # 32 px x 8
    scale = 256 // image.shape[2]
    big = np.repeat(np.repeat(image[-1], scale, axis=0), scale, axis=1)
    rows = [i for i in range(out[-1].shape[0] - big.shape[0] + 1) if np.array_equal(out[-1][i:i + big.shape[0]], big)]
    assert len(rows) == 1 and rows[0] > 0 and rows[0] + big.shape[0] < out[-1].shape[0]  # caption above and below
    gif = Image.open(write_gif(out, tmp_path / "ep.gif"))
    assert gif.n_frames == len(out)


def test_report_rebuilds_from_a_partial_run_by_name(tiny_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    part = runs / "partial"
    part.mkdir(parents=True)
    shutil.copy(tiny_run.run_dir / "config.json", part / "config.json")
    records = MetricsLog(tiny_run.run_dir / "metrics.jsonl").read()
    sft_lines = [json.dumps(r) for r in records if r["stage"] == "sft"]
    (part / "metrics.jsonl").write_text("\n".join(sft_lines) + '\n{"stage": "sft", "st')  # a line being written
    assert main(["report", "partial", "--runs-dir", str(runs)]) == 0
    report = (part / "report.md").read_text()
    assert "## Status: not finished" in report and "| Stage 1 (SFT) | **in progress**: step 200 of 200 logged |" in report
    assert "| Stage 2 (Self-Improvement) | not started |" in report and "no evaluation yet" in report
    assert "![sft](sft.png)" in report and (part / "sft.png").stat().st_size > 1000
    assert "## Rollouts" not in report and "improvement.png" not in report
    # mid Stage 2: SFT evaluated, one iteration done, no final evaluation yet
    shutil.copy(tiny_run.run_dir / "eval_sft.json", part / "eval_sft.json")
    improve = [json.dumps(r) for r in records if r["stage"] == "improve" and r["iteration"] <= 1]
    (part / "metrics.jsonl").write_text("\n".join(sft_lines + improve) + "\n")
    assert main(["report", str(part)]) == 0
    report = (part / "report.md").read_text()
    assert "| Stage 2 (Self-Improvement) | **in progress**: iteration 1 of 2" in report
    assert "| SFT (stage 1) |" in report and "Self-Improvement so far (eval point, iteration 1)" in report
    assert "| Stage 2 evaluation | not yet |" in report and (part / "improvement.png").exists()
    capsys.readouterr()
    assert main(["report", "nosuchrun", "--runs-dir", str(runs)]) == 2
    assert "Runs in" in capsys.readouterr().err
