"""Stage 2: Self-Improvement, the learner side.

A frozen copy of the SFT checkpoint is the reward model and success detector; a separate copy is
the policy, the only thing trained. Each iteration: the fleet collects on-policy episodes until a
batch of ``steps_per_iteration`` env steps is full; the learner computes Monte Carlo returns of the
steps-to-go reward and takes policy-gradient steps (``train/objectives.py``: the paper's REINFORCE
``-c * R_t * log pi(a_t | o_t, g)``, optionally with normalised advantages, clipped rewards and a KL
term to the frozen SFT policy, or PPO-clip); the batch is dropped and the new weights go to the fleet. Every iteration is checkpointed with everything needed
to continue it bit for bit (``--resume``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from selfimprove.config import RunConfig
from selfimprove.data.episode import Episode
from selfimprove.data.store import EpisodeStore, EpisodeWriter, split_episodes, truncate_store
from selfimprove.domains import IMPROVE_SEED_BASE, make_env
from selfimprove.folders import locks_run
from selfimprove.errors import RunStateError
from selfimprove.evaluate import evaluate
from selfimprove.fleet.base import BackgroundFleet, Fleet
from selfimprove.fleet.local import LocalFleet, seed_stream
from selfimprove.model.checkpoint import (load_checkpoint, load_train_state, optimizer_state_tensors,
                                          recover_checkpoint, restore_optimizer, save_checkpoint)
from selfimprove.model.inputs import FrameSource, from_episodes
from selfimprove.model.policy import EmbodiedModel, ModelSpec
from selfimprove.domains import check_store, goal_key_for
from selfimprove.reward import (StepsToGoReward, calibrate_threshold, detector_table, discounted_returns, episode_ids,
                                held_firing, reward_model_baseline)
from selfimprove.runlog import MetricsLog, prepare_run, seed_everything, torch_generator, write_json
from selfimprove.train.objectives import policy_update
from selfimprove.train.guard import Guard
from selfimprove.train.sft import MismatchedInstructions, checkpoint_dir, frame_source, sft_checkpoint

log = logging.getLogger(__name__)


def improve_checkpoint(config: RunConfig) -> Path:
    return checkpoint_dir(config) / "improve"


def episodes_dir(config: RunConfig) -> Path:
    return config.run_dir / "improve_episodes"


def reward_model_path(config: RunConfig, sft_path: Path) -> Path:
    """The frozen reward model Stage 2 uses: ``improve.reward_model`` when set (e.g. practising on from
    an SI policy), else the SFT checkpoint it starts from."""
    return Path(config.improve.reward_model) if config.improve.reward_model else Path(sft_path)


HELD_OUT_CACHE = "held_out_d.npz"  # in a run's diagnostics/: d on the held-out demos, shared by diagnose and Stage 2


def demo_steps_to_go(reward: StepsToGoReward, config: RunConfig, cache: Path | None = None) -> dict[str, np.ndarray]:
    """d(o, g) on every frame of the held-out demos, with goal-frame and true-success labels.

    Also each frame's ``frame_index`` and true ``steps_to_go`` (T - t) and each episode's first row
    (``episode_start``), for the diagnostics. With ``cache`` (an ``.npz`` path) the arrays are read
    from there when it was written for the same reward-model weights and held-out split, and
    written there otherwise: the diagnostics and every Stage-2 run from one SFT checkpoint need the
    same pass over the held-out demos.
    """
    store = EpisodeStore(config.dataset_path)
    check_store(store, config.domain)
    _, val_idx = split_episodes(store.num_episodes, config.data.val_fraction, config.data.fraction)
    key = _held_out_key(reward.model, config, val_idx) if cache is not None else ""
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as saved:
                if str(saved["key"]) == key:
                    return {k: saved[k] for k in saved.files if k != "key"}
        except (OSError, ValueError, KeyError, EOFError) as exc:  # unreadable: compute again
            log.warning("ignoring the unreadable held-out cache %s (%s)", cache, exc)
    frames = store.frames(val_idx)
    source = frame_source(frames, reward.spec)
    d = reward.steps_to_go_of(source)
    true = frames.extras.get("info.is_success", frames.is_terminal)
    out = {"d": d, "goal_frame": frames.goal_reached, "true_success": np.asarray(true, dtype=bool),
           "frame_index": frames.frame_index, "steps_to_go": frames.steps_to_go, "episode_start": frames.episode_start}
    # the same frames under an instruction that asks for something else (one per episode, seeded);
    # none when every instruction of the store asks for the same thing (e.g. the point mass)
    keys = goal_key_for(config.domain)
    if len({keys(t) for t in frames.instructions}) >= 2:
        mismatched = MismatchedInstructions(frames.instructions, keys)
        episode_task = frames.task_index[frames.episode_start]
        drawn = mismatched.draw([frames.instructions[t] for t in episode_task], torch.Generator().manual_seed(0))
        lookup = {t: i for i, t in enumerate(frames.instructions)}
        source.task_index = torch.as_tensor(np.repeat([lookup[t] for t in drawn], frames.episode_lengths + 1))
        out["d_mismatched"] = reward.steps_to_go_of(source)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez_compressed(tmp, key=np.array(key), **out)
        tmp.replace(cache)
    return out


def _held_out_key(model: EmbodiedModel, config: RunConfig, val_idx: np.ndarray) -> str:
    """What d on the held-out demos depends on: the model's weights and which frames of which store."""
    h = hashlib.sha256(b"held-out v2: goal frames with hold, d_mismatched")
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    info = config.dataset_path / "meta" / "info.json"
    h.update(str(config.dataset_path.resolve()).encode())
    h.update(info.read_bytes() if info.exists() else b"")
    h.update(np.asarray(val_idx, dtype=np.int64).tobytes())
    return h.hexdigest()


def calibrate_detector(reward_model: EmbodiedModel, config: RunConfig, cache: Path | None = None) -> dict[str, Any]:
    """Choose the success threshold ``s`` on held-out demos (``reward.calibrate_threshold``), or take the
    configured one; with the numbers a report shows beside it."""
    cfg = config.improve
    probe = StepsToGoReward(reward_model, threshold=0.0)
    frames = demo_steps_to_go(probe, config, cache)
    if not reward_model.spec.stg_never and "d_mismatched" in frames:  # a store with several goals
        log.warning("the reward model was trained without mismatched-instruction negatives (sft.negatives = 0): "
                    "its steps-to-go head cannot say 'not on the way', and its detector is known to fire on "
                    "states that are not the goal; retrain Stage 1 with sft.negatives > 0")
    choice = calibrate_threshold(frames, cfg.threshold_rule, cfg.threshold_precision, cfg.success_hold)
    recommended = choice["threshold"]
    fixed = cfg.success_threshold
    return {
        "threshold": float(fixed) if fixed is not None else recommended,
        "recommended": recommended,
        "hold": cfg.success_hold,
        "source": "config" if fixed is not None else f"calibrated on held-out demos ({cfg.threshold_rule} rule)",
        "rule": choice["rule"],
        "table": choice["table"],
        "negatives_trained": bool(reward_model.spec.stg_never),
        "held_out_demos_vs_true_success": detector_table(frames["d"], frames["true_success"]),
        "mismatched_firing_rate": (float(np.mean(held_firing(
            frames["d_mismatched"], episode_ids(frames["episode_start"], len(frames["d"])), recommended,
            cfg.success_hold))) if "d_mismatched" in frames else None),
        "d_goal_frames_mean": float(frames["d"][frames["goal_frame"]].mean()),
        "d_other_frames_mean": float(frames["d"][~frames["goal_frame"]].mean()),
    }


def episode_rewards(episode: Episode, kind: str = "steps_to_go", clip: float = 0.0,
                    d: np.ndarray | None = None) -> np.ndarray:
    """Per-step rewards: ``d(o_t) - d(o_{t+1})`` (clipped to ``[-clip, clip]`` when ``clip > 0``), 1
    everywhere for the constant-reward control, or 1 on the step that first reaches the simulator's success
    for the true-success control. ``d`` defaults to the detector's, ``episode.stg``."""
    if kind == "constant":
        return np.ones(episode.length, dtype=np.float32)
    if kind == "true_success":
        rewards = np.zeros(episode.length, dtype=np.float32)
        reached = np.flatnonzero(np.asarray(episode.info["is_success"])[1:])
        if reached.size:
            rewards[reached[0]] = 1.0
        return rewards
    d = episode.stg if d is None else d
    rewards = StepsToGoReward.reward(d[:-1], d[1:])
    return np.clip(rewards, -clip, clip) if clip > 0 else rewards


def reachable_steps_to_go(episodes: list[Episode], reward: StepsToGoReward) -> list[np.ndarray]:
    """Per episode, ``d`` without the "never" class (``improve.reward_steps = "reachable"``): the frozen
    model's expectation over 0..max_steps on every frame, in one batched pass."""
    source, _ = from_episodes(episodes, reward.spec)
    d = reward.steps_to_go_of(source, reachable=True)
    return np.split(d, np.cumsum([e.length + 1 for e in episodes])[:-1])


def reinforce_batch(episodes: list[Episode], policy: EmbodiedModel, gamma: float, reward: str = "steps_to_go",
                    clip: float = 0.0, baseline: str = "none", baseline_decay: float = 0.9,
                    reward_d: list[np.ndarray] | None = None) -> tuple[FrameSource, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Episodes -> (frame source, acting rows o_0..o_{T-1}, their action tokens, Monte Carlo returns).

    ``baseline = "reward_model"`` subtracts :func:`~selfimprove.reward.reward_model_baseline` from the
    returns of the learned reward (the constant-reward control has no ``d`` to take it from).
    ``reward_d``: per episode, the ``d`` the reward is taken from (default: the detector's ``e.stg``).
    """
    source, acting = from_episodes(episodes, policy.spec)
    tokens = torch.as_tensor(policy.tokenizer.tokenize(np.concatenate([e.actions for e in episodes])))
    parts = []
    for i, e in enumerate(episodes):
        d = e.stg if reward_d is None else reward_d[i]
        returns = discounted_returns(episode_rewards(e, reward, clip, d), gamma)
        if baseline == "reward_model" and reward == "steps_to_go":
            returns = returns - reward_model_baseline(d, baseline_decay)
        parts.append(returns)
    return source, acting, tokens, torch.as_tensor(np.concatenate(parts))


@locks_run
def improve(config: RunConfig, sft_path: str | Path | None = None, resume: bool = False,
            progress: bool = True, sft_eval: dict[str, Any] | None = None,
            final_eval: Path | None = None) -> Path:
    """Run Stage 2 and return the path of the ``improve`` checkpoint (the trained policy).

    With ``improve.eval_every`` set, the learning curve's evaluation points are taken on the way:
    ``sft_eval`` (the SFT checkpoint's evaluation, when the caller has it) is the iteration-0 point
    instead of a new, smaller one; with ``final_eval`` the last point is the full evaluation of the
    final policy (``eval.episodes``), also written there, so the caller need not repeat it.
    """
    cfg = config.improve
    sft_path = Path(sft_path) if sft_path is not None else sft_checkpoint(config)
    latest = improve_checkpoint(config)
    if recover_checkpoint(latest) and not resume:
        raise RunStateError(f"{latest} already exists; pass --resume to continue it or choose another --name")
    prepare_run(config)
    seed_everything(config.seed, config.torch_threads)
    reward_path = reward_model_path(config, sft_path)
    reward_model, _ = load_checkpoint(reward_path, expect_domain=config.domain)
    policy, _ = load_checkpoint(sft_path, expect_domain=config.domain)  # a separate, trainable copy
    reference = None  # the frozen SFT policy of the KL term
    if cfg.kl_coef > 0:
        reference = reward_model if reward_path.resolve() == Path(sft_path).resolve() else \
            load_checkpoint(sft_path, expect_domain=config.domain)[0].eval().requires_grad_(False)
    def make_optimizer(m: EmbodiedModel) -> torch.optim.Optimizer:
        return torch.optim.Adam(m.parameters(), lr=cfg.lr, fused=True)  # fused: one kernel, as in SFT

    optimizer = make_optimizer(policy)
    metrics = MetricsLog.for_run(config)
    start, history = 0, []
    counters = {"robot_episodes": 0, "env_steps": 0, "files_written": 0}
    if resume and latest.exists():
        policy, _ = load_checkpoint(latest, expect_domain=config.domain)
        optimizer = make_optimizer(policy)
        tensors, state = load_train_state(latest)
        restore_optimizer(optimizer, tensors, state)
        start, history, counters = int(state["iteration"]), state["history"], state["counters"]
        detector = state["detector"]
        log.info("resuming stage 2 after iteration %d (%d robot episodes so far)", start, counters["robot_episodes"])
    else:
        detector = calibrate_detector(reward_model, config, config.run_dir / "diagnostics" / HELD_OUT_CACHE)
        if episodes_dir(config).exists():
            truncate_store(episodes_dir(config), 0)
    write_json(config.run_dir / "detector.json", detector)  # strict JSON: NaN -> null
    metrics.keep(lambda r: r.get("stage") != "improve")
    for record in history:
        metrics.append(record)
    oracle = cfg.reward == "true_success"  # the ceiling control: the simulator ends episodes, not the detector
    reward = StepsToGoReward(reward_model, -np.inf if oracle else detector["threshold"], int(detector.get("hold", 1)))
    collected_ahead = _collected_not_trained(config, counters)
    writer = EpisodeWriter(episodes_dir(config), fps=10)
    fleet = make_fleet(config, policy.spec, reward, terminate_on_success=oracle)
    fleet_file = config.run_dir / "fleet.json"
    write_json(fleet_file, fleet.describe())
    # checkpoint selection without true success (train/guard.py): validation boards, frozen model only
    provenance = {"sft": str(sft_path), "threshold": detector["threshold"], "reward_model": str(reward_path)}
    guard = (Guard(config, reward, policy.spec, resume_from=latest if start > 0 else None, provenance=provenance)
             if cfg.guard else None)
    if start == 0 and (cfg.eval_every > 0 or guard is not None):
        record = {"stage": "improve", "iteration": 0, "robot_episodes": 0, "env_steps": 0,
                  **(_eval_point(sft_eval or evaluate(config, sft_path, episodes=cfg.eval_episodes))
                     if cfg.eval_every > 0 else {}),
                  **(guard.check(policy, 0) if guard is not None else {})}
        history.append(record)
        metrics.append(record)
    bar = tqdm(range(start, cfg.iterations), desc="improve", unit="it", disable=not progress,
               initial=start, total=cfg.iterations)

    def collect_args(it: int) -> dict[str, Any]:
        return {"seeds": seed_stream(IMPROVE_SEED_BASE + config.seed * 100_000_000 + it * 100_000),
                "n_steps": cfg.steps_per_iteration, "temperature": cfg.temperature,
                "generator": torch_generator(config.seed, 2, it)}

    # with max_staleness >= 1 a fleet that can collect in the background (Ray) overlaps the next
    # batch with this update; those episodes are one policy version old when trained on
    overlap, prefetched = cfg.max_staleness >= 1 and isinstance(fleet, BackgroundFleet), None

    def budget_spent() -> bool:
        return 0 < cfg.max_robot_episodes <= counters["robot_episodes"]

    try:
        for it in bar:
            if budget_spent():
                log.info("robot-episode budget of %d reached after %d iterations", cfg.max_robot_episodes, it)
                break
            t0 = time.time()
            if collected_ahead is not None:  # collected and saved before the learner stopped: train on it
                episodes, collected_ahead = collected_ahead, None
                log.info("iteration %d: training on the %d episodes collected before the restart", it + 1,
                         len(episodes))
            else:
                if prefetched is not None:  # collected by the previous policy while it was being updated
                    episodes, prefetched = fleet.finish(prefetched), None
                else:
                    episodes = fleet.collect(policy.state_dict(), version=it, **collect_args(it))
                writer.extend(episodes)
                writer.flush()  # on disk (atomically) before the update: a killed learner loses nothing
            t_collect = time.time() - t0
            fresh = [e for e in episodes if it - int(e.meta["policy_version"]) <= cfg.max_staleness]
            if len(fresh) < len(episodes):
                log.info("dropped %d episodes older than %d policy versions", len(episodes) - len(fresh),
                         cfg.max_staleness)
            stopping = it + 1 >= cfg.iterations or 0 < cfg.max_robot_episodes <= counters["robot_episodes"] + len(episodes)
            if overlap and not stopping:  # the robots practise on while the learner trains
                prefetched = fleet.start(policy.state_dict(), version=it, **collect_args(it + 1))
            reward_d = reachable_steps_to_go(fresh, reward) if (
                cfg.reward_steps == "reachable" and cfg.reward == "steps_to_go" and reward.spec.stg_never) else None
            source, acting, tokens, returns = reinforce_batch(fresh, policy, cfg.gamma, cfg.reward, cfg.reward_clip,
                                                              cfg.baseline, cfg.baseline_decay, reward_d)
            update = policy_update(policy, optimizer, source, acting, tokens, returns, config,
                                   torch_generator(config.seed, 3, it), reference)
            t_update = time.time() - t0 - t_collect
            counters["robot_episodes"] += len(episodes)
            counters["env_steps"] += int(sum(e.length for e in episodes))
            counters["files_written"] += 1
            lengths = np.array([e.length for e in episodes])
            record = {
                "stage": "improve", "iteration": it + 1, **{k: counters[k] for k in ("robot_episodes", "env_steps")},
                "batch_episodes": len(episodes), "batch_mean_length": float(lengths.mean()),
                "detected_success_rate": float(np.mean([e.meta["ended_by"] == "detector" for e in episodes])),
                # diagnostics only: how many detector-ended episodes truly succeeded
                "detector_precision": _detector_precision(episodes),
                "mean_return": float(returns.mean()), **update,
                # diagnostics only: the learner above never reads the simulator's success flag
                "batch_true_success_rate": float(np.mean([bool(e.true_success) for e in episodes])),
                "collect_s": round(t_collect, 3), "update_s": round(t_update, 3),
                "stale_dropped": len(episodes) - len(fresh), **practice_stats(episodes),
                "robot_failures": len(fleet.failures),
            }
            last = it + 1 == cfg.iterations or budget_spent()
            if cfg.eval_every > 0 and ((it + 1) % cfg.eval_every == 0 or last):
                tmp = checkpoint_dir(config) / "improve_eval"
                save_checkpoint(policy, tmp, meta={"stage": "improve", "iteration": it + 1})
                if last and final_eval is not None:  # the final policy's full evaluation, once
                    result = {**evaluate(config, tmp), "checkpoint": str(latest)}
                    write_json(final_eval, result)
                else:
                    result = evaluate(config, tmp, episodes=cfg.eval_episodes)
                record.update(_eval_point(result))
            if guard is not None:
                record.update(guard.after_iteration(policy, it + 1, last, episodes))
            history.append(record)
            tensors, opt_meta = optimizer_state_tensors(optimizer)
            save_checkpoint(policy, latest, meta={"stage": "improve", "iteration": it + 1, "seed": config.seed,
                                                  **provenance},
                            train_state=tensors,
                            train_meta={**opt_meta, "iteration": it + 1, "history": history,
                                        "counters": counters, "detector": detector,
                                        **({"guard": guard.state} if guard is not None else {})})
            metrics.append(record)
            bar.set_postfix(len=f"{record['batch_mean_length']:.1f}",
                            det=f"{record['detected_success_rate']:.2f}")
    finally:
        try:
            write_json(fleet_file, fleet.describe())
        except Exception as exc:  # noqa: BLE001 - never mask the error that got us here
            log.warning("could not record the fleet's state in %s: %s", fleet_file, exc)
        fleet.close()
        if guard is not None:
            guard.close()
        shutil.rmtree(checkpoint_dir(config) / "improve_eval", ignore_errors=True)
    if not latest.exists():  # zero iterations: the policy is the SFT policy
        save_checkpoint(policy, latest, meta={"stage": "improve", "iteration": 0, "sft": str(sft_path)})
    return latest


def _collected_not_trained(config: RunConfig, counters: dict[str, int]) -> list[Episode] | None:
    """Episodes a stopped learner had saved but not trained on yet (the batch after the checkpoint)."""
    root = episodes_dir(config)
    if not (root / "meta" / "info.json").exists():
        return None
    store = EpisodeStore(root)
    if store.num_episodes <= counters["robot_episodes"]:
        return None
    truncate_store(root, counters["files_written"] + 1)  # at most one batch can be ahead of the checkpoint
    store = EpisodeStore(root)
    return store.episodes(range(counters["robot_episodes"], store.num_episodes))


def _detector_precision(episodes: list[Episode]) -> float | None:
    ended = [bool(e.true_success) for e in episodes if e.meta["ended_by"] == "detector"]
    return float(np.mean(ended)) if ended else None


def practice_stats(episodes: list[Episode]) -> dict[str, Any]:
    """How episodes began: human resets (interventions) vs boards the robot continued on."""
    starts = [e.meta.get("start", "episodic") for e in episodes]
    return {"interventions": sum(s == "reset" for s in starts), "setups": sum(s == "setup" for s in starts),
            "continued": sum(s == "continued" for s in starts)}


def make_fleet(config: RunConfig, spec: ModelSpec, reward: StepsToGoReward | None,
               terminate_on_success: bool = False) -> Fleet:
    """The configured fleet backend for Stage 2 (episodes end on the detector, not on the simulator's
    success, except in the true-success control)."""
    f = config.fleet

    def env_factory():
        return make_env(config, terminate_on_success=terminate_on_success)

    if f.backend == "ray":
        from selfimprove.fleet.ray import RayFleet

        return RayFleet(env_factory, spec, f.robots, reward, robots_per_actor=f.robots_per_actor, address=f.address,
                        bind_host=f.bind_host, timeout_s=f.timeout_s, max_restarts=f.max_restarts,
                        reset_free=f.reset_free, reset_every=f.reset_every)
    return LocalFleet(env_factory, spec, f.robots, reward, reset_free=f.reset_free, reset_every=f.reset_every)


def _eval_point(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's fields in a learning-curve record."""
    return {"eval_success_rate": result["success_rate"], "eval_ci95": result["ci95"],
            "eval_mean_length": result["mean_episode_length"], "eval_episodes": result["eval_episodes"]}
