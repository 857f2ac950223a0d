import pytest

from selfimprove.cli import main
from selfimprove.config import config_from_dict, load_config, parse_override
from selfimprove.errors import ConfigError


def test_presets_load_and_overrides_apply():
    config = load_config("pointmass", ["improve.lr=1e-4", "seed=3", "improve.success_threshold=2"])
    assert config.improve.lr == 1e-4 and config.seed == 3 and config.improve.success_threshold == 2.0
    quick = load_config("pointmass-quick")
    assert quick.data.episodes < config.data.episodes and quick.env.id == config.env.id


def test_unknown_key_names_the_key_and_suggests_the_fix():
    with pytest.raises(ConfigError, match=r"unknown config key improve.'learning_rate'.*Known keys"):
        load_config("pointmass", ["improve.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="Did you mean 'robots'"):
        load_config("pointmass", ["fleet.robot=4"])


def test_wrong_types_and_ranges_are_rejected():
    with pytest.raises(ConfigError, match="fleet.robots: expected an integer"):
        load_config("pointmass", ["fleet.robots=many"])
    with pytest.raises(ConfigError, match="data.fraction"):
        load_config("pointmass", ["data.fraction=1.5"])
    with pytest.raises(ConfigError, match="max_steps must cover"):
        config_from_dict({"env": {"max_episode_steps": 200}, "model": {"max_steps": 100}})


def test_unknown_preset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("pointmas")
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("improve.lr")


def test_a_relative_extends_is_read_from_the_files_folder(tmp_path, monkeypatch):
    """``extends = "base.toml"`` names the file beside the config, whatever the current folder; a name is a
    preset; the same holds for experiment files."""
    from selfimprove.experiment.spec import load_experiment

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "base.toml").write_text('extends = "pointmass-quick"\nseed = 3\n')
    (folder / "child.toml").write_text('extends = "base.toml"\n[sft]\nsteps = 7\n')
    (folder / "grid-base.toml").write_text('extends = "data-efficiency-quick"\n')
    (folder / "grid.toml").write_text('extends = "grid-base.toml"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(str(folder / "child.toml"))
    assert (config.seed, config.sft.steps, config.data.episodes) == (3, 7, load_config("pointmass-quick").data.episodes)
    monkeypatch.chdir(tmp_path)
    assert load_config("mine/child.toml").seed == 3
    assert load_experiment(str(folder / "grid.toml")).axes == load_experiment("data-efficiency-quick").axes


def test_cli_reports_config_errors_clearly(capsys):
    assert main(["sft", "pointmass", "--set", "sft.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key" in err and "steps" in err


def test_the_wheel_ships_every_preset_and_experiment_grid(tmp_path):
    """An installed copy (not a source checkout) must find `pointmass`, `extends = ...` and the grids."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("selfimprove-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"selfimprove/presets/{p.relative_to(root / 'configs').as_posix()}"
               for p in (root / "configs").rglob("*.toml")}
    assert shipped and shipped <= names, sorted(shipped - names)
