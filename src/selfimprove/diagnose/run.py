"""A diagnosis from start to file: the checkpoint's config, its frames, the tables, the audit, the outputs.

:func:`diagnose` (``selfimprove diagnose``) resolves the config a checkpoint was made with, scores
its ``d`` on the held-out demos and on ``diagnose.rollouts`` policy rollouts run to the time limit,
takes ``s`` from :func:`selfimprove.reward.calibrate_threshold`, asks :mod:`.checks` for the tables
and :mod:`.audit` for the detector audit, and writes ``diagnostics.json``, the plots and
``report.md``. :func:`run_diagnostics` is the ``selfimprove run`` step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfimprove.config import RunConfig, _merge, config_from_dict, load_config, parse_override
from selfimprove.data.store import EpisodeStore, has_store
from selfimprove.domain_table import GOAL_DISTANCE
from selfimprove.diagnose.audit import audit_demos, audit_rollouts, gate, reward_signal
from selfimprove.diagnose.checks import FrameSet, _at, _section, alternatives
from selfimprove.diagnose.plots import write_plots
from selfimprove.diagnose.setback import plot_setback, recorded_info
from selfimprove.diagnose.report import write_markdown
from selfimprove.domain_table import DOMAINS
from selfimprove.domains import goal_key_for, make_env
from selfimprove.errors import CheckpointError, ConfigError, DatasetError, RunStateError
from selfimprove.folders import holds_something
from selfimprove.fleet.local import LocalFleet, seed_stream
from selfimprove.model.checkpoint import load_checkpoint, read_checkpoint_config
from selfimprove.reward import (HELD_OUT_CACHE, MismatchedInstructions, StepsToGoReward, calibrate_threshold,
                                demo_steps_to_go, detector_view, load_ensemble, reachable_steps_to_go,
                                recommend_threshold)
from selfimprove.rundir import RunDir
from selfimprove.runlog import read_json, torch_generator, write_json

log = logging.getLogger(__name__)

# preset used for a checkpoint outside a run folder, by the domain its spec names
NO_NEGATIVES_WARNING = ("this checkpoint was trained without mismatched-instruction negatives (sft.negatives = 0): "
                        "its steps-to-go head cannot say 'not on the way', so as a reward model its detector fires "
                        "on states that are not the goal; retrain Stage 1 with sft.negatives > 0")


# ----------------------------------------------------------------------------------------------- inputs

def default_out_dir(checkpoint: str | Path) -> Path:
    """``runs/<name>/diagnostics`` for ``runs/<name>/checkpoints/sft``; else a folder beside the checkpoint."""
    checkpoint = Path(checkpoint)
    run = RunDir(checkpoint.parent.parent)
    if checkpoint.parent == run.checkpoints:
        suffix = "" if checkpoint == run.sft_checkpoint else f"_{checkpoint.name}"
        return run.root / f"{run.diagnostics.name}{suffix}"
    return checkpoint.parent / f"{checkpoint.name}_diagnostics"


#: what :func:`diagnose` writes into its folder, Stage 2's keyed cache of the held-out pass and an experiment's
#: record of shared diagnostics: a folder holding anything else is not diagnose's and is never written into
OWN_FILES = frozenset({"diagnostics.json", "report.md", "calibration.png", "error_by_horizon.png", "spearman.png",
                       "pr.png", "roc.png", "setback.png", HELD_OUT_CACHE, "shared.json"})
#: the config fields diagnostics depend on (besides the checkpoint's weights and the store of held-out demos)
SETTINGS = ("domain", "env", "data.fraction", "data.val_fraction", "diagnose", "eval.seed", "eval.robots",
            "improve.temperature", "improve.threshold_rule", "improve.threshold_precision", "improve.success_hold",
            "improve.gamma", "improve.reward_clip", "improve.baseline_decay", "improve.reward_ensemble",
            "improve.detector")
# settings added to SETTINGS later: a diagnosis written before one existed was made with its default
LATER_SETTINGS = {"improve.reward_ensemble": [], "improve.detector": "steps_to_go"}


def identity(checkpoint: Path, config: RunConfig, rollouts: int, out: Path) -> dict[str, Any]:
    """What a diagnosis in ``out`` is of: the checkpoint's weights (a digest: a copied or moved checkpoint is the
    same one), the store of held-out demos (relative to ``out``: a run folder moved with its demos keeps it),
    the rollouts and the settings in :data:`SETTINGS`."""
    data = config.to_dict()
    settings = {}
    for name in SETTINGS:
        value: Any = data
        for part in name.split("."):
            value = value[part]
        settings[name] = value
    weights = checkpoint / "model.safetensors"
    return {"weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else None,
            "dataset": os.path.relpath(config.dataset_path.resolve(), out.resolve()), "rollouts": rollouts,
            "settings": json.loads(json.dumps(settings))}


def check_out_folder(out: Path, mine: dict[str, Any], checkpoint: Path, config: RunConfig) -> None:
    """Refuse ``out`` unless it is empty, new, or this diagnosis's own earlier output (:func:`identity`).

    A folder holding files diagnose does not write (another run, someone's own files) is never written
    into; one holding the diagnostics of another checkpoint, store or settings is not replaced.
    """
    if not holds_something(out):
        return
    if not out.is_dir():
        raise RunStateError(f"{out} is a file, not a folder for diagnostics; pass another --out (nothing was changed)")
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if n not in OWN_FILES and not (n.startswith(".") or n.endswith(".tmp"))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunStateError(f"{out} holds {shown}, which diagnose did not write; refusing to write diagnostics into "
                            "it. Pass an empty or new folder with --out (nothing was changed)")
    saved = read_json(out / "diagnostics.json")
    if not (out / "diagnostics.json").exists():
        return  # only keyed caches: recomputed when they do not match
    theirs = saved.get("identity")
    if theirs is None:  # written before diagnostics recorded their identity: the paths they name
        same = saved.get("checkpoint") == str(checkpoint) and saved.get("dataset") == str(config.dataset_path)
        differs = [] if same else ["checkpoint or dataset"]
    else:
        differs = [k for k in ("weights_sha256", "dataset", "rollouts") if theirs.get(k) != mine[k]]
        recorded = {**LATER_SETTINGS, **theirs.get("settings", {})}
        differs += [k for k in mine["settings"] if recorded.get(k) != mine["settings"][k]]
    if differs:
        raise RunStateError(
            f"{out} holds the diagnostics of {saved.get('checkpoint')} on {saved.get('dataset')}, made with another "
            f"{', '.join(d.replace('weights_sha256', 'checkpoint') for d in differs)}; refusing to replace them. "
            "Pass a new folder with --out for these diagnostics, or delete that folder to diagnose again "
            "(nothing was changed)")


def _known_fields(cls: type, data: dict[str, Any], where: str, dropped: list[str]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        if key not in hints:
            dropped.append(where + key)
            continue
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = _known_fields(hints[key], value, f"{where}{key}.", dropped)
        out[key] = value
    return out


def resolve_config(checkpoint: str | Path, preset: str | None = None, overrides: list[str] | None = None,
                   dataset: str | Path | None = None) -> RunConfig:
    """The config a checkpoint was made with: its run folder's ``config.json``, else a preset.

    A checkpoint at ``runs/<name>/checkpoints/<ckpt>`` takes ``runs/<name>/config.json`` (fields this
    version no longer knows are dropped with a warning); elsewhere, ``preset`` or the preset of the
    checkpoint's domain, with the dataset its metadata names. ``dataset`` beats both.

    Diagnostics never run Stage 2's guard, so ``improve.guard`` is off unless ``overrides`` turn it on:
    the settings it cannot be combined with (a reward ensemble, the goal-probability detector) need
    no ``--set improve.guard=false`` here.
    """
    overrides = ["improve.guard=false", *(overrides or [])]
    checkpoint = Path(checkpoint)
    meta = read_checkpoint_config(checkpoint)  # clear CheckpointError when missing or corrupt
    domain = meta.get("spec", {}).get("domain")
    run = RunDir(checkpoint.parent.parent)
    run_config = run.config
    if preset is None and checkpoint.parent == run.checkpoints and run_config.exists():
        try:
            data = json.loads(run_config.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{run_config} is not valid JSON ({exc}); pass a preset with --config") from exc
        dropped: list[str] = []
        data = _known_fields(RunConfig, data, "", dropped)
        if dropped:
            log.warning("%s: ignoring fields this version does not know: %s", run_config, ", ".join(dropped))
        for item in overrides:
            data = _merge(data, parse_override(item))
        if not data.get("data", {}).get("path"):  # the run's own demos, wherever the run folder is now
            data.setdefault("data", {})["path"] = str(RunDir(checkpoint.parent.parent).demos)
        config = config_from_dict(data)
    else:
        if preset is None:
            if domain not in DOMAINS:
                raise CheckpointError(f"{checkpoint} names domain {domain!r}; pass a preset with --config")
            preset = DOMAINS[domain].preset
        config = load_config(preset, overrides)
        if not config.data.path and meta.get("meta", {}).get("dataset"):
            config.data.path = str(meta["meta"]["dataset"])
    if dataset is not None:
        config.data.path = str(dataset)
    if not has_store(config.dataset_path):
        raise DatasetError(f"no episode store at {config.dataset_path} for the held-out demos; pass the store "
                           "the checkpoint was trained on with --dataset")
    return config


def held_out_demos(reward: StepsToGoReward, config: RunConfig, cache: Path | None = None
                   ) -> tuple[FrameSet, np.ndarray, dict[str, np.ndarray]]:
    """``d`` on the validation split of the store (the frames Stage 2 calibrates ``s`` on), goal-frame
    labels, and the arrays as Stage 2 reads them (with ``d_mismatched``).

    ``cache``: see :func:`selfimprove.reward.demo_steps_to_go` (a run's Stage 2 reads it). ``reward``'s
    ``d`` is an ensemble's largest (``improve.reward_ensemble``) as in Stage 2.
    """

    frames = demo_steps_to_go(reward, config, cache)
    starts = np.asarray(frames["episode_start"], dtype=np.int64)
    sizes = np.diff(np.append(starts, len(frames["d"])))
    return FrameSet(d=frames["d"].astype(np.float64), success=frames["true_success"],
                    true_stg=frames["steps_to_go"].astype(np.float64), time=frames["frame_index"].astype(np.int64),
                    starts=starts, sizes=sizes), frames["goal_frame"], frames


def policy_rollouts(reward: StepsToGoReward, config: RunConfig, n: int) -> tuple[FrameSet, list]:
    """``n`` episodes of the checkpoint's policy on the fixed eval seeds, run to the time limit.

    Sampling at ``improve.temperature`` (Stage 2's practice distribution). The policy is ``reward``'s
    first member, the checkpoint; ``reward``'s detector never fires (s = -inf), so ``d`` is recorded
    on every frame and no episode is cut: the detector at any ``s`` can be replayed offline. Also returns the episodes,
    with the simulator's goal distance and block positions per frame where the env reports them.
    """
    model = reward.model
    fleet = LocalFleet(lambda: make_env(config, terminate_on_success=False), model.spec,
                       min(config.eval.robots, n), reward, record_info=(GOAL_DISTANCE, "block_positions", *recorded_info(config.domain)))
    try:
        episodes = fleet.collect(model.state_dict(), version=0, seeds=seed_stream(config.eval.seed), n_episodes=n,
                                 temperature=config.improve.temperature,
                                 generator=torch_generator(config.eval.seed, 13))
    finally:
        fleet.close()
    episodes.sort(key=lambda e: e.meta["seed"])
    d, success, true_stg, time = [], [], [], []
    for e in episodes:
        flags = np.asarray(e.info.get("is_success", np.zeros(e.length + 1)), dtype=bool)
        steps = np.full(e.length + 1, np.nan)
        if flags.any():
            first = int(np.argmax(flags))
            steps[:first + 1] = first - np.arange(first + 1)
        d.append(np.asarray(e.stg, dtype=np.float64))
        success.append(flags)
        true_stg.append(steps)
        time.append(np.arange(e.length + 1))
    sizes = np.array([len(x) for x in d], dtype=np.int64)
    return FrameSet(d=np.concatenate(d), success=np.concatenate(success), true_stg=np.concatenate(true_stg),
                    time=np.concatenate(time), starts=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
                    sizes=sizes), episodes


def _clean(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------- main

def diagnose(checkpoint: str | Path, config: RunConfig | None = None, dataset: str | Path | None = None,
             rollouts: int | None = None, out: str | Path | None = None, preset: str | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Diagnose the steps-to-go head of ``checkpoint``; writes ``out``/diagnostics.json, report.md, PNGs.

    ``config`` defaults to the checkpoint's run config, else ``preset`` with ``overrides`` (see
    :func:`resolve_config`); ``rollouts`` to ``config.diagnose.rollouts``; ``out`` to
    :func:`default_out_dir`. Returns what ``diagnostics.json`` holds.
    """
    checkpoint = Path(checkpoint)
    if config is None:
        config = resolve_config(checkpoint, preset, overrides, dataset)
    elif dataset is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(dataset)))
    n_rollouts = config.diagnose.rollouts if rollouts is None else int(rollouts)
    if n_rollouts < 0:
        raise ConfigError(f"rollouts must be >= 0, got {n_rollouts}")
    out = Path(out) if out is not None else default_out_dir(checkpoint)
    torch.set_num_threads(config.torch_threads)
    model, meta = load_checkpoint(checkpoint, expect_domain=config.domain)
    # d as Stage 2 will see it (an ensemble's largest); its detector never fires, so rollouts run to the limit
    reward = StepsToGoReward(model, -math.inf, ensemble=load_ensemble(config.improve.reward_ensemble, model),
                             detector=config.improve.detector)
    mine = identity(checkpoint, config, n_rollouts, out)
    check_out_folder(out, mine, checkpoint, config)
    log.info("diagnosing %s: held-out demos of %s", checkpoint, config.dataset_path)

    demos, goal, held_out = held_out_demos(reward, config, out / HELD_OUT_CACHE)
    cfg = config.improve
    choice = calibrate_threshold(held_out, cfg.threshold_rule, cfg.threshold_precision, cfg.success_hold,
                                 cfg.detector)
    view, grid = detector_view(held_out, cfg.detector), reward.thresholds
    f1_table = recommend_threshold(view["d"], goal, grid)["table"]
    s = choice["threshold"]
    several_goals = "d_mismatched" in held_out
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "identity": mine, "checkpoint_meta": meta, "domain": config.domain,
        "dataset": str(config.dataset_path), "recommended_s": s, "rule": choice["rule"],
        "rule_table": f1_table, "alternatives": alternatives(f1_table),
        "at_recommended_s": {},
        "detector": cfg.detector,
        "demos": _section(demos, s, goal_frame=goal, score=view["d"] if reward.separate_score else None, grid=grid),
        "audit": {"hold": cfg.success_hold, "detector": cfg.detector, "negatives_trained": bool(model.spec.stg_never),
                  "demos": audit_demos(view, s, cfg.success_hold)},
    }
    if several_goals and not model.spec.stg_never:
        result["warning"] = NO_NEGATIVES_WARNING
        log.warning(NO_NEGATIVES_WARNING)
    rollout_audit = None
    if n_rollouts:
        log.info("diagnosing %s: %d policy rollouts on eval seeds from %d", checkpoint, n_rollouts, config.eval.seed)
        rolls, episodes = policy_rollouts(reward, config, n_rollouts)
        draw = None
        if several_goals:

            mismatched = MismatchedInstructions(EpisodeStore(config.dataset_path).instructions,
                                                goal_key_for(config.domain))
            generator = torch.Generator().manual_seed(0)
            draw = lambda texts: mismatched.draw(texts, generator)  # noqa: E731
        rollout_audit = audit_rollouts(episodes, s, cfg.success_hold, reward, draw)
        rollout_audit["reward_signal"] = reward_signal(episodes, cfg.gamma, cfg.reward_clip, cfg.baseline_decay)
        if model.spec.stg_never and rollout_audit["reward_signal"] is not None:

            reachable = reachable_steps_to_go(episodes, reward)
            rollout_audit["reward_signal_reachable"] = reward_signal(episodes, cfg.gamma, cfg.reward_clip,
                                                                     cfg.baseline_decay, reachable)
        result["audit"]["rollouts"] = rollout_audit
        setback = plot_setback(model, config.domain, episodes, out)
        if setback is not None:
            result["setback"] = setback
        score = np.concatenate([e.detector for e in episodes]) if reward.separate_score else None
        result["rollouts"] = _section(rolls, s, goal_frame=None, score=score, grid=grid)
        reached = [rolls.success[sl].any() for sl in rolls.episodes()]
        result["rollouts"].update(temperature=config.improve.temperature, first_seed=config.eval.seed,
                                  true_success_rate=float(np.mean(reached)))
    result["audit"]["gate"] = gate(result["audit"]["demos"], rollout_audit)
    for name in ("demos", "rollouts"):
        if name in result:
            sec = result[name]
            result["at_recommended_s"][name] = {
                "frame": {k: _at(sec["detector_frames"], s)[k] for k in ("precision", "recall", "f1", "fired")},
                "episode": {k: _at(sec["detector_episodes"], s)[k] for k in (
                    "precision", "recall", "fpr", "fired", "correct", "early", "steps_early_median",
                    "precision_near", "recall_near")},
            }
    result = _clean(result)
    out.mkdir(parents=True, exist_ok=True)
    result["out"] = str(out)
    result["plots"] = write_plots(result, out)
    write_json(out / "diagnostics.json", result)
    write_markdown(result, out)
    log.info("diagnostics written to %s (recommended s = %g)", out, s)
    return result


def run_diagnostics(config: RunConfig, sft_path: str | Path, resume: bool) -> dict[str, Any]:
    """The ``selfimprove run`` step: diagnostics of the SFT checkpoint in ``runs/<name>/diagnostics``.

    Cheap next to the run (the held-out demos Stage 2 calibrates on anyway, plus
    ``diagnose.rollouts`` episodes); kept on ``--resume``.
    """
    out = RunDir(config.run_dir).diagnostics
    if resume and (out / "diagnostics.json").exists():
        try:
            return json.loads((out / "diagnostics.json").read_text())
        except json.JSONDecodeError:
            log.warning("%s is unreadable; diagnosing again", out / "diagnostics.json")
    return diagnose(sft_path, config=config, out=out)
