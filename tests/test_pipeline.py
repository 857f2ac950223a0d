"""End-to-end runs on tiny configs, resume after interruption, and bad input at the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import selfimprove
from selfimprove.cli import main
from selfimprove.data.store import EpisodeStore
from selfimprove.model.checkpoint import load_checkpoint
from selfimprove.pipeline import run_pipeline
from selfimprove.train.improve import episodes_dir, improve
from selfimprove.train.sft import sft_checkpoint

from conftest import quick_config

VOLATILE = {"collect_s", "update_s", "time_s"}


def improve_records(config):
    lines = (config.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records if r["stage"] == "improve"]


def test_quick_run_end_to_end_writes_summary_report_and_plots(tmp_path):
    config = quick_config(tmp_path, "improve.iterations=3", "improve.eval_every=3")
    summary = run_pipeline(config, progress=False)
    saved = json.loads((config.run_dir / "summary.json").read_text())
    assert saved == summary
    assert summary["domain"] == "pointmass" and summary["seed"] == 0 and summary["wall_time_s"] > 0
    for stage in ("sft", "improve"):
        s = summary[stage]
        assert 0 <= s["success_rate"] <= 1 and s["ci95"][0] <= s["success_rate"] <= s["ci95"][1]
        assert s["eval_episodes"] == config.eval.episodes and s["mean_episode_length"] > 0
    store = EpisodeStore(episodes_dir(config))
    assert summary["improve"]["robot_episodes"] == store.num_episodes > 0
    versions = {store.episode_meta(i)["policy_version"] for i in range(store.num_episodes)}
    assert versions == {0, 1, 2}
    # the learning curve starts at the SFT evaluation and ends at the final one: neither is run twice
    points = [r for r in improve_records(config) if "eval_success_rate" in r]
    assert [p["iteration"] for p in points] == [0, 3]
    for point, stage in zip(points, ("sft", "improve")):
        assert point["eval_success_rate"] == summary[stage]["success_rate"]
        assert point["eval_episodes"] == config.eval.episodes
    assert json.loads((config.run_dir / "eval_improve.json").read_text())["checkpoint"] == str(
        config.run_dir / "checkpoints" / "improve")
    # the code that made it: in the summary, the run folder and every checkpoint
    code = summary["provenance"]
    assert code["selfimprove"] == selfimprove.__version__ and code["torch"] == torch.__version__
    assert code["precision"] == {"setting": "float32", "gradient_steps": "float32"}
    assert code["commit"] is None or len(code["commit"]) == 40
    assert json.loads((config.run_dir / "provenance.json").read_text())["processes"][0]["commit"] == code["commit"]
    for stage in ("sft", "improve"):
        saved_code = json.loads((config.run_dir / "checkpoints" / stage / "config.json").read_text())["provenance"]
        assert saved_code == code
    report = (config.run_dir / "report.md").read_text()
    assert "Self-Improvement (stage 2)" in report and "precision" in report
    assert (config.run_dir / "improvement.png").stat().st_size > 1000
    (config.run_dir / "report.md").unlink()
    assert main(["report", str(config.run_dir)]) == 0 and (config.run_dir / "report.md").read_text() == report
    # resuming a finished run recomputes nothing and gives the same summary
    again = run_pipeline(config, resume=True, progress=False)
    assert {k: v for k, v in again.items() if k != "wall_time_s"} == {
        k: v for k, v in summary.items() if k != "wall_time_s"}


def _stage2_config(shared, tmp_path, name, iterations, *extra):
    return quick_config(tmp_path, f"name={name}", f"data.path={shared.dataset_path}",
                        f"improve.iterations={iterations}", "improve.eval_every=2", "improve.eval_episodes=10",
                        *extra)


def test_resume_continues_bit_for_bit(trained_quick, tmp_path):
    sft_path = sft_checkpoint(trained_quick)
    straight = _stage2_config(trained_quick, tmp_path, "straight", 4)
    improve(straight, sft_path, progress=False)
    stopped = _stage2_config(trained_quick, tmp_path, "stopped", 2)
    improve(stopped, sft_path, progress=False)
    resumed = _stage2_config(trained_quick, tmp_path, "stopped", 4)
    final = improve(resumed, sft_path, resume=True, progress=False)
    assert improve_records(resumed) == improve_records(straight)
    a, _ = load_checkpoint(final)
    b, _ = load_checkpoint(straight.run_dir / "checkpoints/improve")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert EpisodeStore(episodes_dir(resumed)).num_episodes == EpisodeStore(episodes_dir(straight)).num_episodes


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_killed_learner_resumes_to_the_same_result(trained_quick, tmp_path, backend):
    """A real SIGKILL at an arbitrary point of Stage 2, then --resume."""
    if backend == "ray":
        pytest.importorskip("ray")
    extra = ["fleet.robots=2", "improve.steps_per_iteration=1024", f"fleet.backend={backend}"]
    reference = _stage2_config(trained_quick, tmp_path, "reference", 6, *extra)
    improve(reference, sft_checkpoint(trained_quick), progress=False)
    args = ["improve", "pointmass-quick", "--name", "killed", "--runs-dir", str(tmp_path),
            "--dataset", str(trained_quick.dataset_path), "--iterations", "6", "--sft",
            str(sft_checkpoint(trained_quick)), "--no-progress", "--set", "improve.eval_every=2",
            "--set", "improve.eval_episodes=10"] + [a for kv in extra for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "selfimprove.cli", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"iteration": 2,' in metrics.read_text():
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main([*args, "--resume"]) == 0
    killed = _stage2_config(trained_quick, tmp_path, "killed", 6, *extra)
    assert improve_records(killed) == improve_records(reference)
    assert EpisodeStore(episodes_dir(killed)).num_episodes == EpisodeStore(episodes_dir(reference)).num_episodes


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_sft_stopped_by_a_signal_says_how_to_resume_and_resumes_to_the_same_records(trained_quick, tmp_path, stop):
    """SIGTERM (schedulers, docker stop) and SIGHUP stop a command as Ctrl-C does: exit 128 + signal, the line
    that says how to continue, no traceback; --resume then gives an undisturbed run's records (but their
    wall-clock time_s) and weights, the train losses' moving averages included."""
    args = ["sft", "pointmass-quick", "--runs-dir", str(tmp_path), "--dataset", str(trained_quick.dataset_path),
            "--no-progress", "--set", "sft.checkpoint_every=500"]
    assert main([*args, "--name", "reference"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "selfimprove.cli", *args, "--name", "stopped"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "stopped" / "checkpoints" / "sft_state"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not state.exists():
        time.sleep(0.01)
    proc.send_signal(getattr(signal, stop))
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + getattr(signal, stop), err
    assert f"interrupted ({stop}); finished work is saved; continue with --resume" in err and "Traceback" not in err
    assert not (tmp_path / "stopped" / "checkpoints" / "sft").exists()  # stopped mid-SFT
    assert main([*args, "--name", "stopped", "--resume"]) == 0

    def records(name):
        return [{k: v for k, v in r.items() if k != "time_s"}
                for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())]

    assert records("stopped") == records("reference")
    a, _ = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "sft")
    b, _ = load_checkpoint(tmp_path / "reference" / "checkpoints" / "sft")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_input_gets_clear_errors_and_nothing_is_lost(trained_quick, tmp_path, capsys):
    base = ["--runs-dir", str(tmp_path), "--no-progress"]
    assert main(["sft", "pointmass-quick", "--name", "x", "--dataset", str(tmp_path / "missing"), *base]) == 2
    assert "no dataset at" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # the failed command left no half-made run folder behind
    assert main(["improve", "pointmass-quick", "--name", "y", "--sft", str(tmp_path / "nock"), *base]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    # an existing run is never overwritten without --resume
    before = sorted(p.name for p in trained_quick.run_dir.iterdir())
    assert main(["run", "pointmass-quick", "--name", "shared", "--runs-dir", str(trained_quick.runs_dir)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert sorted(p.name for p in trained_quick.run_dir.iterdir()) == before
    assert main(["collect", "pointmass-quick", "--out", str(trained_quick.dataset_path), *base]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert EpisodeStore(trained_quick.dataset_path).num_episodes == trained_quick.data.episodes


def test_checkpoint_from_another_domain_is_refused(trained_quick, tmp_path, capsys):
    assert main(["eval", "language-table-quick", "--checkpoint", str(sft_checkpoint(trained_quick)),
                 "--eval-episodes", "2", "--runs-dir", str(tmp_path)]) == 2
    assert "'pointmass' domain, but this run is 'language-table'" in capsys.readouterr().err
    # and a domain that is not the env's is refused when the config is built
    assert main(["eval", "pointmass-quick", "--checkpoint", str(sft_checkpoint(trained_quick)),
                 "--set", "domain=language-table", "--eval-episodes", "2", "--runs-dir", str(tmp_path)]) == 2
    assert "does not match env.id 'selfimprove/PointMass-v0'" in capsys.readouterr().err


def test_robot_episode_budget_stops_self_improvement(trained_quick, tmp_path):
    config = _stage2_config(trained_quick, tmp_path, "budget", 50, "improve.max_robot_episodes=20",
                            "improve.steps_per_iteration=256")
    improve(config, sft_checkpoint(trained_quick), progress=False)
    records = improve_records(config)
    used = [r["robot_episodes"] for r in records]
    assert used[-1] >= 20 and used[-2] < 20 and records[-1]["iteration"] < 50
    assert "eval_success_rate" in records[-1]  # the last iteration is always evaluated


def test_true_success_control_practises_on_the_simulators_success(trained_quick, tmp_path):
    """The ceiling control: the simulator ends each episode on success and pays 1 there; the detector never fires."""
    config = _stage2_config(trained_quick, tmp_path, "oracle", 2, "improve.reward=true_success",
                            "improve.steps_per_iteration=256", "improve.guard=false")
    improve(config, sft_checkpoint(trained_quick), progress=False)
    episodes = EpisodeStore(episodes_dir(config)).episodes()
    ends = {e.meta["ended_by"] for e in episodes}
    assert ends <= {"success", "timeout"} and "success" in ends
    assert all(e.true_success == (e.meta["ended_by"] == "success") for e in episodes)
    records = improve_records(config)
    assert all(r["detected_success_rate"] == 0.0 for r in records if r["iteration"] > 0)
