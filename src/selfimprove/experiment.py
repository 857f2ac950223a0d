"""Named experiment grids: many ordinary runs, scheduled on worker processes, summarised together.

An experiment is a TOML file in ``configs/experiments/``: a base preset plus override lists per
axis (data fraction, initialisation, Stage-2 variant, ...) and a list of seeds. Every combination
is a *cell*, an ordinary run (:func:`selfimprove.pipeline.run_pipeline`) in
``runs/experiments/<name>/<cell>/``. Cells that differ only in Stage-2 settings train their SFT
checkpoint once (in ``_stage1/``) and each start Stage 2 from a copy of it. Every
Self-Improvement cell runs beside its controls: the SFT policy evaluated at lower temperatures, and
constant-reward REINFORCE from the same SFT checkpoint. Finished cells are skipped on ``resume``;
a failed cell is logged and reported without stopping the others.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import shutil
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from tqdm import tqdm

from selfimprove.config import PRESET_DIR, RunConfig, _merge, config_from_dict, load_config, parse_override
from selfimprove.errors import ConfigError, RunStateError
from selfimprove.pipeline import run_pipeline
from selfimprove.runlog import read_json, write_json

log = logging.getLogger(__name__)

EXPERIMENT_DIR = PRESET_DIR / "experiments"
REPORT_KINDS = ("table", "data-efficiency", "ablation")
_TOP_KEYS = ("description", "extends", "preset", "set", "seeds", "axes", "controls", "init_from", "reward_model",
             "report")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")
_RUNNER_KEYS = ("name", "runs_dir", "seed")  # chosen by the runner for every cell
_STAGE1_SECTIONS = ("domain", "seed", "precision", "env", "data", "model", "sft", "eval")  # what a shared SFT depends on


# --------------------------------------------------------------------------------------------- spec


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


def _read_experiment_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"experiment {path} extends itself (cycle: {' -> '.join(str(p) for p in seen)})")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"experiment file {path} is not valid TOML: {exc}") from exc
    base = data.pop("extends", None)
    if base is not None:
        data = _merge(_read_experiment_toml(_experiment_path(str(base)), seen + (path.resolve(),)), data)
    return data


def load_experiment(name: str, quick: bool = False) -> ExperimentSpec:
    """Read and check an experiment by name (``configs/experiments/<name>.toml``) or .toml path."""
    if quick and not name.endswith("-quick") and not name.endswith(".toml"):
        name = f"{name}-quick"
    path = _experiment_path(name)
    data = _read_experiment_toml(path)
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


# --------------------------------------------------------------------------------------------- plan


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


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: data}


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


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


# ------------------------------------------------------------------------------------ execution


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage1_dir(group: Stage1Group) -> Path:
    return group.config.run_dir


def _run_stage1(task: dict[str, Any]) -> dict[str, Any]:
    """Train (or copy in) the shared SFT checkpoint and evaluate it at every temperature the runs use."""
    from selfimprove.evaluate import evaluate
    from selfimprove.model.checkpoint import read_checkpoint_config
    from selfimprove.runlog import prepare_run
    from selfimprove.train.sft import sft, sft_checkpoint

    config = config_from_dict(task["config"])
    run_dir = config.run_dir
    if task.get("init_from"):
        target = sft_checkpoint(config)
        if not target.exists():
            source = Path(task["init_from"])
            read_checkpoint_config(source)
            prepare_run(config)
            tmp = target.with_name(".sft.copy")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for item in ("model.safetensors", "config.json"):
                shutil.copy2(source / item, tmp / item)
            tmp.rename(target)
        path = target
    else:
        if not sft_checkpoint(config).exists() and not (run_dir / "checkpoints" / "sft_state").exists():
            _reuse_stage1(config)
        path = sft(config, resume=True, progress=False)
    for name, temp in [("eval_sft.json", None)] + [(f"eval_sft_t{t:g}.json", t)
                                                     for t in config.eval.control_temperatures]:
        if not (run_dir / name).exists():
            write_json(run_dir / name, evaluate(config, path, temperature=temp))
    _shared_diagnostics(config, path)
    return {"status": "done"}


def _reuse_stage1(config: RunConfig) -> Path | None:
    """Copy in a finished SFT group of another experiment whose Stage-1 settings are identical.

    Training it again would give the same checkpoint (same data, seed, model and recipe), so e.g.
    the ``scratch`` column of ``pretraining`` reuses ``data-efficiency``'s SFT. The copy keeps the
    evaluations and, when they were computed the same way, the diagnostics and videos; the source is
    recorded in ``stage1_source.json``. Returns the source folder, or None when there is none.
    """
    from selfimprove.runlog import prepare_run

    source = _find_identical(config.run_dir.parents[2].glob("*/_stage1/*/checkpoints/sft/model.safetensors"),
                             lambda saved: saved.parents[2], lambda c: _stage1_key(c, ""), _stage1_key(config, ""),
                             own_root=config.run_dir.parents[1])
    if source is None:
        return None
    prepare_run(config)
    _prepare_cell(config, source)  # checkpoint, evaluations, SFT curve, and diagnostics when they match
    write_json(config.run_dir / "stage1_source.json", {"copied_from": str(source)})
    log.info("Stage 1 reused from %s (identical settings): no SFT training", source)
    return source


def _find_identical(marks, folder_of, key_of, key: str, own_root: Path) -> Path | None:
    """The first finished folder of another experiment (found by a file that marks it finished) whose
    saved config has ``key``."""
    for mark in sorted(marks):
        folder = folder_of(mark)
        if own_root in folder.parents:
            continue
        try:
            if key_of(config_from_dict(json.loads((folder / "config.json").read_text()))) == key:
                return folder
        except (ConfigError, OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
    return None


def _diagnostics_key(config: RunConfig) -> str:
    """What a run's reward-model diagnostics depend on beyond its Stage-1 group (see diagnose.py)."""
    d = config.to_dict()
    return _digest({"diagnose": d["diagnose"], "temperature": config.improve.temperature,
                    "reward_model": config.improve.reward_model})


def _shared_diagnostics(config: RunConfig, sft_path: Path) -> None:
    """Diagnose the group's reward model and record the SFT videos once, for every run to copy."""
    from selfimprove.diagnose import run_diagnostics
    from selfimprove.train.improve import reward_model_path
    from selfimprove.videos import record_videos

    run_dir = config.run_dir
    run_diagnostics(config, reward_model_path(config, sft_path), resume=True)
    record_videos(config, sft_path, "sft", resume=True)
    write_json(run_dir / "diagnostics" / "shared.json", {"key": _diagnostics_key(config)})


def _prepare_cell(config: RunConfig, stage1_dir: Path) -> None:
    """Start a cell from its group's SFT checkpoint, evaluations, reward-model diagnostics and SFT videos.

    run_pipeline then skips what was copied. Diagnostics are copied only when this run would have
    computed the same ones (same diagnose settings, practice temperature and reward model).
    """
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "checkpoints" / "sft"
    if not target.exists():
        tmp = target.with_name(".sft.copy")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(stage1_dir / "checkpoints" / "sft", tmp, copy_function=_link_or_copy)
        tmp.rename(target)
    for src in stage1_dir.glob("eval_sft*.json"):
        if not (run_dir / src.name).exists():
            shutil.copy2(src, run_dir / src.name)
    metrics = stage1_dir / "metrics.jsonl"
    if metrics.exists() and not (run_dir / "metrics.jsonl").exists():
        shutil.copy2(metrics, run_dir / "metrics.jsonl")
    shared = stage1_dir / "diagnostics" / "shared.json"
    if shared.exists() and read_json(shared).get("key") == _diagnostics_key(config):
        for folder in ("diagnostics", "videos"):
            if (stage1_dir / folder).is_dir() and not (run_dir / folder).exists():
                tmp = run_dir / f".{folder}.copy"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(stage1_dir / folder, tmp)
                tmp.rename(run_dir / folder)


def _run_key(config: RunConfig) -> str:
    """Runs with equal keys compute the same thing: everything but where the run folder is."""
    return _digest({**config.to_dict(), "name": "", "runs_dir": ""})


def _reuse_run(config: RunConfig) -> Path | None:
    """Copy in a finished run of another experiment with an identical config, instead of running it again.

    Every step of a run is seeded, so the copy is what the run would compute (e.g. ``pretraining``'s
    ``scratch`` cells are ``data-efficiency``'s cells). ``run_source.json`` names the source.
    """
    run_dir = config.run_dir
    source = _find_identical(run_dir.parents[1].glob("*/*/summary.json"), lambda saved: saved.parent, _run_key,
                             _run_key(config), own_root=run_dir.parent)
    if source is not None:
        tmp = run_dir.with_name(f".{run_dir.name}.copy")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("experiment.log"))
        write_json(tmp / "run_source.json", {"copied_from": str(source)})
        run_dir.mkdir(parents=True, exist_ok=True)
        # summary.json (what marks a run finished) moves in last: an interrupted copy is resumed, not trusted
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == "summary.json"):
            os.replace(item, run_dir / item.name)
        tmp.rmdir()
        log.info("run reused from %s (identical config): nothing computed", source)
        return source
    return None


def _run_cell(task: dict[str, Any]) -> dict[str, Any]:
    config = config_from_dict(task["config"])
    fresh = not config.run_dir.exists() or {p.name for p in config.run_dir.iterdir()} <= {"experiment.log"}
    if fresh and _reuse_run(config) is not None:
        return {"status": "done", "reused": True}
    _prepare_cell(config, Path(task["stage1_dir"]))
    summary = run_pipeline(config, resume=True, progress=False)
    return {"status": "done", "wall_time_s": summary.get("wall_time_s")}


def _execute(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task, logging to its folder; never raises (a failure is a result)."""
    import torch

    log_path = Path(task["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    torch.set_num_threads(int(task["config"].get("torch_threads", 1)))
    t0 = time.time()
    try:
        result = (_run_stage1 if task["kind"] == "stage1" else _run_cell)(task)
    except Exception as exc:  # noqa: BLE001 - a failed cell must not take the others down
        logging.getLogger(__name__).error("%s failed:\n%s", task["name"], traceback.format_exc())
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    result["seconds"] = round(time.time() - t0, 2)
    return result


def _worker_loop(conn: multiprocessing.connection.Connection) -> None:
    """A worker process: run tasks sent by the scheduler until it sends None."""
    logging.getLogger().handlers.clear()
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if task is None:
            return
        try:
            conn.send(_execute(task))
        except KeyboardInterrupt:
            return


class _Worker:
    def __init__(self, ctx, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the child's torch at import
        try:
            self.proc = ctx.Process(target=_worker_loop, args=(child,))
            self.proc.start()
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        child.close()
        self.task: dict[str, Any] | None = None

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout)


def _schedule(tasks: dict[str, dict[str, Any]], depends: dict[str, str | None], parallel: int,
              on_done, threads: int) -> None:
    """Run ``tasks`` (name -> task) on ``parallel`` workers, each after the task it depends on.

    A task whose dependency failed fails without running; a worker that dies (killed, out of
    memory) fails its task and is replaced.
    """
    finished: dict[str, dict[str, Any]] = {}
    waiting = list(tasks)

    def ready() -> str | None:
        # Stage-1 groups first: each is the longest task and unlocks its runs, so the grid never ends
        # with one SFT running alone while the other workers idle (longest-first scheduling).
        for want_stage1 in (True, False):
            for name in waiting:
                dep = depends.get(name)
                if (dep is None or dep in finished) and (tasks[name]["kind"] == "stage1") == want_stage1:
                    return name
        return None

    def complete(name: str, result: dict[str, Any]) -> None:
        finished[name] = result
        on_done(name, tasks[name], result)
        if result["status"] != "done":  # everything that waits on it fails too
            for other in [n for n in waiting if depends.get(n) == name]:
                waiting.remove(other)
                complete(other, {"status": "failed", "error": f"its Stage 1 ({name}) failed: {result.get('error')}",
                                 "seconds": 0.0})

    if parallel <= 1:
        while waiting:
            name = ready()
            assert name is not None, "dependency cycle"
            waiting.remove(name)
            complete(name, _execute(tasks[name]))
        return
    ctx = mp.get_context("spawn")
    workers: list[_Worker] = []
    try:
        workers = [_Worker(ctx, threads) for _ in range(min(parallel, len(tasks)))]
        while waiting or any(w.task for w in workers):
            for w in workers:
                if w.task is None:
                    name = ready()
                    if name is None:
                        break
                    waiting.remove(name)
                    w.task = tasks[name]
                    w.conn.send(w.task)
            busy = [w for w in workers if w.task is not None]
            if not busy:
                if waiting:  # nothing runnable and nothing running: the rest wait on failed work
                    raise RuntimeError(f"unschedulable tasks: {waiting}")
                break
            ready_objs = mp.connection.wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for i, w in enumerate(workers):
                if w.task is None:
                    continue
                if w.conn in ready_objs:
                    try:
                        result = w.conn.recv()
                    except (EOFError, OSError):
                        result = None
                elif w.proc.sentinel in ready_objs:
                    result = None
                else:
                    continue
                task, w.task = w.task, None
                if result is None:
                    w.proc.join(1.0)
                    result = {"status": "failed", "seconds": 0.0,
                              "error": f"its worker process died (exit code {w.proc.exitcode}; out of memory or "
                                       "killed?); rerun with --resume to retry it"}
                    w.stop(1.0)
                    workers[i] = _Worker(ctx, threads)
                complete(task["name"], result)
    finally:
        for w in workers:
            if w.task is not None and w.proc.is_alive():
                w.proc.terminate()
            w.stop()


# ------------------------------------------------------------------------------------ top level


def _finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists()


def _check_existing(plan: ExperimentPlan, selected: list[str] | None = None) -> None:
    """Refuse to mix results of different configs: a folder run with other settings is an error.

    Only the ``selected`` runs (default: all) and their Stage-1 groups are checked: ``--only`` with a
    ``--set`` that fits one domain (e.g. ``data.path``) leaves the other domain's finished cells alone.
    """
    names = list(plan.runs) if selected is None else selected
    checks = [(plan.runs[n].config, plan.runs[n].config.run_dir) for n in names]
    needed = {plan.runs[n].stage1 for n in names}
    checks += [(g.config, _stage1_dir(g)) for name, g in plan.groups.items() if name in needed]
    for config, run_dir in checks:
        saved = run_dir / "config.json"
        if not saved.exists():
            continue
        try:
            old = json.loads(saved.read_text())
        except json.JSONDecodeError:
            continue
        try:  # fields added to the library since (with their defaults) are no difference
            old = config_from_dict(old).to_dict()
        except ConfigError:
            pass
        new = config.to_dict()
        if run_dir.parent.name == "_stage1":  # a shared SFT only depends on its Stage-1 settings
            old = {k: old.get(k) for k in _STAGE1_SECTIONS}
            new = {k: new[k] for k in _STAGE1_SECTIONS}
        else:  # where the folder is, not what it computes: a run copied from another experiment keeps its source's
            old, new = ({**c, "name": "", "runs_dir": ""} for c in (old, new))
        diff = _config_diff(old, new)
        if diff:
            raise RunStateError(f"{run_dir} was run with a different config (differs in {', '.join(diff[:8])}); "
                                "restore the experiment's settings, delete that folder to rerun it, or use "
                                "another --runs-dir (nothing was changed)")


def _collect_datasets(plan: ExperimentPlan, parallel: int, progress: bool, selected: list[str] | None = None) -> None:
    """Collect every dataset the selected runs need and do not have yet, once, before any training."""
    from selfimprove.data.collect import collect_demos

    needed: dict[Path, RunConfig] = {}
    for name, run in plan.runs.items():
        if selected is not None and name not in selected:
            continue
        path = run.config.dataset_path
        if not (path / "meta" / "info.json").exists():
            needed.setdefault(path, run.config)
    for path, config in needed.items():
        if path.parent != plan.data_dir:
            raise ConfigError(f"dataset {path} (data.path) does not exist; collect it first "
                              f"(`selfimprove collect ... --out {path}`) or leave data.path empty to let the "
                              "experiment collect one")
        collect_config = config_from_dict({**config.to_dict(), "seed": plan.runs[config.name].data_seed})
        log.info("collecting %d demos into %s (shared by every cell)", config.data.episodes, path)
        tmp = path.with_name(f".{path.name}.collecting")
        shutil.rmtree(tmp, ignore_errors=True)
        collect_demos(collect_config, out=tmp, workers=max(1, min(parallel, config.data.collect_workers)),
                      progress=progress)
        tmp.rename(path)


def _resolve_init(plan: ExperimentPlan) -> None:
    """``init_from``: Stage 2 starts from that checkpoint, rewarded by its frozen reward model."""
    from selfimprove.model.checkpoint import read_checkpoint_config

    spec = plan.spec
    if not spec.init_from:
        return
    source = Path(spec.init_from)
    try:
        meta = read_checkpoint_config(source).get("meta", {})
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise ConfigError(f"experiment {spec.name!r}: init_from = {str(source)!r} is not a checkpoint ({exc}); "
                          "run the experiment that makes it first, or point init_from at another checkpoint") from exc
    reward_model = spec.reward_model or meta.get("reward_model") or meta.get("sft") or str(source)
    if not (Path(reward_model) / "config.json").exists():
        raise ConfigError(f"experiment {spec.name!r}: reward model {reward_model!r} (of init_from {str(source)!r}) "
                          "does not exist; set reward_model = \"<SFT checkpoint>\" in the experiment")
    source_run_dir = source.parent.parent  # <run>/checkpoints/<name>
    source_config = source_run_dir / "config.json"
    source_data = json.loads(source_config.read_text()).get("data", {}) if source_config.exists() else {}
    source_demos = source_data.get("path") or (str(source_run_dir / "demos")
                                               if (source_run_dir / "demos" / "meta").exists() else "")
    for run in [*plan.runs.values(), *plan.groups.values()]:
        config = run.config
        config.improve.reward_model = reward_model
        if config.improve.success_threshold is None and meta.get("threshold") is not None:
            config.improve.success_threshold = float(meta["threshold"])
        if config.dataset_path.parent == plan.data_dir and source_demos:
            # the detector's diagnostics use the held-out demos the reward model was trained beside
            config.data.path = source_demos
            for key in ("fraction", "val_fraction"):
                if key in source_data:
                    setattr(config.data, key, source_data[key])


def run_experiment(name: str, quick: bool = False, resume: bool = False, parallel: int | None = None,
                   only: list[str] | None = None, runs_dir: str | Path = "runs", overrides: list[str] | None = None,
                   progress: bool = True, report_only: bool = False) -> dict[str, Any]:
    """Run the named experiment grid and return its summary (also ``runs/experiments/<name>/summary.json``).

    ``parallel`` worker processes (default: one per CPU core) each run one cell at a time with the
    cell's ``torch_threads``. ``only`` picks cells by name or glob (their controls and shared SFT
    come along). With ``resume`` finished cells are skipped and interrupted ones continue;
    ``report_only`` rebuilds summary and report from what is on disk.
    """
    spec = load_experiment(name, quick=quick)
    plan = plan_experiment(spec, runs_dir, overrides)
    if not report_only:
        _resolve_init(plan)
        existing = plan.root.exists() and any(p.name != "summary.json" for p in plan.root.iterdir())
        if existing and not resume:
            raise RunStateError(f"{plan.root} already holds this experiment; pass --resume to continue it (finished "
                                "cells are kept), or use another --runs-dir (nothing was changed)")
        selected = _select(plan, only)
        _check_existing(plan, selected)
        parallel = int(parallel or os.cpu_count() or 1)
        t0 = time.time()
        try:
            _collect_datasets(plan, parallel, progress, selected)
            _execute_plan(plan, selected, parallel, progress)
        finally:  # the experiment's wall time, summed over every invocation (resumes included)
            timing = read_json(plan.root / "timing.json")
            timing["wall_time_s"] = round(timing.get("wall_time_s", 0.0) + time.time() - t0, 1)
            timing.setdefault("invocations", []).append({"parallel": parallel, "only": only or None,
                                                         "seconds": round(time.time() - t0, 1)})
            plan.root.mkdir(parents=True, exist_ok=True)
            write_json(plan.root / "timing.json", timing)
    from selfimprove.experiment_report import summarize_experiment, write_experiment_report

    summary = summarize_experiment(plan)
    summary["timing"] = read_json(plan.root / "timing.json") or None
    write_json(plan.root / "summary.json", summary)
    write_experiment_report(plan.root, summary)
    return summary


def _select(plan: ExperimentPlan, only: list[str] | None) -> list[str]:
    """Run names to do: the chosen cells and the controls beside them."""
    if not only:
        return list(plan.runs)
    chosen: list[str] = []
    for pattern in only:
        hits = [n for n in plan.runs if fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(f"--only {pattern!r} matches no cell of experiment {plan.spec.name!r}; cells: "
                              f"{', '.join(c.name for c in plan.cells)}")
        chosen += [h for h in hits if h not in chosen]
    for name in list(chosen):
        control = plan.runs[name].control
        if control and control not in chosen:
            chosen.append(control)
    return [n for n in plan.runs if n in chosen]


def _execute_plan(plan: ExperimentPlan, selected: list[str], parallel: int, progress: bool) -> None:
    plan.root.mkdir(parents=True, exist_ok=True)
    status_path = plan.root / "status.json"
    status: dict[str, Any] = json.loads(status_path.read_text()) if status_path.exists() else {}
    todo = [n for n in selected if not _finished(plan.runs[n].config.run_dir)]
    skipped = len(selected) - len(todo)
    if skipped:
        log.info("%d of %d runs are finished and kept", skipped, len(selected))
    tasks: dict[str, dict[str, Any]] = {}
    depends: dict[str, str | None] = {}

    def stage1_cost(name: str) -> tuple[float, float]:  # longest SFT first: the grid finishes sooner
        config = plan.groups[plan.runs[name].stage1].config
        return (0.0, 0.0) if plan.spec.init_from else (-config.sft.steps, -config.data.fraction)

    todo.sort(key=stage1_cost)
    for name in todo:
        run = plan.runs[name]
        group = plan.groups[run.stage1]
        gdir = _stage1_dir(group)
        gtask = f"stage1:{group.name}"
        if gtask not in tasks:
            tasks[gtask] = {"kind": "stage1", "name": gtask, "config": group.config.to_dict(),
                            "init_from": group.init_from, "log": str(gdir / "experiment.log")}
            depends[gtask] = None
        tasks[name] = {"kind": "run", "name": name, "config": run.config.to_dict(), "stage1_dir": str(gdir),
                       "log": str(run.config.run_dir / "experiment.log")}
        depends[name] = gtask
    threads = max((plan.runs[n].config.torch_threads for n in todo), default=1)
    bar = tqdm(total=len(selected), initial=skipped, desc=f"experiment {plan.spec.name}", unit="run",
               disable=not progress)
    failures: list[str] = []

    def on_done(name: str, task: dict[str, Any], result: dict[str, Any]) -> None:
        status[name] = {k: result.get(k) for k in ("status", "error", "seconds")}
        write_json(status_path, status)
        if result["status"] != "done":
            failures.append(name)
            log.error("%s failed: %s (log: %s)", name, result.get("error"), task["log"])
        if task["kind"] == "run":
            bar.update(1)
        bar.set_postfix(failed=len(failures), refresh=True)

    try:
        _schedule(tasks, depends, parallel, on_done, threads)
    finally:
        bar.close()
    if failures:
        log.error("%d of %d tasks failed: %s; see each one's experiment.log, fix, and rerun with --resume",
                  len(failures), len(tasks), ", ".join(failures))

