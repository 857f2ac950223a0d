"""The experiment file: ``configs/experiments/<name>.toml`` (or a path), read and checked.

A base preset plus override lists per axis (data fraction, initialisation, Stage-2 variant, ...),
a list of seeds, the controls, and how to report; ``extends`` starts from another such file.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfimprove.config import PRESET_DIR, parse_override, read_toml
from selfimprove.errors import ConfigError

EXPERIMENT_DIR = PRESET_DIR / "experiments"
REPORT_KINDS = ("table", "data-efficiency", "ablation")
_TOP_KEYS = ("description", "extends", "preset", "set", "seeds", "axes", "controls", "init_from", "reward_model",
             "report")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")
_RUNNER_KEYS = ("name", "runs_dir", "seed")  # chosen by the runner for every cell


@dataclass
class AxisValue:
    """One value of a grid axis: a folder-safe label and the overrides (and optionally preset) it sets."""

    label: str
    overrides: list[str]
    preset: str | None = None


@dataclass
class Axis:
    name: str
    values: list[AxisValue]


@dataclass
class ExperimentSpec:
    """A parsed ``configs/experiments/<name>.toml``."""

    name: str
    path: Path
    description: str
    preset: str
    overrides: list[str]
    seeds: list[int]
    axes: list[Axis]
    control_temperatures: list[float] | None = None  # None: the preset's, else [0.0, 0.5]
    constant_reward_control: bool = True
    init_from: str = ""  # a checkpoint Stage 2 starts from instead of training SFT
    reward_model: str = ""  # its frozen reward model (default: the one recorded in the checkpoint)
    report: dict[str, Any] = field(default_factory=dict)


def available_experiments() -> list[str]:
    """Names of the experiments shipped in ``configs/experiments/``."""
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.toml"))


def _experiment_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml":
        if not path.exists():
            raise ConfigError(f"experiment file {path} does not exist")
        return path
    candidate = EXPERIMENT_DIR / f"{name}.toml"
    if not candidate.exists():
        known = available_experiments()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown experiment {name!r}.{hint} Available experiments: {', '.join(known) or 'none'} "
                          f"(in {EXPERIMENT_DIR}), or pass a path to an experiment .toml file")
    return candidate


def load_experiment(name: str, quick: bool = False) -> ExperimentSpec:
    """Read and check an experiment by name (``configs/experiments/<name>.toml``) or .toml path."""
    if quick and not name.endswith("-quick") and not name.endswith(".toml"):
        name = f"{name}-quick"
    path = _experiment_path(name)
    data = read_toml(path, "experiment file", _experiment_path)
    where = f"experiment {path.stem!r} ({path})"

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{where}: {message}")

    for key in data:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(key, _TOP_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise fail(f"unknown key {key!r}.{hint} Known keys: {', '.join(_TOP_KEYS)}")
    preset = data.get("preset")
    if not isinstance(preset, str) or not preset:
        raise fail("needs `preset = \"<preset name or .toml>\"` (the base config of every cell)")
    overrides = _override_list(data.get("set", []), "set", fail)
    seeds = data.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                for s in seeds) or len(set(seeds)) != len(seeds)):
        raise fail(f"`seeds` must be a non-empty list of distinct integers, got {seeds!r}")
    axes_data = data.get("axes", {})
    if not isinstance(axes_data, dict):
        raise fail("`axes` must be a table of axes: [axes.<axis>] with <label> = [\"section.field=value\", ...]")
    axes = []
    for axis_name, values in axes_data.items():
        if not _LABEL.match(axis_name) or axis_name == "seed":
            raise fail(f"axis name {axis_name!r} must be a plain word (letters, digits, '.', '+', '-') other than 'seed'")
        if not isinstance(values, dict) or not values:
            raise fail(f"axis {axis_name!r} must be a table of at least one <label> = [overrides]")
        entries = []
        for label, value in values.items():
            if not _LABEL.match(label):
                raise fail(f"axis {axis_name!r}: label {label!r} names cell folders; use letters, digits, '.', "
                           "'+' and '-' only (e.g. \"frac10\")")
            if isinstance(value, dict):
                unknown = set(value) - {"preset", "set"}
                if unknown:
                    raise fail(f"axis {axis_name!r}, {label!r}: unknown keys {sorted(unknown)}; use `preset` and `set`")
                if "preset" in value and not isinstance(value["preset"], str):
                    raise fail(f"axis {axis_name!r}, {label!r}: `preset` must be a string")
                entries.append(AxisValue(label, _override_list(value.get("set", []), f"axes.{axis_name}.{label}.set",
                                                               fail), value.get("preset")))
            else:
                entries.append(AxisValue(label, _override_list(value, f"axes.{axis_name}.{label}", fail)))
        axes.append(Axis(axis_name, entries))
    controls = data.get("controls", {})
    if not isinstance(controls, dict) or set(controls) - {"temperatures", "constant_reward"}:
        raise fail("[controls] may hold `temperatures = [0.0, 0.5]` and `constant_reward = true|false`")
    temps = controls.get("temperatures")
    if temps is not None and (not isinstance(temps, list) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 for t in temps)):
        raise fail(f"controls.temperatures must be a list of temperatures >= 0 (0: greedy), got {temps!r}")
    constant = controls.get("constant_reward", True)
    if not isinstance(constant, bool):
        raise fail("controls.constant_reward must be true or false")
    report = data.get("report", {})
    if not isinstance(report, dict):
        raise fail("[report] must be a table")
    unknown = set(report) - {"kind", "x", "rows", "columns", "reference", "reference_source"}
    if unknown:
        raise fail(f"[report] has unknown keys {sorted(unknown)}; known: kind, x, rows, columns, reference, "
                   "reference_source")
    kind = report.setdefault("kind", "table")
    if kind not in REPORT_KINDS:
        raise fail(f"report.kind must be one of {REPORT_KINDS}, got {kind!r}")
    names = [a.name for a in axes]
    for key in ("x", "rows", "columns"):
        if key in report and report[key] not in names:
            raise fail(f"report.{key} = {report[key]!r} is not an axis; axes: {', '.join(names) or 'none'}")
    if kind == "data-efficiency" and "x" not in report:
        raise fail("report.kind = \"data-efficiency\" needs report.x, the axis of data fractions")
    for key in ("init_from", "reward_model", "description"):
        if not isinstance(data.get(key, ""), str):
            raise fail(f"`{key}` must be a string")
    return ExperimentSpec(
        name=path.stem, path=path, description=data.get("description", "").strip(), preset=preset,
        overrides=overrides, seeds=list(seeds), axes=axes,
        control_temperatures=[float(t) for t in temps] if temps is not None else None,
        constant_reward_control=constant, init_from=data.get("init_from", ""),
        reward_model=data.get("reward_model", ""), report=report)


def _override_list(value: Any, where: str, fail) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(f"`{where}` must be a list of \"section.field=value\" strings, got {value!r}")
    for item in value:
        parse_override(item)  # shape check: raises ConfigError naming the bad override
        if item.split("=", 1)[0].strip() in _RUNNER_KEYS:
            raise fail(f"`{where}` sets {item.split('=', 1)[0].strip()!r}, which the experiment runner chooses "
                       "for every cell (use `seeds = [...]` for seeds)")
    return list(value)
