"""In-process fleet: N robots (gymnasium envs) stepped in lock-step with batched inference.

The default backend: no servers, deterministic for a given seed stream and torch generator.
Policy inference and the frozen reward model's ``d(o, g)`` are one batched forward pass each per
control step across all robots that are still running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import gymnasium as gym
import numpy as np
import torch

from selfimprove.data.episode import Episode
from selfimprove.domains import continue_on_board, instruction_of, observation_dict
from selfimprove.errors import SelfImproveError
from selfimprove.model.inputs import check_observation_shapes, from_histories
from selfimprove.model.policy import EmbodiedModel, ModelSpec
from selfimprove.reward import StepsToGoReward

log = logging.getLogger(__name__)

MAX_REDRAWS = 100  # start boards in a row the detector may call solved before we call it broken


class DetectorError(SelfImproveError):
    """The success detector fires on (almost) every board: the threshold or reward model is wrong."""


@dataclass
class _Slot:
    """One robot's episode in progress."""

    seed: int = -1
    instruction: str = ""
    observations: list[dict[str, np.ndarray]] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    success: list[bool] = field(default_factory=list)
    stg: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)  # the detector's score (stg itself for the "steps_to_go" detector)
    active: bool = False
    start: str = "episodic"
    reset_reason: str | None = None
    recorded: dict[str, list] = field(default_factory=dict)  # extra info keys, per frame (diagnostics)
    fused: list[torch.Tensor] = field(default_factory=list)  # each observation's fusion inputs, when shared


class LocalFleet:
    """``n_robots`` envs in this process. With ``reward`` set, episodes end when the detector fires
    (``d <= s`` on ``reward.hold`` consecutive observations); the reward model reads its own inputs
    (``reward.spec``), which may differ from the policy's.

    ``reset_free``: after an episode the robot keeps its board and draws a new valid task; the
    board is reset (a human intervention) only when it is unusable, admits no task, or every
    ``reset_every`` episodes. Each episode's ``meta["start"]`` says how it began: "setup" (the
    robot's first board), "reset" (an intervention, with ``meta["reset_reason"]``), "continued", or
    "episodic" (every episode on a fresh board, the default).
    """

    def __init__(self, make_env: Callable[[], gym.Env], spec: ModelSpec, n_robots: int,
                 reward: StepsToGoReward | None = None, reset_free: bool = False, reset_every: int = 0,
                 robot_offset: int = 0, record_info: tuple[str, ...] = ()) -> None:
        if n_robots < 1:
            raise ValueError("a fleet needs at least one robot")
        self.envs = [make_env() for _ in range(n_robots)]
        obs, _ = self.envs[0].reset(seed=0)
        check_observation_shapes(spec, {k: list(v.shape) for k, v in observation_dict(obs).items()},
                                 "the environment", "make the env config match the checkpoint "
                                 "(e.g. env.kwargs.image_size)")
        self.policy = EmbodiedModel(spec).eval()
        for p in self.policy.parameters():
            p.requires_grad_(False)
        self.reward = reward
        self.version: int | None = None
        self.spec = spec
        self.reset_free, self.reset_every = reset_free, reset_every
        self.robot_offset = robot_offset  # robot ids in episode meta are offset + index
        self.record_info = tuple(record_info)  # info keys kept per frame in Episode.info (diagnostics only)
        self.skipped_starts = 0  # boards where the detector fired before the first action
        self.failures: list[dict[str, Any]] = []  # in-process robots do not fail separately from the learner
        self._set_up = [False] * n_robots  # reset-free: has this robot's board been set up yet?
        self._since_reset = [0] * n_robots
        self.shared = False  # one conv pass per frame serves the policy and the reward model

    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        if version != self.version:
            self.policy.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
            self.version = version
            self.shared = self.reward is not None and self.policy.shares_fusion_inputs(self.reward.model)

    @torch.no_grad()
    def _fusion_inputs(self, slots: list[_Slot]) -> torch.Tensor:
        return self.policy.fusion_inputs(from_histories([s.observations for s in slots],
                                                        [s.instruction for s in slots], self.spec))

    @torch.no_grad()
    def _act(self, slots: list[_Slot], temperature: float, generator: torch.Generator | None) -> torch.Tensor:
        """Action tokens for the latest observation of each of ``slots``."""
        if self.shared:
            h = self.policy.encoder.fuse(torch.stack([s.fused[-1] for s in slots]))
            return self.policy.action_head.sample(h, temperature, generator)
        obs = from_histories([s.observations for s in slots], [s.instruction for s in slots], self.spec)
        return self.policy.act(obs, temperature, generator)

    def _steps_to_go(self, slots: list[_Slot]) -> tuple[np.ndarray, np.ndarray]:
        """``(d, the detector's score)`` of the latest observation of each of ``slots`` (its fusion inputs
        kept for the next action when shared)."""
        if self.shared:
            z = self._fusion_inputs(slots)
            for k, slot in enumerate(slots):
                if len(slot.observations) == 1:  # a new episode's first observation
                    slot.fused = []
                slot.fused.append(z[k])
            obs = (from_histories([s.observations for s in slots], [s.instruction for s in slots], self.reward.spec)
                   if self.reward.ensemble else None)  # an ensemble's other members read the frames themselves
            return self.reward.read_from_fusion(z, obs)
        return self.reward.read(from_histories([s.observations for s in slots],
                                               [s.instruction for s in slots], self.reward.spec))

    def _board(self, i: int, seed: int) -> tuple[Any, dict[str, Any], str, str | None]:
        """The start of robot ``i``'s next episode: (obs, info, start kind, reset reason)."""
        env = self.envs[i]
        if not self.reset_free:
            return (*env.reset(seed=seed), "episodic", None)
        if not self._set_up[i]:
            self._set_up[i], self._since_reset[i] = True, 0
            return (*env.reset(seed=seed), "setup", None)
        reason = "scheduled" if self.reset_every and self._since_reset[i] >= self.reset_every else None
        if reason is None:
            started = continue_on_board(env, np.random.default_rng(seed))
            if not isinstance(started, str):
                return (*started, "continued", None)
            reason = started
        self._since_reset[i] = 0
        return (*env.reset(seed=seed), "reset", reason)

    def _reset(self, slot: _Slot, i: int, seeds: Iterator[int]) -> None:
        """Start a new episode; boards the detector already calls solved are re-drawn."""
        for _ in range(MAX_REDRAWS):
            slot.seed = int(next(seeds))
            obs, info, slot.start, slot.reset_reason = self._board(i, slot.seed)
            o = observation_dict(obs)
            slot.instruction = instruction_of(obs, info, self.envs[i])
            d0 = score0 = float("nan")
            slot.observations = [o]
            if self.reward is not None:
                d, score = self._steps_to_go([slot])
                d0, score0 = float(d[0]), float(score[0])
                if self.reward.is_success(score0):
                    self.skipped_starts += 1
                    continue
            slot.actions = []
            slot.success, slot.stg, slot.score = [bool(info.get("is_success", False))], [d0], [score0]
            slot.recorded = {k: [np.asarray(info[k])] for k in self.record_info if k in info}
            slot.active = True
            self._since_reset[i] += 1
            return
        raise DetectorError(
            f"the success detector fired on {MAX_REDRAWS} start boards in a row (threshold "
            f"{self.reward.threshold:g}); it is mis-calibrated: lower improve.success_threshold or check the "
            "reward model checkpoint")

    def collect(self, weights: dict[str, torch.Tensor], version: int, *, seeds: Iterator[int],
                n_steps: int | None = None, n_episodes: int | None = None, temperature: float = 1.0,
                generator: torch.Generator | None = None) -> list[Episode]:
        """Collect whole episodes until ``n_episodes`` have been run or ``n_steps`` steps are taken.

        Episodes still running when the step budget fills are finished, not cut, so short
        episodes are not over-represented in the batch.
        """
        if (n_steps is None) == (n_episodes is None):
            raise ValueError("give exactly one of n_steps or n_episodes")
        self.set_weights(weights, version)
        slots = [_Slot() for _ in self.envs]
        started, steps, finished = 0, 0, []

        def may_start() -> bool:
            return started < n_episodes if n_episodes is not None else steps < n_steps

        for i, slot in enumerate(slots):
            if may_start():
                self._reset(slot, i, seeds)
                started += 1
        while True:
            live = [i for i, s in enumerate(slots) if s.active]
            if not live:
                break
            tokens = self._act([slots[i] for i in live], temperature, generator)
            actions = self.policy.tokenizer.detokenize(tokens)
            results = []
            for k, i in enumerate(live):
                o, _, terminated, truncated, info = self.envs[i].step(actions[k])
                results.append((observation_dict(o), terminated, truncated, info))
            steps += len(live)
            for k, i in enumerate(live):
                slots[i].observations.append(results[k][0])
            d_next, score_next = (self._steps_to_go([slots[i] for i in live]) if self.reward is not None
                                  else (np.full(len(live), np.nan, dtype=np.float32),) * 2)
            for k, i in enumerate(live):
                slot = slots[i]
                o, terminated, truncated, info = results[k]
                slot.actions.append(actions[k])
                slot.success.append(bool(info.get("is_success", False)))
                for key, values in slot.recorded.items():
                    values.append(np.asarray(info[key]))
                slot.stg.append(float(d_next[k]))
                slot.score.append(float(score_next[k]))
                detected = self.reward is not None and self.reward.detects(slot.score)
                if detected or terminated or truncated:
                    ended_by = "detector" if detected else ("success" if terminated else "timeout")
                    finished.append(self._episode(slot, i, version, ended_by, temperature))
                    slot.active = False
                    if may_start():
                        self._reset(slot, i, seeds)
                        started += 1
        return finished

    def _episode(self, slot: _Slot, robot: int, version: int, ended_by: str, temperature: float) -> Episode:
        success = np.asarray(slot.success)
        return Episode(
            observations={k: np.stack([o[k] for o in slot.observations]) for k in slot.observations[0]},
            actions=np.stack(slot.actions).astype(np.float32),
            instruction=slot.instruction,
            true_success=bool(success.any()),
            meta={"seed": slot.seed, "robot": self.robot_offset + robot, "policy_version": version,
                  "ended_by": ended_by, "temperature": temperature, "start": slot.start,
                  "reset_reason": slot.reset_reason},
            info={"is_success": success, **{k: np.stack(v) for k, v in slot.recorded.items()}},
            stg=None if self.reward is None else np.asarray(slot.stg, dtype=np.float32),
            detector=(np.asarray(slot.score, dtype=np.float32) if self.reward is not None and self.reward.separate_score
                      else None),
            fused=torch.stack(slot.fused).numpy() if self.shared and len(slot.fused) == len(slot.observations) else None,
        )

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", "robots": len(self.envs), "nodes": 1, "failures": []}

    def close(self) -> None:
        for env in self.envs:
            env.close()


def seed_stream(start: int) -> Iterator[int]:
    """Consecutive integer seeds from ``start``."""
    seed = start
    while True:
        yield seed
        seed += 1

