"""Experiment grids: expansion, shared SFT, controls, scheduling on workers, resume, failures, summaries."""

import json
import math
import shutil
from pathlib import Path

import pytest

from selfimprove.cli import main
from selfimprove.config import ImproveConfig, RunConfig
from selfimprove.errors import ConfigError, RunStateError
from selfimprove.experiment import available_experiments, load_experiment, plan_experiment, run_experiment
from selfimprove.experiment import run as experiment_run
from selfimprove.experiment import schedule
from selfimprove.runlog import portable_path
from selfimprove.stats import demos_equivalent, exchange_rate, seed_interval, t_quantile_975
from selfimprove.model.checkpoint import read_checkpoint_config

from conftest import quick_config


def _tiny_overrides() -> list[str]:
    """Budgets small enough for a unit test (seconds per run)."""
    items = ["data.episodes=60", "sft.steps=60", "sft.eval_every=30", "improve.iterations=1",
             "improve.steps_per_iteration=128", "improve.eval_every=0", "fleet.robots=4", "eval.episodes=10",
             "eval.robots=10"]
    defaults = RunConfig()
    if hasattr(defaults, "diagnose"):  # per-run extras a grid test does not need
        items.append("diagnose.rollouts=0")
    if hasattr(defaults.eval, "videos"):
        items.append("eval.videos=0")
    return items


def _write_grid(path: Path, body: str, extra: tuple[str, ...] = ()) -> Path:
    sets = ", ".join(json.dumps(s) for s in [*_tiny_overrides(), *extra])
    path.write_text(f'preset = "pointmass-quick"\nset = [{sets}]\n{body}')
    return path


GRID = """
description = "two fractions x two seeds"
seeds = [0, 1]

[controls]
temperatures = [0.0]

[axes.fraction]
f50 = ["data.fraction=0.5"]
f100 = ["data.fraction=1.0"]

[report]
kind = "data-efficiency"
x = "fraction"
"""

STAGE_FIELDS = ("success_rate", "ci95", "robot_episodes", "demo_episodes")


def _check_stage(result: dict, robot: bool) -> None:
    assert all(k in result for k in STAGE_FIELDS), result
    assert 0 <= result["success_rate"] <= 1
    assert result["ci95"][0] <= result["success_rate"] <= result["ci95"][1]
    assert (result["robot_episodes"] > 0) == robot
    assert result["demo_episodes"] > 0


def test_grid_runs_end_to_end_on_workers_and_resume_does_no_training(tmp_path, monkeypatch):
    path = _write_grid(tmp_path / "tiny.toml", GRID)
    runs = tmp_path / "runs"
    summary = run_experiment(str(path), runs_dir=runs, parallel=2, progress=False)
    root = runs / "experiments" / "tiny"
    assert json.loads((root / "summary.json").read_text()) == summary
    assert summary["counts"] == {"cells": 4, "done": 4, "failed": 0, "pending": 0, "runs": 8, "shared_sft": 4}
    cells = {c["cell"]: c for c in summary["cells"]}
    assert sorted(cells) == ["f100_seed0", "f100_seed1", "f50_seed0", "f50_seed1"]
    assert not Path(summary["config_file"]).is_absolute() and summary["provenance"]["selfimprove"]
    assert all(not Path(c["run_dir"]).is_absolute() and c["provenance"]["torch"] for c in cells.values())
    for name, cell in cells.items():
        assert cell["status"] == "done" and cell["settings"] == {"fraction": name.split("_")[0],
                                                                  "seed": int(name[-1])}
        _check_stage(cell["sft"], robot=False)
        _check_stage(cell["improve"], robot=True)
        assert set(cell["controls"]) == {"sft_temperature_0", "constant_reward"}
        _check_stage(cell["controls"]["sft_temperature_0"], robot=False)
        _check_stage(cell["controls"]["constant_reward"], robot=True)
        # the control practised from the very same SFT checkpoint, with the constant reward
        run_dir, control_dir = Path(cell["run_dir"]), Path(cell["controls"]["constant_reward"]["run_dir"])
        shared = root / "_stage1" / cell["stage1"] / "checkpoints" / "sft" / "model.safetensors"
        for d in (run_dir, control_dir):
            assert (d / "checkpoints" / "sft" / "model.safetensors").read_bytes() == shared.read_bytes()
        assert json.loads((control_dir / "config.json").read_text())["improve"]["reward"] == "constant"
        # the reward model was diagnosed once per group; the cell and its control hold copies
        group_dir = root / "_stage1" / cell["stage1"]
        diagnosed = (group_dir / "diagnostics" / "diagnostics.json").read_text()
        assert json.loads(diagnosed)["checkpoint"] == str(group_dir / "checkpoints" / "sft")
        for d in (run_dir, control_dir):
            assert (d / "diagnostics" / "diagnostics.json").read_text() == diagnosed
        assert json.loads((run_dir / "config.json").read_text())["improve"]["reward"] == "steps_to_go"
    assert cells["f50_seed0"]["sft"]["demo_episodes"] < cells["f100_seed0"]["sft"]["demo_episodes"]
    assert cells["f50_seed0"]["stage1"] != cells["f50_seed1"]["stage1"]  # seeds train their own SFT
    # aggregates over seeds: mean, t-interval, pooled Wilson over all eval episodes
    aggregates = {a["settings"]["fraction"]: a for a in summary["aggregates"]}
    assert set(aggregates) == {"f50", "f100"}
    for label, agg in aggregates.items():
        assert sorted(agg["seeds"]) == [0, 1]
        for stage, key in (("sft", "sft"), ("improve", "improve"), ("controls.constant_reward", None)):
            s = agg["stages"][stage]
            rates = [cells[f"{label}_seed{i}"]["controls" if key is None else key] for i in (0, 1)]
            rates = [r["constant_reward"]["success_rate"] if key is None else r["success_rate"] for r in rates]
            assert math.isclose(s["mean"], sum(rates) / 2) and s["n"] == 2
            assert s["ci95_t"][0] <= s["mean"] <= s["ci95_t"][1]
            assert s["pooled"]["episodes"] == 20
            assert s["pooled"]["ci95_wilson"][0] <= s["pooled"]["success_rate"] <= s["pooled"]["ci95_wilson"][1]
    report = (root / "report.md").read_text()
    assert "data_efficiency.png" in report and "| f50 |" in report and "constant-reward control" in report
    assert (root / "data_efficiency.png").stat().st_size > 1000
    for cell in cells.values():
        assert (Path(cell["run_dir"]) / "report.md").exists()

    # a second call without --resume refuses; with it, finished cells are skipped: nothing runs
    with pytest.raises(RunStateError, match="--resume"):
        run_experiment(str(path), runs_dir=runs, parallel=1, progress=False)
    checkpoint = Path(cells["f50_seed0"]["run_dir"]) / "checkpoints" / "improve" / "model.safetensors"
    before = checkpoint.stat().st_mtime_ns

    def no_training(task):
        raise AssertionError(f"resume ran {task['name']}")

    monkeypatch.setattr(schedule, "_execute", no_training)
    again = run_experiment(str(path), runs_dir=runs, resume=True, parallel=1, progress=False)
    assert {**again, "timing": None} == {**summary, "timing": None} and checkpoint.stat().st_mtime_ns == before
    first, both = summary["timing"], again["timing"]  # wall time is summed over invocations
    assert len(first["invocations"]) == 1 and len(both["invocations"]) == 2
    assert both["wall_time_s"] >= first["wall_time_s"] > 0
    assert "Wall time:" in report and "over 1 invocation(s)" in report
    # changing a setting of finished cells is refused rather than mixed into the results
    with pytest.raises(RunStateError, match="improve.lr"):
        run_experiment(str(path), runs_dir=runs, resume=True, parallel=1, progress=False,
                       overrides=["improve.lr=1e-5"])
    # ... but only in the cells asked for: --only f50 leaves a differing f100 folder alone
    saved = Path(cells["f100_seed0"]["run_dir"]) / "config.json"
    original = saved.read_text()
    saved.write_text(json.dumps({**json.loads(original), "improve": {
        **json.loads(original)["improve"], "lr": 1e-5}}))
    with pytest.raises(RunStateError, match="f100_seed0 was run with a different config"):
        run_experiment(str(path), runs_dir=runs, resume=True, parallel=1, progress=False)
    run_experiment(str(path), runs_dir=runs, resume=True, parallel=1, progress=False, only=["f50*"])
    saved.write_text(original)

    # another experiment copies what it shares with this one instead of computing it again: the SFT
    # (identical Stage-1 settings) and the whole run whose config is identical
    monkeypatch.undo()
    other = _write_grid(tmp_path / "tiny-b.toml", """
description = "the same SFT, the same and another Stage 2"
seeds = [0]
[controls]
temperatures = [0.0]
constant_reward = false
[axes.fraction]
f50 = ["data.fraction=0.5"]
[axes.lr]
same = []
low = ["improve.lr=1e-4"]
""")
    result = run_experiment(str(other), runs_dir=runs, parallel=1, progress=False)
    assert result["counts"]["done"] == 2
    other_root = runs / "experiments" / "tiny-b"
    group, source = other_root / "_stage1" / "f50_same_seed0", root / "_stage1" / cells["f50_seed0"]["stage1"]
    assert json.loads((group / "stage1_source.json").read_text()) == {"copied_from": str(source)}
    assert "reused from" in (group / "experiment.log").read_text()
    assert (group / "checkpoints" / "sft" / "model.safetensors").read_bytes() == (
        source / "checkpoints" / "sft" / "model.safetensors").read_bytes()
    assert (group / "eval_sft.json").read_text() == (source / "eval_sft.json").read_text()
    assert result["stage1_reused"] == {"f50_same_seed0": portable_path(source)}
    same, low = other_root / "f50_same_seed0", other_root / "f50_low_seed0"
    assert result["runs_reused"] == {"f50_same_seed0": cells["f50_seed0"]["run_dir"]}
    assert (same / "summary.json").read_text() == (Path(cells["f50_seed0"]["run_dir"]) / "summary.json").read_text()
    assert not (low / "run_source.json").exists() and (low / "summary.json").exists()  # practised here
    report = (other_root / "report.md").read_text()
    assert "1 of them copied from another experiment with identical Stage-1 settings (tiny)" in report
    assert "1 run(s) copied from another experiment with an identical config" in report
    # and the experiment that copied them resumes (a copied run keeps its source's name in config.json)
    resumed = run_experiment(str(other), runs_dir=runs, resume=True, parallel=1, progress=False)
    assert resumed["counts"] == result["counts"] and resumed["runs_reused"] == result["runs_reused"]


def test_failed_cell_is_reported_and_the_others_finish(tmp_path, capsys):
    body = """
seeds = [0]
[axes.reward]
good = []
broken = ["improve.reward_model=no/such/checkpoint"]
"""
    path = _write_grid(tmp_path / "failing.toml", body)
    runs = tmp_path / "runs"
    code = main(["experiment", str(path), "--runs-dir", str(runs), "--parallel", "1", "--no-progress"])
    assert code == 1
    summary = json.loads((runs / "experiments" / "failing" / "summary.json").read_text())
    cells = {c["cell"]: c for c in summary["cells"]}
    assert cells["good_seed0"]["status"] == "done" and "constant_reward" in cells["good_seed0"]["controls"]
    assert cells["broken_seed0"]["status"] == "failed" and "no/such/checkpoint" in cells["broken_seed0"]["error"]
    assert cells["good_seed0"]["stage1"] == cells["broken_seed0"]["stage1"]  # one SFT, Stage 2 differs
    assert summary["failed_runs"] == ["broken_seed0", "broken_seed0_const"]
    report = (runs / "experiments" / "failing" / "report.md").read_text()
    assert "## Failed" in report and "broken_seed0" in report
    assert "failed: broken_seed0" in capsys.readouterr().out


@pytest.fixture(scope="module")
def improved_quick(trained_quick, tmp_path_factory):
    """A tiny Stage-2 run on its own SFT checkpoint whose guard kept ``checkpoints/best``."""
    from selfimprove.train.improve import improve
    from selfimprove.train.sft import sft_checkpoint

    config = quick_config(tmp_path_factory.mktemp("source"), "name=source", f"data.path={trained_quick.dataset_path}",
                          "improve.iterations=1", "improve.steps_per_iteration=128", "improve.eval_every=0",
                          "improve.guard_episodes=4", "fleet.robots=4")
    shutil.copytree(sft_checkpoint(trained_quick), sft_checkpoint(config))
    improve(config, sft_checkpoint(config), progress=False)
    return config


def test_init_from_a_guarded_best_practises_with_its_recorded_reward_model(improved_quick, tmp_path, monkeypatch):
    from selfimprove.train import sft as sft_module

    def no_sft(*args, **kwargs):
        raise AssertionError("init_from trained an SFT checkpoint")

    monkeypatch.setattr(sft_module, "_load_split", no_sft)  # what training SFT starts with
    source = improved_quick.run_dir
    best = source / "checkpoints" / "best"
    meta = read_checkpoint_config(best)["meta"]
    body = f'init_from = "{best}"\nseeds = [0]\n[controls]\ntemperatures = []\nconstant_reward = false\n'
    path = _write_grid(tmp_path / "from-best.toml", body, extra=("improve.guard_episodes=4",))
    summary = run_experiment(str(path), runs_dir=tmp_path / "runs", parallel=1, progress=False)
    assert summary["counts"] == {"cells": 1, "done": 1, "failed": 0, "pending": 0, "runs": 1, "shared_sft": 1}
    (cell,) = summary["cells"]
    run_dir = Path(cell["run_dir"])
    # Stage 2 started from the kept policy, rewarded by the source's SFT checkpoint at its threshold
    start = run_dir / "checkpoints" / "sft" / "model.safetensors"
    assert start.read_bytes() == (best / "model.safetensors").read_bytes()
    saved = json.loads((run_dir / "config.json").read_text())["improve"]
    assert saved["reward_model"] == meta["reward_model"] == str(source / "checkpoints" / "sft")
    assert saved["success_threshold"] == meta["threshold"]
    assert json.loads((run_dir / "detector.json").read_text())["threshold"] == meta["threshold"]
    # the diagnostics describe the frozen reward model, not the copied start policy
    assert json.loads((run_dir / "diagnostics" / "diagnostics.json").read_text())["checkpoint"] == meta["reward_model"]
    stages = {json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert "sft" not in stages and "improve" in stages
    assert 0 <= cell["sft"]["success_rate"] <= 1 and cell["sft"]["robot_episodes"] == 0  # the start policy
    assert 0 <= cell["improve"]["success_rate"] <= 1 and cell["improve"]["robot_episodes"] > 0


def test_unknown_experiment_lists_the_available_ones(capsys):
    with pytest.raises(ConfigError) as info:
        run_experiment("no-such-experiment")
    assert "Available experiments" in str(info.value)
    for name in ("data-efficiency", "pretraining", "reinforce-vs-ppo", "banana"):
        assert name in str(info.value) and name in available_experiments()
        assert f"{name}-quick" in available_experiments()
    assert main(["experiment", "data-efficency", "--no-progress"]) == 2
    assert "Did you mean 'data-efficiency'?" in capsys.readouterr().err


@pytest.mark.parametrize("body, message", [
    ('seeds = [0]\n[axes.lr]\nsmall = ["improve.lrr=1e-4"]\n', "cell 'small_seed0'.*Did you mean 'lr'"),
    ('[axes.fraction]\n"10%" = ["data.fraction=0.1"]\n', "label '10%'"),
    ('axis = {}\n', "Did you mean 'axes'"),
    ('[axes.fraction]\nf10 = ["data.fraction=0.1"]\n[report]\nkind = "ablation"\ncolumns = "init"\n',
     "report.columns = 'init' is not an axis"),
    ('[axes.s]\na = ["seed=3"]\n', "use `seeds = \\[...\\]`"),
    ('seeds = []\n', "non-empty list"),
    ('[axes.fraction]\nf10 = "data.fraction=0.1"\n', "list of"),
])
def test_bad_grids_give_clear_errors(tmp_path, body, message):
    path = _write_grid(tmp_path / "bad.toml", body)
    with pytest.raises(ConfigError, match=message):
        plan_experiment(load_experiment(str(path)), tmp_path)


@pytest.mark.parametrize("name", available_experiments())
def test_shipped_experiments_expand_into_cells_with_controls(tmp_path, name):
    if "reinforce-vs-ppo" in name and "objective" not in ImproveConfig.__dataclass_fields__:
        pytest.skip("needs improve.objective")
    spec = load_experiment(name)
    plan = plan_experiment(spec, tmp_path)
    expected = len(spec.seeds) * math.prod(len(a.values) for a in spec.axes)
    assert len(plan.cells) == expected
    for cell in plan.cells:
        assert cell.config.run_dir == tmp_path / "experiments" / name / cell.name
        assert cell.config.eval.control_temperatures
        if cell.config.improve.iterations > 0 and spec.constant_reward_control:
            control = plan.runs[cell.control]
            assert control.config.improve.reward == "constant" and control.stage1 == cell.stage1
    if not spec.constant_reward_control:  # then the grid holds its control as a cell
        assert any(c.config.improve.reward == "constant" for c in plan.cells)
    if not spec.init_from:  # every seed trains its own SFT; Stage-2 variants share it
        assert len({c.stage1 for c in plan.cells}) == expected // max(
            1, len(next((a.values for a in spec.axes if a.name == "objective"), [0])))


def test_quick_flag_picks_the_quick_variant():
    spec = load_experiment("data-efficiency", quick=True)
    assert spec.name == "data-efficiency-quick" and spec.preset.endswith("-quick")
    assert [a.name for a in spec.axes] == ["fraction"] and spec.report["kind"] == "data-efficiency"


def test_seed_interval_is_the_student_t_interval():
    assert t_quantile_975(2) == pytest.approx(4.303)
    s = seed_interval([0.5, 0.6, 0.7])
    half = 4.303 * 0.1 / math.sqrt(3)
    assert s["mean"] == pytest.approx(0.6) and s["sd"] == pytest.approx(0.1)
    assert s["ci95_t"] == pytest.approx([0.6 - half, 0.6 + half])
    assert seed_interval([0.2, 0.9])["ci95_t"] == [0.0, 1.0]  # clipped to rates
    assert seed_interval([0.4])["ci95_t"] is None


def test_exchange_rate_reads_demos_off_the_sft_curve():
    curve = [(1000, 0.4), (2000, 0.6), (4000, 0.7)]
    assert demos_equivalent(curve, 0.5) == pytest.approx(1500)  # linear between measured points
    assert demos_equivalent(curve, 0.2) == pytest.approx(500)  # from (0, 0)
    assert demos_equivalent(curve, 0.75) is None  # beyond every point: no number of demos buys it
    # a dip is never counted as fewer demos being better: the running maximum
    assert demos_equivalent([(1000, 0.6), (2000, 0.5), (3000, 0.7)], 0.65) == pytest.approx(2500)
    assert demos_equivalent([(1000, 0.6), (2000, 0.6)], 0.6) == pytest.approx(1000)
    # practice from 1,000 demos reaching 0.5 after 500 episodes: 500 demos' worth, 1 per episode
    assert exchange_rate(curve, 1000, 500, 0.5) == pytest.approx(1.0)
    assert exchange_rate(curve, 2000, 500, 0.5) == pytest.approx(-1.0)  # practice that lowered success
    assert exchange_rate(curve, 2000, 500, 0.9) is None
    with pytest.raises(ValueError):
        exchange_rate(curve, 1000, 0, 0.5)


@pytest.mark.slow
def test_data_efficiency_quick_end_to_end(tmp_path):
    summary = run_experiment("data-efficiency", quick=True, runs_dir=tmp_path, parallel=2, progress=False)
    assert summary["counts"]["done"] == summary["counts"]["cells"] == 6
    assert (tmp_path / "experiments" / "data-efficiency-quick" / "data_efficiency.png").exists()


def test_only_collects_the_data_of_the_chosen_runs(tmp_path, monkeypatch):
    import selfimprove.data.collect as collect

    collected = []

    def fake_collect(config, out, workers, progress):
        collected.append(config.domain)
        (Path(out) / "meta").mkdir(parents=True)
        (Path(out) / "meta" / "info.json").write_text("{}")

    monkeypatch.setattr(collect, "collect_demos", fake_collect)
    plan = plan_experiment(load_experiment("reinforce-vs-ppo", quick=True), tmp_path)
    experiment_run._collect_datasets(plan, 1, False, experiment_run._select(plan, ["pointmass_*"]))
    assert collected == ["pointmass"]  # the tabletop cells' demos are not collected for a point-mass-only run
    experiment_run._collect_datasets(plan, 1, False)
    assert collected == ["pointmass", "language-table"]


def test_a_control_at_a_fractional_temperature_is_aggregated():
    from selfimprove.experiment.summary import aggregate_cells

    result = {"success_rate": 0.5, "ci95": [0.2, 0.8], "eval_episodes": 10, "robot_episodes": 0, "demo_episodes": 5}
    cells = [{"cell": f"a_seed{i}", "settings": {"x": "a", "seed": i}, "status": "done", "sft": result,
              "improve": {**result, "robot_episodes": 3},
              "controls": {"sft_temperature_0.5": {**result, "success_rate": 0.2 * (i + 1)}}} for i in range(2)]
    (aggregate,) = aggregate_cells(cells, ["x"])
    assert aggregate["stages"]["controls.sft_temperature_0.5"]["per_seed"] == [0.2, 0.4]


def test_stage1_groups_are_scheduled_before_runs(monkeypatch):
    """Longest tasks first: every ready SFT group starts before any run, so no SFT is left to run alone at the end."""
    order = []
    monkeypatch.setattr(schedule, "_execute", lambda task: order.append(task["name"]) or {"status": "done"})
    tasks = {name: {"name": name, "kind": kind} for name, kind in
             [("stage1:a", "stage1"), ("a", "run"), ("a_const", "run"), ("stage1:b", "stage1"), ("b", "run")]}
    depends = {"a": "stage1:a", "a_const": "stage1:a", "b": "stage1:b"}
    schedule._schedule(tasks, depends, 1, lambda *args: None, threads=1)
    assert order == ["stage1:a", "stage1:b", "a", "a_const", "b"]
