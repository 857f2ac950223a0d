"""``run_experiment``: load and plan the grid, check what is on disk (folders run with other
settings, ``init_from``), collect the shared datasets, run the tasks, then write ``summary.json``
and ``report.md``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from selfimprove.config import RunConfig, config_from_dict
from selfimprove.errors import ConfigError, RunStateError
from selfimprove.experiment.plan import _STAGE1_SECTIONS, ExperimentPlan, _stage1_dir, plan_experiment
from selfimprove.experiment.schedule import _execute_plan
from selfimprove.experiment.spec import load_experiment
from selfimprove.experiment.summary import summarize_experiment
from selfimprove.data.store import has_store
from selfimprove.rundir import RunDir
from selfimprove.runlog import read_json, write_json

log = logging.getLogger(__name__)


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
        saved = RunDir(run_dir).config
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
        if not has_store(path):
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
    source_run = RunDir(source.parent.parent)  # <run>/checkpoints/<name>
    source_config = source_run.config
    source_data = json.loads(source_config.read_text()).get("data", {}) if source_config.exists() else {}
    source_demos = source_data.get("path") or (str(source_run.demos) if (source_run.demos / "meta").exists() else "")
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
    from selfimprove.experiment.report import write_experiment_report  # matplotlib: only when a report is written

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
