"""What one task of an experiment does on a worker: train (or copy in) a shared SFT checkpoint and
evaluate it, or start a run from its group's checkpoint and finish it with ``run_pipeline``; work
another experiment has finished with identical settings is copied in instead of computed again."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from selfimprove.config import RunConfig, config_from_dict
from selfimprove.errors import ConfigError
from selfimprove.experiment.plan import _digest, _stage1_key
from selfimprove.pipeline import run_pipeline
from selfimprove.rundir import RunDir
from selfimprove.runlog import read_json, write_json

log = logging.getLogger(__name__)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
        if not sft_checkpoint(config).exists() and not RunDir(run_dir).sft_state.exists():
            _reuse_stage1(config)
        path = sft(config, resume=True, progress=False)
    for temp in [None, *config.eval.control_temperatures]:
        if not (result := RunDir(run_dir).eval("sft", temp)).exists():
            write_json(result, evaluate(config, path, temperature=temp))
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
    """What a run's reward-model diagnostics depend on beyond its Stage-1 group (see diagnose/run.py)."""
    d = config.to_dict()
    return _digest({"diagnose": d["diagnose"], "temperature": config.improve.temperature,
                    "reward_model": config.improve.reward_model})


def _shared_diagnostics(config: RunConfig, sft_path: Path) -> None:
    """Diagnose the group's reward model and record the SFT videos once, for every run to copy."""
    from selfimprove.diagnose.run import run_diagnostics
    from selfimprove.train.improve import reward_model_path
    from selfimprove.videos import record_videos

    run_dir = config.run_dir
    run_diagnostics(config, reward_model_path(config, sft_path), resume=True)
    record_videos(config, sft_path, "sft", resume=True)
    write_json(RunDir(run_dir).diagnostics / "shared.json", {"key": _diagnostics_key(config)})


def _prepare_cell(config: RunConfig, stage1_dir: Path) -> None:
    """Start a cell from its group's SFT checkpoint, evaluations, reward-model diagnostics and SFT videos.

    run_pipeline then skips what was copied. Diagnostics are copied only when this run would have
    computed the same ones (same diagnose settings, practice temperature and reward model).
    """
    run, stage1 = RunDir(config.run_dir), RunDir(stage1_dir)
    run_dir = run.root
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run.sft_checkpoint
    if not target.exists():
        tmp = target.with_name(".sft.copy")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(stage1.sft_checkpoint, tmp, copy_function=_link_or_copy)
        tmp.rename(target)
    for src in stage1_dir.glob(stage1.eval("sft").stem + "*.json"):
        if not (run_dir / src.name).exists():
            shutil.copy2(src, run_dir / src.name)
    if stage1.metrics.exists() and not run.metrics.exists():
        shutil.copy2(stage1.metrics, run.metrics)
    shared = stage1.diagnostics / "shared.json"
    if shared.exists() and read_json(shared).get("key") == _diagnostics_key(config):
        for folder in (run.diagnostics.name, run.videos.name):
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
