"""Demonstration collection: run the scripted expert and write successful episodes to a store."""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from selfimprove.config import RunConfig
from selfimprove.data.episode import Episode
from selfimprove.data.store import EpisodeWriter, read_info
from selfimprove.data.v3 import INFO_PATH
from selfimprove.domains import DEMO_SEED_BASE, expert_for, instruction_of, make_env, observation_dict
from selfimprove.folders import ensure_empty, publish, staging_folder
from selfimprove.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)


def demo_env(config: RunConfig):
    """The env demos are rolled out in: it does not end on success when the demos hold the goal."""
    return make_env(config, **({"terminate_on_success": False} if config.data.hold_steps else {}))


def demo_episode(config: RunConfig, seed: int, env=None, expert=None) -> Episode:
    """Roll out the expert once from the board of ``seed`` (which fixes both board and expert noise).

    With ``data.hold_steps`` the demo goes on that many still steps (the expert's ``hold(env)`` action
    where it has one, e.g. joint targets where the joints are; else zero actions) past the first
    success, so the goal is seen on several frames; a demo that cannot finish its hold within the
    time limit counts as failed (it is re-drawn).
    """
    hold = int(config.data.hold_steps)
    env = env or demo_env(config)
    expert = expert or expert_for(config)
    intended = config.data.expert_labels == "intended"
    obs, info = env.reset(seed=seed)
    expert.reset(env, np.random.default_rng([seed, 1]))
    observations = [observation_dict(obs)]
    success_flags = [bool(info.get("is_success", False))]
    actions, executed = [], []  # the labels, and (with intended labels) what moved the board
    instruction = instruction_of(obs, info, env)
    held = -1  # steps held since the first success (-1: not reached yet)
    while True:
        if held >= 0:
            hold_action = getattr(expert, "hold", None)
            action = (np.asarray(hold_action(env), dtype=np.float32) if hold_action is not None
                      else np.zeros(env.action_space.shape, dtype=np.float32))
            label = action
        else:
            action = np.asarray(expert.act(env), dtype=np.float32)
            label = np.asarray(expert.intended, dtype=np.float32) if intended else action
        obs, _, terminated, truncated, info = env.step(action)
        actions.append(label)
        executed.append(action)
        observations.append(observation_dict(obs))
        success_flags.append(bool(info.get("is_success", False)))
        if held >= 0 or (hold and success_flags[-1]):
            held += 1
        if held >= hold or terminated or truncated:
            break
    if hold and held < hold:
        success_flags[-1] = False  # the hold did not fit in the time limit: re-drawn
    return Episode(
        observations={k: np.stack([o[k] for o in observations]) for k in observations[0]},
        actions=np.stack(actions),
        instruction=str(instruction),
        true_success=success_flags[-1],
        meta={"seed": seed, "source": "expert", "ended_by": "success" if success_flags[-1] else "timeout"},
        info={"is_success": np.asarray(success_flags),
              # per frame, as every info column: the last frame's is zero, like its action
              **({"executed_action": np.concatenate([np.stack(executed), np.zeros_like(executed[:1])])}
                 if intended else {})},
    )


CHUNK = 64  # seeds per task: small enough that demos are written as they come


def _demo_worker(args: tuple[RunConfig, list[int]]) -> list[Episode]:
    config, seeds = args
    env, expert = demo_env(config), expert_for(config)
    return [demo_episode(config, s, env, expert) for s in seeds]


def collect_demos(config: RunConfig, out: str | Path | None = None, episodes: int | None = None,
                  workers: int | None = None, progress: bool = True) -> Path:
    """Write ``episodes`` successful expert demos to ``out``; failed attempts are re-drawn.

    Refuses to write into an existing store so nothing collected earlier is overwritten.
    """
    out = Path(out) if out is not None else config.dataset_path
    n = int(episodes if episodes is not None else config.data.episodes)
    workers = int(workers or config.data.collect_workers)
    if (out / INFO_PATH).exists():
        info = read_info(out)
        raise DatasetError(f"{out} already holds a dataset of {info['total_episodes']} episodes; "
                           "choose another --out or delete it first (nothing was changed)")
    ensure_empty(out, "demos", "Choose another --out (or data.path), or move its files away first", DatasetError)
    seed_base = DEMO_SEED_BASE + config.seed * 100_000
    demo_env(config).close()  # an env that cannot be made (a bad MUJOCO_GL, a missing extra) fails before any write
    if config.data.expert_labels == "intended" and not hasattr(expert_for(config), "intended"):
        raise ConfigError(f"data.expert_labels = 'intended': the {config.domain} expert does not tell the action it "
                          "meant apart from the one it sent; use 'executed' (nothing was written)")
    # built beside ``out`` and renamed into place when complete: a killed collection leaves no half store
    staging = staging_folder(out)
    writer = EpisodeWriter(staging, fps=10, flush_every=1000, hold_steps=config.data.hold_steps,
                           expert_labels=config.data.expert_labels)
    next_seed, kept, failed = seed_base, 0, 0
    bar = tqdm(total=n, desc=f"collect {out.name}", unit="ep", disable=not progress)
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        while kept < n:
            need = n - kept
            block = max(need + need // 20 + 1, 8)
            seeds = list(range(next_seed, next_seed + block))
            next_seed += block
            # in chunks, in seed order: demos reach the store (and the bar) as they are made, memory holds
            # one chunk per worker, and seeds past the last demo needed are never played
            per = CHUNK if pool is None else max(1, min(CHUNK, -(-len(seeds) // (workers * 4))))
            tasks = [(config, seeds[i:i + per]) for i in range(0, len(seeds), per)]
            for part in (map(_demo_worker, tasks) if pool is None else pool.imap(_demo_worker, tasks)):
                for episode in part:
                    if kept >= n:
                        break
                    if not episode.true_success:
                        failed += 1
                        continue
                    writer.add(episode)
                    kept += 1
                    bar.update(1)
                if kept >= n:
                    break
        writer.close()
        publish(staging, out)
    except Exception:  # an error, not a kill: no half store is left for the next attempt to replace
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # chunks still running are past the last demo needed
    if failed:
        log.info("expert failed %d of %d attempts; those boards were re-drawn", failed, kept + failed)
    return out
