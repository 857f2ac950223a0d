"""docs/tutorial.md: the reach task's path on a tiny budget through the real code, and the doc's commands."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import numpy as np
import pytest

from selfimprove.cli import build_parser, config_from_args, main
from selfimprove.data.lerobot import load_mapping
from selfimprove.data.store import EpisodeStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "reach_task"
TUTORIAL = ROOT / "docs" / "tutorial.md"
MAP = ["--map", "observation.state=arm", "--map", "observation.environment_state=target"]
TINY = ["--steps", "60", "--iterations", "2", "--eval-episodes", "10", "--robots", "4", "--no-progress",
        "--set", "sft.eval_every=30", "--set", "improve.steps_per_iteration=160", "--set", "improve.eval_every=2",
        "--set", "improve.eval_episodes=10", "--set", "improve.guard_episodes=4", "--set", "diagnose.rollouts=4",
        "--set", "eval.robots=10"]


@pytest.fixture
def reach_folder(tmp_path, monkeypatch):
    """A project folder of one's own: cwd for relative paths, the example's modules importable (PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_reach_task_from_lerobot_demos_to_report_and_back(reach_folder, capsys):
    import make_demos

    config = str(EXAMPLE / "reach.toml")
    make_demos.main(["--out", "data/reach_lerobot", "--episodes", "40"])
    assert main(["dataset", "info", "data/reach_lerobot"]) == 0
    info = capsys.readouterr().out
    assert "observation.state" in info and "observation.environment_state" in info and "reach the target" in info

    # the automatic mapping keeps LeRobot's names, which are not the env's observation keys: SFT says so
    assert main(["dataset", "import", "data/reach_lerobot", "--out", "data/wrong", "--no-progress"]) == 0
    assert main(["sft", config, "--name", "wrong", "--dataset", "data/wrong", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no observation 'arm' (it has ['environment_state', 'state'])" in err and "--map" in err

    # an env module that cannot be imported, or demos that are not there, fail before anything is written
    assert main(["run", config, "--name", "nomodule", "--set", "env.module=no_such_reach_module"]) == 2
    assert "no_such_reach_module" in capsys.readouterr().err and not Path("runs/nomodule").exists()
    assert main(["run", config, "--name", "nodata", "--dataset", "data/missing"]) == 2
    assert "no scripted expert for 'ReachTask/Reach-v0'" in capsys.readouterr().err and not Path("runs/nodata").exists()

    assert main(["dataset", "import", "data/reach_lerobot", "--out", "data/reach_demos", *MAP, "--no-progress"]) == 0
    assert "imported 40 episodes" in capsys.readouterr().out
    assert main(["run", config, *TINY]) == 0
    assert "report: runs/reach/report.md" in capsys.readouterr().out
    run = Path("runs/reach")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["domain"] == "reach" and summary["demo_episodes"] == 38  # 40 less the 5% held out
    for stage in ("sft", "improve"):
        assert 0 <= summary[stage]["success_rate"] <= 1 and summary[stage]["eval_episodes"] == 10
    assert summary["improve"]["robot_episodes"] == EpisodeStore(run / "improve_episodes").num_episodes > 0
    assert summary["reward_model"]["recommended_s"] > 0
    report = (run / "report.md").read_text()
    assert "Domain `reach`, env `ReachTask/Reach-v0`" in report and "40 demos" in report
    assert "Self-Improvement (stage 2)" in report and (run / "diagnostics" / "report.md").exists()

    assert main(["diagnose", "runs/reach/checkpoints/sft", "--rollouts", "3", "--out", "diag"]) == 0
    assert "recommended s = " in capsys.readouterr().out
    assert json.loads(Path("diag/diagnostics.json").read_text())["rollouts"]["episodes"] == 3

    # export with the reverse mapping gives back LeRobot's feature names; re-import gives identical frames
    assert main(["dataset", "export", "data/reach_demos", "--out", "exports/reach_demos", *MAP, "--no-progress"]) == 0
    assert main(["dataset", "import", "exports/reach_demos", "--out", "data/reimported", *MAP, "--no-progress"]) == 0
    a, b = EpisodeStore("data/reach_demos").frames(), EpisodeStore("data/reimported").frames()
    assert sorted(a.observations) == sorted(b.observations) == ["arm", "target"]
    assert all(np.array_equal(a.observations[k], b.observations[k]) for k in a.observations)
    assert np.array_equal(a.actions, b.actions) and a.instructions == b.instructions
    assert np.array_equal(a.episode_lengths, b.episode_lengths)
    assert main(["dataset", "export", "runs/reach/improve_episodes", "--out", "exports/reach_practice", *MAP,
                 "--no-progress"]) == 0
    assert main(["dataset", "info", "exports/reach_practice", "--check"]) == 0
    assert "LeRobot v3 ok" in capsys.readouterr().out


def tutorial_commands() -> list[str]:
    """Every ``selfimprove ...`` line of the tutorial's bash blocks and ``$ selfimprove ...`` of its output blocks."""
    commands, block, pending = [], None, ""
    for line in TUTORIAL.read_text().splitlines():
        if line.startswith("```"):
            block = line.strip()[3:] if block is None else None
            continue
        if block is None:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("$ selfimprove "):
            commands.append(line[2:])
        elif block == "bash" and line.startswith("selfimprove "):
            commands.append(line)
    return commands


def test_every_tutorial_command_parses_with_the_cli(monkeypatch):
    commands = tutorial_commands()
    verbs = {shlex.split(c)[1] for c in commands}
    assert {"run", "dataset", "diagnose", "report"} <= verbs, verbs
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.chdir(EXAMPLE)  # the tutorial's config is reach.toml in the current folder
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command, comments=True)[1:]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"docs/tutorial.md: the CLI rejects `{command}`")
        if args.command == "dataset" and args.dataset_command in ("import", "export"):
            load_mapping(args.preset, args.map)  # --map items are well formed
        elif args.command in ("run", "sft", "improve", "eval", "collect"):
            config_from_args(args)  # the config file and every --set key exist


def test_tutorial_shows_the_example_config_as_it_is():
    shown = re.search(r"```toml\n(.*?)```", TUTORIAL.read_text(), re.S)
    assert shown is not None
    assert tomllib.loads(shown.group(1)) == tomllib.loads((EXAMPLE / "reach.toml").read_text())
