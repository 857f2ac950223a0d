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

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from selfimprove.config import RunConfig
from selfimprove.data.episode import Episode
from selfimprove.data.store import EpisodeStore, EpisodeWriter, has_store, truncate_store
from selfimprove.domain_table import GOAL_DISTANCE
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
from selfimprove.reward import (HELD_OUT_CACHE, StepsToGoReward, calibrate_detector, discounted_returns,
                                load_ensemble, reachable_steps_to_go, reward_model_baseline)
from selfimprove.rundir import RunDir
from selfimprove.runlog import MetricsLog, prepare_run, seed_everything, torch_generator, write_json
from selfimprove.train.critic import ValueBaseline, trunk_features
from selfimprove.train.objectives import adapt_kl_coef, policy_update, update_epochs
from selfimprove.train.guard import Guard
from selfimprove.train.sft import sft_checkpoint

log = logging.getLogger(__name__)


#: the controls that read the simulator: the simulator ends their episodes, never the detector
ORACLE_REWARDS = ("true_success", "true_progress")
LEARNED_SHAPED_REWARDS = ("steps_to_go", "steps_to_go_and_success")  # the rewards read from d


def improve_checkpoint(config: RunConfig) -> Path:
    return RunDir(config.run_dir).improve_checkpoint


def episodes_dir(config: RunConfig) -> Path:
    return RunDir(config.run_dir).improve_episodes


def reward_model_path(config: RunConfig, sft_path: Path) -> Path:
    """The frozen reward model Stage 2 uses: ``improve.reward_model`` when set (e.g. practising on from
    an SI policy), else the SFT checkpoint it starts from."""
    return Path(config.improve.reward_model) if config.improve.reward_model else Path(sft_path)


def episode_rewards(episode: Episode, kind: str = "steps_to_go", clip: float = 0.0,
                    d: np.ndarray | None = None) -> np.ndarray:
    """Per-step rewards: ``d(o_t) - d(o_{t+1})`` (clipped to ``[-clip, clip]`` when ``clip > 0``), 1
    everywhere for the constant-reward control, 1 on the step where the frozen detector ended the episode
    (``"detected_success"``: the learned reward without its per-step shaping), or 1 on the step that first reaches the simulator's success
    for the true-success control; the true-progress control adds ``(g_t - g_{t+1}) / g_0`` for the
    simulator's distance ``g`` left to the goal (:data:`GOAL_DISTANCE`), so an episode's total is its
    fraction of the way covered plus 1 on success. ``"steps_to_go_and_success"`` is that shape read from
    the frozen model: ``(d_t - d_{t+1}) / d_0`` plus 1 on the step where the detector ended the episode.
    ``d`` defaults to the detector's, ``episode.stg``."""
    if kind == "constant":
        return np.ones(episode.length, dtype=np.float32)
    if kind == "detected_success":
        rewards = np.zeros(episode.length, dtype=np.float32)
        if episode.length and episode.meta.get("ended_by") == "detector":
            rewards[-1] = 1.0
        return rewards
    if kind in ORACLE_REWARDS:
        rewards = np.zeros(episode.length, dtype=np.float32)
        reached = np.flatnonzero(np.asarray(episode.info["is_success"])[1:])
        if reached.size:
            rewards[reached[0]] = 1.0
        if kind == "true_progress":
            if GOAL_DISTANCE not in episode.info:
                raise ValueError(f"the true-progress reward needs info[{GOAL_DISTANCE!r}] per frame; this episode "
                                 f"has {sorted(episode.info)}")
            g = np.asarray(episode.info[GOAL_DISTANCE], dtype=np.float64)
            rewards += ((g[:-1] - g[1:]) / max(float(g[0]), 1e-6)).astype(np.float32)
        return rewards
    d = episode.stg if d is None else d
    rewards = StepsToGoReward.reward(d[:-1], d[1:])
    if kind == "steps_to_go_and_success":  # the fraction of d_0 covered: no clip needed
        rewards = rewards / max(float(d[0]), 1.0)
        if episode.length and episode.meta.get("ended_by") == "detector":
            rewards[-1] += 1.0
        return rewards
    return np.clip(rewards, -clip, clip) if clip > 0 else rewards


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
        if baseline == "reward_model" and reward in LEARNED_SHAPED_REWARDS:
            returns = returns - reward_model_baseline(d, baseline_decay)
        parts.append(returns)
    return source, acting, tokens, torch.as_tensor(np.concatenate(parts))


def group_advantages(episodes: list[Episode], reward: str = "steps_to_go", clip: float = 0.0,
                     reward_d: list[np.ndarray] | None = None) -> tuple[list[int], np.ndarray]:
    """Leave-one-out advantages of attempts at the same start board (``improve.advantage = "group"``).

    An episode's score is its total (undiscounted) reward: 1 or 0 for the true-success control; for the
    learned reward ``d(o_0) - d(o_T)``, where ``d(o_0)`` is the same for every attempt at a board, so
    the attempts are ranked by how close to the goal they ended. Each attempt's advantage is its score
    minus the mean of the other attempts at the same board (the episode's ``seed``). Boards with a
    single attempt, or whose attempts all scored the same, teach nothing and are dropped. Returns the
    indices of the kept episodes and their advantages.
    """
    scores = np.array([float(episode_rewards(e, reward, clip, None if reward_d is None else reward_d[i]).sum())
                       for i, e in enumerate(episodes)])
    boards: dict[int, list[int]] = {}
    for i, e in enumerate(episodes):
        boards.setdefault(int(e.meta["seed"]), []).append(i)
    kept, adv = [], []
    for members in boards.values():
        s = scores[members]
        if len(members) < 2 or np.all(s == s[0]):
            continue
        others = (s.sum() - s) / (len(s) - 1)
        kept += members
        adv += list(s - others)
    order = np.argsort(kept, kind="stable")
    return [kept[i] for i in order], np.asarray(adv, dtype=np.float32)[order]


def episode_weights(lengths: np.ndarray, kind: str) -> np.ndarray:
    """Per-frame weight of each episode's advantage (``improve.group_weighting``).

    ``"frame"``: every frame counts once, so a 200-step failure outweighs a 60-step success of the
    same board; ``"episode"``: each episode's frames share one episode's weight (``mean length /
    length``), so the attempts at a board balance as their leave-one-out advantages do (zero sum).
    """
    lengths = np.asarray(lengths, dtype=np.float32)
    if kind == "frame":
        return np.ones_like(lengths)
    if kind == "episode":
        return lengths.mean() / lengths
    raise ValueError(f"unknown group weighting {kind!r}; use 'frame' or 'episode'")


def fleet_features(episodes: list[Episode]) -> torch.Tensor | None:
    """The fleet's fusion inputs of the acting frames (o_0 .. o_{T-1} of each episode, in order),
    or None unless every episode carries them (:attr:`Episode.fused`)."""
    if not episodes or any(e.fused is None for e in episodes):
        return None
    return torch.as_tensor(np.concatenate([e.fused[:-1] for e in episodes]))


def practice_seeds(seed: int, it: int, boards: int = 0) -> Iterator[int]:
    """The start boards of iteration ``it``: fresh ones (``boards = 0``), or a cycle over ``boards``
    fixed boards (seeds ``base .. base + boards - 1`` of :func:`practice_board_base`), each iteration
    starting 7 boards further on: practice on a fixed set of scenes, which tells a learner that cannot
    learn from one that learns what does not carry over to new boards."""
    base = practice_board_base(seed)
    if boards <= 0:
        yield from seed_stream(base + it * 100_000)
        return
    j = it * 7
    while True:
        yield base + j % boards
        j += 1


def practice_board_base(seed: int) -> int:
    """The first practice seed of run seed ``seed`` (``eval.seed`` set to it evaluates on the fixed boards)."""
    return IMPROVE_SEED_BASE + seed * 100_000_000


def grouped(seeds: Iterator[int], size: int) -> Iterator[int]:
    """Each seed of ``seeds`` ``size`` times in a row: that many attempts at each start board."""
    for seed in seeds:
        for _ in range(size):
            yield seed


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
    run = Stage2(config, sft_path, resume)
    try:
        run.first_point(sft_eval)
        for it in run.iterations(progress):
            if run.budget_spent():
                log.info("robot-episode budget of %d reached after %d iterations",
                         config.improve.max_robot_episodes, it)
                break
            t0 = time.time()
            episodes = run.collect(it)  # saved before the update: a killed learner loses nothing
            t_collect = time.time() - t0
            fresh = run.fresh(episodes, it)
            run.collect_ahead(it, len(episodes))  # the robots practise on while the learner trains
            update = run.update(fresh, it)  # rewards, returns and the policy-gradient steps
            record = run.record(it, episodes, fresh, update, t_collect, time.time() - t0 - t_collect)
            run.evaluate(record, it, episodes, final_eval)  # true success (diagnostic) and the guard
            run.checkpoint(record, it)
    finally:
        run.close()
    return run.result()


class Stage2:
    """The state of one Stage-2 run and its named steps; :func:`improve` is the loop over them.

    Loading builds the trainable policy, the frozen reward model (and the KL term's frozen SFT
    policy), the optimiser, the detector (calibrated, or restored with the rest on ``resume``), the
    fleet and the guard. Every iteration is checkpointed with what continues it bit for bit.
    """

    def __init__(self, config: RunConfig, sft_path: str | Path | None, resume: bool) -> None:
        self.config, cfg = config, config.improve
        self.sft_path = Path(sft_path) if sft_path is not None else sft_checkpoint(config)
        self.files = RunDir(config.run_dir)
        self.latest = self.files.improve_checkpoint
        if recover_checkpoint(self.latest) and not resume:
            raise RunStateError(f"{self.latest} already exists; pass --resume to continue it or choose another --name")
        prepare_run(config)
        seed_everything(config.seed, config.torch_threads)
        reward_path = reward_model_path(config, self.sft_path)
        reward_model, _ = load_checkpoint(reward_path, expect_domain=config.domain)
        ensemble = load_ensemble(cfg.reward_ensemble, reward_model)  # refused here, before any work, if unfit
        self.policy, _ = load_checkpoint(self.sft_path, expect_domain=config.domain)  # a separate, trainable copy
        self.reference = None  # the frozen SFT policy of the KL term
        if cfg.kl_coef > 0:
            self.reference = reward_model if reward_path.resolve() == self.sft_path.resolve() else \
                load_checkpoint(self.sft_path, expect_domain=config.domain)[0].eval().requires_grad_(False)
        self.optimizer = self._optimizer()
        self.metrics = MetricsLog.for_run(config)
        self.start, self.history = 0, []
        self.counters = {"robot_episodes": 0, "env_steps": 0, "files_written": 0}
        self.kl_coef = cfg.kl_coef  # adapted per batch when improve.kl_target > 0
        # advantage "gae": a critic on the frozen reward model's trunk features (train/critic.py)
        self.value = ValueBaseline(reward_model.encoder.out_dim, cfg, config.seed) if cfg.advantage == "gae" else None
        if resume and self.latest.exists():
            self.policy, _ = load_checkpoint(self.latest, expect_domain=config.domain)
            self.optimizer = self._optimizer()
            tensors, state = load_train_state(self.latest)
            restore_optimizer(self.optimizer, tensors, state)
            self.start, self.history, self.counters = int(state["iteration"]), state["history"], state["counters"]
            self.kl_coef = float(state.get("kl_coef", cfg.kl_coef))
            if self.value is not None:
                if "critic_opt" not in state:
                    raise RunStateError(f"{self.latest} was made without improve.advantage = 'gae' (no critic to "
                                        "resume); resume it with the advantage it was started with")
                self.value.load(tensors, state["critic_opt"])
            self.detector = state["detector"]
            log.info("resuming stage 2 after iteration %d (%d robot episodes so far)", self.start,
                     self.counters["robot_episodes"])
        else:
            self.detector = calibrate_detector(reward_model, config, self.files.diagnostics / HELD_OUT_CACHE, ensemble)
            if self.files.improve_episodes.exists():
                truncate_store(self.files.improve_episodes, 0)
        write_json(self.files.detector, self.detector)  # strict JSON: NaN -> null
        self.metrics.keep(lambda r: r.get("stage") != "improve")
        for record in self.history:
            self.metrics.append(record)
        oracle = cfg.reward in ORACLE_REWARDS  # the ceiling controls: the simulator ends episodes, not the detector
        self.reward = StepsToGoReward(reward_model, -np.inf if oracle else self.detector["threshold"],
                                      int(self.detector.get("hold", 1)), ensemble,
                                      self.detector.get("detector", "steps_to_go"))
        self.ahead = _collected_not_trained(config, self.counters)
        self.writer = EpisodeWriter(self.files.improve_episodes, fps=10)
        self.fleet = make_fleet(config, self.policy.spec, self.reward, terminate_on_success=oracle)
        self.fleet_file = self.files.fleet
        write_json(self.fleet_file, self.fleet.describe())
        # checkpoint selection without true success (train/guard.py): validation boards, frozen model only
        self.provenance = {"sft": str(self.sft_path), "threshold": self.detector["threshold"],
                           "reward_model": str(reward_path), **({"reward_ensemble": list(cfg.reward_ensemble)}
                                                                 if cfg.reward_ensemble else {})}
        self.guard = (Guard(config, self.reward, self.policy.spec, provenance=self.provenance,
                            resume_from=self.latest if self.start > 0 else None) if cfg.guard else None)
        # with max_staleness >= 1 a fleet that can collect in the background (Ray) overlaps the next
        # batch with this update; those episodes are one policy version old when trained on
        self.overlap = cfg.max_staleness >= 1 and isinstance(self.fleet, BackgroundFleet)
        self.prefetched = None
        self.bar = None

    def _optimizer(self) -> torch.optim.Optimizer:
        params = list(self.policy.parameters())
        if self.config.improve.train == "fusion":  # the rest stays at SFT (and shared with the reference)
            trained = {id(p) for p in self.policy.fusion_parameters()}
            for p in params:
                p.requires_grad_(id(p) in trained)
            params = [p for p in params if id(p) in trained]
        return torch.optim.Adam(params, lr=self.config.improve.lr, fused=True)  # as in SFT

    def _collect_args(self, it: int) -> dict[str, Any]:
        cfg, seed = self.config.improve, self.config.seed
        return {"seeds": grouped(practice_seeds(seed, it, cfg.practice_boards), cfg.group_size),
                "n_steps": cfg.steps_per_iteration, "temperature": cfg.temperature,
                "generator": torch_generator(seed, 2, it)}

    def budget_spent(self, extra: int = 0) -> bool:
        return 0 < self.config.improve.max_robot_episodes <= self.counters["robot_episodes"] + extra

    def first_point(self, sft_eval: dict[str, Any] | None) -> None:
        """The learning curve's iteration 0: the SFT policy's evaluation and guard score."""
        cfg = self.config.improve
        if self.start > 0 or (cfg.eval_every <= 0 and self.guard is None):
            return
        record = {"stage": "improve", "iteration": 0, "robot_episodes": 0, "env_steps": 0,
                  **(_eval_point(sft_eval or evaluate(self.config, self.sft_path, episodes=cfg.eval_episodes))
                     if cfg.eval_every > 0 else {}),
                  **(self.guard.check(self.policy, 0) if self.guard is not None else {})}
        self.history.append(record)
        self.metrics.append(record)

    def iterations(self, progress: bool) -> tqdm:
        n = self.config.improve.iterations
        self.bar = tqdm(range(self.start, n), desc="improve", unit="it", disable=not progress,
                        initial=self.start, total=n)
        return self.bar

    def collect(self, it: int) -> list[Episode]:
        """This iteration's batch: saved before a restart, collected ahead, or collected now; on disk
        (atomically) before the update."""
        if self.ahead is not None:  # collected and saved before the learner stopped: train on it
            episodes, self.ahead = self.ahead, None
            log.info("iteration %d: training on the %d episodes collected before the restart", it + 1, len(episodes))
            return episodes
        if self.prefetched is not None:  # collected by the previous policy while it was being updated
            episodes, self.prefetched = self.fleet.finish(self.prefetched), None
        else:
            episodes = self.fleet.collect(self.policy.state_dict(), version=it, **self._collect_args(it))
        self.writer.extend(episodes)
        self.writer.flush()
        return episodes

    def fresh(self, episodes: list[Episode], it: int) -> list[Episode]:
        """The episodes at most ``improve.max_staleness`` policy versions old."""
        lag = self.config.improve.max_staleness
        fresh = [e for e in episodes if it - int(e.meta["policy_version"]) <= lag]
        if len(fresh) < len(episodes):
            log.info("dropped %d episodes older than %d policy versions", len(episodes) - len(fresh), lag)
        return fresh

    def collect_ahead(self, it: int, batch: int) -> None:
        """With overlap, start the next batch with the current policy unless this is the last one."""
        stopping = it + 1 >= self.config.improve.iterations or self.budget_spent(batch)
        if self.overlap and not stopping:
            self.prefetched = self.fleet.start(self.policy.state_dict(), version=it, **self._collect_args(it + 1))

    def update(self, fresh: list[Episode], it: int) -> dict[str, Any]:
        """Rewards and returns of the batch, then the policy-gradient steps (train/objectives.py)."""
        cfg = self.config.improve
        reward_d = reachable_steps_to_go(fresh, self.reward) if (
            cfg.reward_steps == "reachable" and cfg.reward in LEARNED_SHAPED_REWARDS and self.reward.spec.stg_never) else None
        extra: dict[str, Any] = {}
        if cfg.advantage == "group":
            kept, adv = group_advantages(fresh, cfg.reward, cfg.reward_clip, reward_d)
            extra = {"group_kept_episodes": len(kept)}
            if not kept:  # every board's attempts scored alike: nothing to learn from this batch
                return {"mean_return": 0.0, "updates": 0, "kl_coef": self.kl_coef, **extra}
            fresh = [fresh[i] for i in kept]
            lengths = np.array([e.length for e in fresh])
            returns = torch.as_tensor(np.repeat(adv * episode_weights(lengths, cfg.group_weighting), lengths))
            source, acting, tokens, _ = reinforce_batch(fresh, self.policy, cfg.gamma, cfg.reward, cfg.reward_clip)
        elif cfg.advantage == "gae":
            source, acting, tokens, _ = reinforce_batch(fresh, self.policy, cfg.gamma, cfg.reward, cfg.reward_clip,
                                                        reward_d=reward_d)
            rewards = [episode_rewards(e, cfg.reward, cfg.reward_clip, None if reward_d is None else reward_d[i])
                       for i, e in enumerate(fresh)]
            returns, targets, features = self.value.advantages(trunk_features(self.reward.model, fresh),
                                                               fresh, rewards)
            extra = self.value.fit(features, targets, torch_generator(self.config.seed, 4, it), update_epochs(cfg),
                                   cfg.minibatch_size)
        else:
            source, acting, tokens, returns = reinforce_batch(fresh, self.policy, cfg.gamma, cfg.reward,
                                                              cfg.reward_clip, cfg.baseline, cfg.baseline_decay,
                                                              reward_d)
        fused = fleet_features(fresh) if cfg.train == "fusion" else None
        update = policy_update(self.policy, self.optimizer, source, acting, tokens, returns, self.config,
                               torch_generator(self.config.seed, 3, it), self.reference, self.kl_coef, fused)
        used, self.kl_coef = self.kl_coef, adapt_kl_coef(self.kl_coef, update.get("kl_ref"), cfg.kl_target)
        return {"mean_return": float(returns.mean()), **update, **extra,
                **({"kl_coef": used} if cfg.kl_coef > 0 else {})}

    def record(self, it: int, episodes: list[Episode], fresh: list[Episode], update: dict[str, Any],
               t_collect: float, t_update: float) -> dict[str, Any]:
        """Count the batch in and describe it (the simulator's success only as a diagnostic)."""
        self.counters["robot_episodes"] += len(episodes)
        self.counters["env_steps"] += int(sum(e.length for e in episodes))
        self.counters["files_written"] += 1
        lengths = np.array([e.length for e in episodes])
        return {
            "stage": "improve", "iteration": it + 1,
            **{k: self.counters[k] for k in ("robot_episodes", "env_steps")},
            "batch_episodes": len(episodes), "batch_mean_length": float(lengths.mean()),
            "detected_success_rate": float(np.mean([e.meta["ended_by"] == "detector" for e in episodes])),
            # diagnostics only: how many detector-ended episodes truly succeeded
            "detector_precision": _detector_precision(episodes),
            **update,
            # diagnostics only: the learner above never reads the simulator's success flag
            "batch_true_success_rate": float(np.mean([bool(e.true_success) for e in episodes])),
            "collect_s": round(t_collect, 3), "update_s": round(t_update, 3),
            "stale_dropped": len(episodes) - len(fresh), **practice_stats(episodes),
            "robot_failures": len(self.fleet.failures),
        }

    def evaluate(self, record: dict[str, Any], it: int, episodes: list[Episode], final_eval: Path | None) -> None:
        """The learning curve's eval point (true success on the eval seeds, diagnostic only) every
        ``eval_every`` iterations and at the last, and the guard's check."""
        cfg = self.config.improve
        last = it + 1 == cfg.iterations or self.budget_spent()
        if cfg.eval_every > 0 and ((it + 1) % cfg.eval_every == 0 or last):
            tmp = self.files.improve_eval_checkpoint
            save_checkpoint(self.policy, tmp, meta={"stage": "improve", "iteration": it + 1},
                            precision=self.config.precision)
            if last and final_eval is not None:  # the final policy's full evaluation, once
                result = {**evaluate(self.config, tmp), "checkpoint": str(self.latest)}
                write_json(final_eval, result)
            else:
                result = evaluate(self.config, tmp, episodes=cfg.eval_episodes)
            record.update(_eval_point(result))
        if self.guard is not None:
            record.update(self.guard.after_iteration(self.policy, it + 1, last, episodes))

    def checkpoint(self, record: dict[str, Any], it: int) -> None:
        """Save the policy with everything that continues the run, then log the record."""
        self.history.append(record)
        tensors, opt_meta = optimizer_state_tensors(self.optimizer)
        critic: dict[str, Any] = {}
        if self.value is not None:
            value_tensors, critic["critic_opt"] = self.value.state()
            tensors = {**tensors, **value_tensors}
        save_checkpoint(self.policy, self.latest,
                        meta={"stage": "improve", "iteration": it + 1, "seed": self.config.seed, **self.provenance},
                        train_state=tensors,
                        train_meta={**opt_meta, "iteration": it + 1, "history": self.history,
                                    "counters": self.counters, "detector": self.detector, "kl_coef": self.kl_coef, **critic,
                                    **({"guard": self.guard.state} if self.guard is not None else {})},
                        precision=self.config.precision)
        self.metrics.append(record)
        self.bar.set_postfix(len=f"{record['batch_mean_length']:.1f}", det=f"{record['detected_success_rate']:.2f}")

    def close(self) -> None:
        try:
            write_json(self.fleet_file, self.fleet.describe())
        except Exception as exc:  # noqa: BLE001 - never mask the error that got us here
            log.warning("could not record the fleet's state in %s: %s", self.fleet_file, exc)
        self.fleet.close()
        if self.guard is not None:
            self.guard.close()
        shutil.rmtree(self.files.improve_eval_checkpoint, ignore_errors=True)

    def result(self) -> Path:
        """The ``improve`` checkpoint (after zero iterations: the SFT policy, saved there)."""
        if not self.latest.exists():
            save_checkpoint(self.policy, self.latest, meta={"stage": "improve", "iteration": 0, "sft": str(self.sft_path)},
                            precision=self.config.precision)
        return self.latest


def _collected_not_trained(config: RunConfig, counters: dict[str, int]) -> list[Episode] | None:
    """Episodes a stopped learner had saved but not trained on yet (the batch after the checkpoint)."""
    root = episodes_dir(config)
    if not has_store(root):
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
    success, except in the ceiling controls; the true-progress one also records the goal distance)."""
    f = config.fleet
    record = (GOAL_DISTANCE,) if config.improve.reward == "true_progress" else ()

    def env_factory():
        return make_env(config, terminate_on_success=terminate_on_success)

    if f.backend == "ray":
        from selfimprove.fleet.ray import RayFleet

        return RayFleet(env_factory, spec, f.robots, reward, robots_per_actor=f.robots_per_actor, address=f.address,
                        bind_host=f.bind_host, timeout_s=f.timeout_s, max_restarts=f.max_restarts,
                        reset_free=f.reset_free, reset_every=f.reset_every, record_info=record)
    return LocalFleet(env_factory, spec, f.robots, reward, reset_free=f.reset_free, reset_every=f.reset_every,
                      record_info=record)


def _eval_point(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's fields in a learning-curve record."""
    return {"eval_success_rate": result["success_rate"], "eval_ci95": result["ci95"],
            "eval_mean_length": result["mean_episode_length"], "eval_episodes": result["eval_episodes"]}
