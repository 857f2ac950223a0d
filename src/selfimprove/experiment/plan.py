"""An experiment's plan: the grid expanded into runs (cells and their constant-reward controls),
each with its validated config, and the shared Stage-1 groups (one SFT checkpoint for every run
whose Stage 1 is the same)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfimprove.config import RunConfig, config_from_dict, load_config
from selfimprove.errors import ConfigError
from selfimprove.experiment.spec import ExperimentSpec, _override_list

_STAGE1_SECTIONS = ("domain", "seed", "precision", "env", "data", "model", "sft", "eval")  # what a shared SFT depends on


@dataclass
class PlannedRun:
    """One run of the experiment: a grid cell, or the constant-reward control of one."""

    name: str
    role: str  # "cell" or "control"
    settings: dict[str, Any]  # axis -> label, and "seed"
    preset: str
    axis_overrides: list[str]  # what this run sets on top of the experiment's `set`
    config: RunConfig
    data_seed: int  # the seed a dataset collected for it uses (the base config's, not the cell's)
    stage1: str = ""  # the shared Stage-1 group it starts from
    control: str | None = None  # cells: the constant-reward run beside it
    controls_for: list[str] = field(default_factory=list)  # control runs: the cells it serves


@dataclass
class Stage1Group:
    """An SFT checkpoint (and its evaluations) shared by every run whose Stage 1 is the same."""

    name: str
    config: RunConfig
    members: list[str]
    init_from: str = ""


@dataclass
class ExperimentPlan:
    spec: ExperimentSpec
    root: Path
    runs: dict[str, PlannedRun]
    groups: dict[str, Stage1Group]
    data_dir: Path

    @property
    def cells(self) -> list[PlannedRun]:
        return [r for r in self.runs.values() if r.role == "cell"]


def _stage1_dir(group: Stage1Group) -> Path:
    return group.config.run_dir


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _stage1_key(config: RunConfig, init_from: str) -> str:
    """Runs with equal keys start Stage 2 from the same checkpoint, evaluated the same way."""
    d = config.to_dict()
    if init_from:  # nothing is trained: the copied checkpoint and its evaluation depend on env and eval only
        return _digest({"init_from": init_from, **{k: d[k] for k in ("domain", "env", "eval")}})
    key = {k: d[k] for k in _STAGE1_SECTIONS}
    key["data"] = {k: v for k, v in key["data"].items() if k != "collect_workers"}
    return _digest({"stage1": key})


def _data_key(config: RunConfig) -> dict[str, Any]:
    """What a collected dataset depends on (the fraction is chosen later, at training time)."""
    d = config.to_dict()
    data = {k: v for k, v in d["data"].items() if k not in ("path", "fraction", "val_fraction", "collect_workers")}
    return {"domain": d["domain"], "env": d["env"], "data": data}


def plan_experiment(spec: ExperimentSpec, runs_dir: str | Path = "runs", overrides: list[str] | None = None
                    ) -> ExperimentPlan:
    """Expand the grid into runs and shared Stage-1 groups; every cell's config is loaded and checked."""
    root = Path(runs_dir) / "experiments" / spec.name
    data_dir = Path(runs_dir) / "experiments" / "data"
    extra = list(overrides or [])
    _override_list(extra, "--set", lambda m: ConfigError(m))
    combos: list[tuple[dict[str, Any], str, list[str]]] = [({}, spec.preset, [])]
    for axis in spec.axes:
        combos = [({**settings, axis.name: v.label}, v.preset or preset, ovr + v.overrides)
                  for settings, preset, ovr in combos for v in axis.values]
    runs: dict[str, PlannedRun] = {}
    by_config: dict[str, str] = {}
    for settings, preset, axis_overrides in combos:
        for seed in spec.seeds:
            labels = [settings[a.name] for a in spec.axes]
            name = "_".join([*labels, f"seed{seed}"])
            cell_settings = {**settings, "seed": seed}
            config, data_seed = _cell_config(spec, preset, extra, axis_overrides, seed, name, root, data_dir)
            runs[name] = PlannedRun(name, "cell", cell_settings, preset, axis_overrides, config, data_seed)
            by_config[_digest({**config.to_dict(), "name": ""})] = name
    if spec.constant_reward_control:
        for cell in list(runs.values()):
            if cell.config.improve.iterations == 0 or cell.config.improve.reward == "constant":
                continue
            control_overrides = cell.axis_overrides + ["improve.reward=constant"]
            name = f"{cell.name}_const"
            config, data_seed = _cell_config(spec, cell.preset, extra, control_overrides, cell.settings["seed"], name,
                                             root, data_dir)
            key = _digest({**config.to_dict(), "name": ""})
            if key in by_config:  # an identical run exists already (e.g. a reward axis): reuse it
                name = by_config[key]
            else:
                by_config[key] = name
                runs[name] = PlannedRun(name, "control", dict(cell.settings), cell.preset, control_overrides, config,
                                        data_seed)
            cell.control = name
            runs[name].controls_for.append(cell.name)
    groups: dict[str, Stage1Group] = {}
    key_to_group: dict[str, str] = {}
    for run in runs.values():
        key = _stage1_key(run.config, spec.init_from)
        if key not in key_to_group:
            group_name = run.name
            group_config = config_from_dict({**run.config.to_dict(), "name": group_name,
                                             "runs_dir": str(root / "_stage1")})
            key_to_group[key] = group_name
            groups[group_name] = Stage1Group(group_name, group_config, [], spec.init_from)
        run.stage1 = key_to_group[key]
        groups[run.stage1].members.append(run.name)
    return ExperimentPlan(spec, root, runs, groups, data_dir)


def _cell_config(spec: ExperimentSpec, preset: str, extra: list[str], axis_overrides: list[str], seed: int,
                 name: str, root: Path, data_dir: Path) -> tuple[RunConfig, int]:
    """A cell's validated config and the seed its shared dataset is collected with."""
    where = f"experiment {spec.name!r}, cell {name!r}"
    try:
        base = load_config(preset, spec.overrides + extra)
        temps = spec.control_temperatures
        if temps is None:
            temps = base.eval.control_temperatures or [0.0, 0.5]
        items = [*spec.overrides, *extra, f"eval.control_temperatures={json.dumps(temps)}", *axis_overrides,
                 f"seed={seed}", f"name={name}", f"runs_dir={root}"]
        config = load_config(preset, items)
        if not config.data.path:  # one dataset shared by every cell, collected once with the preset's seed
            config.data.path = str(_default_dataset(preset, config, base.seed, data_dir))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return config, base.seed


def _default_dataset(preset: str, config: RunConfig, seed: int, data_dir: Path) -> Path:
    stem = Path(preset).stem
    key = {**_data_key(config), "seed": seed}
    plain = load_config(preset)
    if key == {**_data_key(plain), "seed": plain.seed}:
        return data_dir / stem
    return data_dir / f"{stem}-{_digest(key)}"
