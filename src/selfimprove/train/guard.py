"""Guarding Self-Improvement against reward hacking, without the simulator's success.

The frozen detector ``d(o, g) <= s`` can fire on states that are not successes, and the policy then
learns to reach them: true success can peak and fall while the detected success stays high. This
module measures, from the frozen reward model alone, how much each detected success can be
trusted, and keeps the policy that scores best on a fixed set of held-out validation boards
(``checkpoints/best``).

Signals at the frame where the detector fired (per episode, :func:`fire_frame_signals`):
- ``d``, ``std``, ``entropy``, ``p_fire``: the frozen steps-to-go distribution there (its mean, spread,
  entropy and the probability mass at or below ``s``);
- ``d_views``: ``d`` of the same frame under the domain's label-preserving view changes (tabletop: the
  left-right mirror and small scene shifts that SFT trains with; point mass: the mirror about y = 0; a
  task of your own: none); a true success survives them more often than a spurious one;
- ``d_policy``: the current policy trunk's own steps-to-go head (it drifts as the trunk is trained).

The guard score is the **view-confirmed detected success**: the mean over validation episodes of
``1[detector ended it] x (fraction of view changes under which d <= s also holds)``; without view
changes it is the plain detected success rate on the validation boards. It was chosen
by measuring every signal above on finished tabletop runs (``bench/guard_signals.py``): view
agreement was the only signal that separated truly successful from spurious firings in every run.

Nothing here reads ``true_success`` or ``info``: episodes are blinded (:func:`blind`) before they
are scored, as on a real robot where the simulator's flag does not exist.
"""

from __future__ import annotations

import filecmp
import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from selfimprove.config import ImproveConfig, RunConfig
from selfimprove.data.episode import Episode
from selfimprove.domains import make_env, views_for
from selfimprove.evaluate import evaluate
from selfimprove.fleet.local import LocalFleet, seed_stream
from selfimprove.model.checkpoint import load_train_state, read_checkpoint_config, recover_checkpoint, save_checkpoint
from selfimprove.model.inputs import from_episodes
from selfimprove.model.policy import EmbodiedModel, ModelSpec
from selfimprove.reward import StepsToGoReward
from selfimprove.rundir import RunDir
from selfimprove.runlog import dumps_json, torch_generator
from selfimprove.stats import spearman

log = logging.getLogger(__name__)

# Validation boards: disjoint from demo seeds (0 + seed * 100_000 + i), eval seeds (eval.seed, 1e6 + i)
# and practice seeds (IMPROVE_SEED_BASE = 2e9 + seed * 1e8 + iteration * 1e5 + i).
GUARD_SEED_BASE = 1_500_000_000
GUARD_SHIFTS = 4  # tabletop: random scene shifts scored beside the mirror


def best_checkpoint(config: RunConfig) -> Path:
    """``checkpoints/best``: the policy with the highest guard score so far."""
    return RunDir(config.run_dir).best_checkpoint


def guard_cadence(cfg: ImproveConfig) -> int:
    """Iterations between guard checks (``guard_every``, else the eval cadence; 0: first and last only)."""
    return cfg.eval_every if cfg.guard_every is None else cfg.guard_every


def blind(episode: Episode) -> Episode:
    """A copy without the simulator's success (``true_success`` and ``info``): what a real robot has."""
    return replace(episode, true_success=None, info={})


def fire_frame_signals(reward: StepsToGoReward, episodes: list[Episode], policy: EmbodiedModel | None = None,
                       views: list[Callable[[dict], dict]] | None = None, batch_size: int = 256
                       ) -> dict[str, np.ndarray]:
    """Per-episode signals at each episode's last frame (where the detector fired, if it did).

    ``detected`` comes from ``meta["ended_by"]``; ``d``, ``std``, ``entropy``, ``p_fire`` from the
    frozen model; ``d_views`` [n, len(views)] is ``d`` under each view change and ``d_policy`` the
    policy's own steps-to-go head (NaN when not given). ``max_drop`` / ``last_drop`` are the largest
    and the last one-step fall of the recorded ``d`` (``episode.stg``). Episodes must be blinded.
    """
    for e in episodes:
        if e.true_success is not None or e.info:
            raise ValueError("fire_frame_signals takes blinded episodes (see guard.blind): the guard must not "
                             "see the simulator's success")
    views = list(views or [])
    n = len(episodes)
    out = {k: np.full(n, np.nan, dtype=np.float64)
           for k in ("d", "std", "entropy", "p_fire", "d_policy", "max_drop", "last_drop")}
    out["d_views"] = np.full((n, len(views)), np.nan, dtype=np.float64)
    out["detected"] = np.array([e.meta.get("ended_by") == "detector" for e in episodes], dtype=bool)
    out["length"] = np.array([e.length for e in episodes], dtype=np.int64)
    for i, e in enumerate(episodes):
        if e.stg is not None and len(e.stg) > 1:
            drops = np.asarray(e.stg[:-1], dtype=np.float64) - np.asarray(e.stg[1:], dtype=np.float64)
            out["max_drop"][i], out["last_drop"][i] = np.nanmax(drops), drops[-1]
    if n == 0:
        return out
    model = reward.model
    values = model.stg_values.double()
    for lo in range(0, n, batch_size):
        chunk = episodes[lo:lo + batch_size]
        source, _ = from_episodes(chunk, model.spec)
        last = torch.as_tensor(np.cumsum([e.length + 1 for e in chunk]) - 1)
        obs = source.obs(last)
        probs = torch.softmax(model.steps_to_go_distribution(obs).double(), -1)
        mean = probs @ values
        sl = slice(lo, lo + len(chunk))
        out["d"][sl] = mean.numpy()
        out["std"][sl] = torch.sqrt((probs * (values[None] - mean[:, None]) ** 2).sum(-1)).numpy()
        out["entropy"][sl] = (-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)).numpy()
        out["p_fire"][sl] = probs[:, values <= reward.threshold].sum(-1).numpy()
        for j, view in enumerate(views):
            out["d_views"][sl, j] = model.expected_steps_to_go(view(obs)).double().numpy()
        if policy is not None:
            out["d_policy"][sl] = policy.expected_steps_to_go(obs).double().numpy()
    return out

def confirmed_detections(signals: dict[str, np.ndarray], threshold: float) -> np.ndarray:
    """Per episode: 1[detector ended it] x the fraction of view changes under which ``d <= s`` too."""
    detected = signals["detected"].astype(np.float64)
    views = signals["d_views"]
    if views.shape[1] == 0:
        return detected
    return detected * (views <= threshold).mean(1)


def score_episodes(reward: StepsToGoReward, episodes: list[Episode], views: list[Callable[[dict], dict]]
                   ) -> dict[str, float]:
    """Guard score of blinded episodes, with its standard error and its parts (no true success)."""
    signals = fire_frame_signals(reward, episodes, views=views)
    confirmed = confirmed_detections(signals, reward.threshold)
    detected = signals["detected"]
    n = len(episodes)
    agreement = (signals["d_views"][detected] <= reward.threshold).mean() if detected.any() and views else float("nan")
    return {"score": float(confirmed.mean()) if n else float("nan"),
            "score_se": float(confirmed.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "detected_rate": float(detected.mean()) if n else float("nan"),
            "view_agreement": float(agreement),
            "mean_length": float(signals["length"].mean()) if n else float("nan")}


class Guard:
    """Scores the policy on fixed validation boards with the frozen reward model; keeps the best.

    The validation episodes run like practice (episodes end when the detector fires or at the time
    limit, never on the simulator's success) on seeds from ``GUARD_SEED_BASE``, the same boards and
    sampling noise at every check, so two policies are compared on equal terms. They count as
    robot episodes and are reported apart from practice. The best policy is saved as
    ``checkpoints/best`` with its iteration and score in its meta; that checkpoint is the source of
    truth on ``--resume``.
    """

    def __init__(self, config: RunConfig, reward: StepsToGoReward, spec: ModelSpec,
                 resume_from: Path | None = None, provenance: dict[str, Any] | None = None) -> None:
        self.config, self.reward, self.spec = config, reward, spec
        self.provenance = dict(provenance or {})  # sft / reward model / threshold: best can seed a later Stage 2
        self.every = guard_cadence(config.improve)
        self.views = views_for(config.domain, GUARD_SHIFTS)
        self.path = best_checkpoint(config)
        self.state: dict[str, Any] = {"checks": 0, "robot_episodes": 0, "env_steps": 0,
                                      "best_iteration": None, "best_score": None}
        self._fleet: LocalFleet | None = None
        if resume_from is None:  # a fresh Stage 2: an old best belongs to an abandoned attempt
            shutil.rmtree(self.path, ignore_errors=True)
            return
        _, train_meta = load_train_state(resume_from)
        self.state.update(train_meta.get("guard") or {})
        if recover_checkpoint(self.path):  # the saved best wins: it may be newer than the resumed state
            meta = read_checkpoint_config(self.path).get("meta", {})
            self.state["best_iteration"], self.state["best_score"] = meta.get("iteration"), meta.get("guard_score")

    def due(self, iteration: int, last: bool) -> bool:
        return iteration == 0 or last or (self.every > 0 and iteration % self.every == 0)

    def practice_signals(self, episodes: list[Episode]) -> dict[str, float]:
        """The guard's signals on a practice batch (tracked per iteration; nothing is collected)."""
        result = score_episodes(self.reward, [blind(e) for e in episodes], self.views)
        return {"confirmed_detected_rate": result["score"], "view_agreement": result["view_agreement"]}

    def check(self, policy: EmbodiedModel, iteration: int) -> dict[str, Any]:
        """Roll out ``policy`` on the validation boards, score it, and keep it if it is the best so far."""
        cfg = self.config.improve
        if self._fleet is None:
            self._fleet = LocalFleet(lambda: make_env(self.config, terminate_on_success=False), self.spec,
                                     min(self.config.fleet.robots, cfg.guard_episodes), self.reward)
        episodes = self._fleet.collect(policy.state_dict(), version=iteration,
                                       seeds=seed_stream(GUARD_SEED_BASE + self.config.seed * 1_000_000),
                                       n_episodes=cfg.guard_episodes, temperature=self.config.eval.temperature,
                                       generator=torch_generator(self.config.seed, 11))
        result = score_episodes(self.reward, [blind(e) for e in episodes], self.views)
        st = self.state
        st["checks"] += 1
        st["robot_episodes"] += len(episodes)
        st["env_steps"] += int(sum(e.length for e in episodes))
        if st["best_score"] is None or result["score"] > st["best_score"]:
            save_checkpoint(policy, self.path, meta={"stage": "improve", "iteration": iteration,
                                                     "guard_score": result["score"], "selected_by": "guard",
                                                     "seed": self.config.seed, **self.provenance},
                            precision=self.config.precision)
            st["best_iteration"], st["best_score"] = iteration, result["score"]
            log.info("guard: iteration %d is the best so far (score %.3f)", iteration, result["score"])
        return {"guard_score": result["score"], "guard_score_se": result["score_se"],
                "guard_detected_rate": result["detected_rate"], "guard_view_agreement": result["view_agreement"],
                "guard_mean_length": result["mean_length"], "guard_episodes": len(episodes),
                "guard_robot_episodes": st["robot_episodes"], "guard_best_iteration": st["best_iteration"],
                "guard_best_score": st["best_score"]}

    def after_iteration(self, policy: EmbodiedModel, iteration: int, last: bool,
                        episodes: list[Episode]) -> dict[str, Any]:
        """Fields for an iteration's metrics record: practice signals, and a check when one is due."""
        out = self.practice_signals(episodes)
        if self.due(iteration, last):
            out.update(self.check(policy, iteration))
        return out

    def close(self) -> None:
        if self._fleet is not None:
            self._fleet.close()
            self._fleet = None


# -- after a run: summary and report --------------------------------------------------------------

def evaluate_best(config: RunConfig, resume: bool = False,
                  evaluated: dict[Path, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """True success of ``checkpoints/best`` on the eval seeds (diagnostic only), cached in ``eval_best.json``.

    ``evaluated`` maps checkpoints already evaluated with the same settings (the SFT and the final
    policy) to their results: when the best checkpoint holds the same weights as one of them (the
    guard often keeps the SFT policy or the last one), that result is taken over instead of
    recomputed; evaluation is deterministic, so the numbers are the same. The cache is reused on
    ``resume`` only while it belongs to the same best iteration.
    """
    path = best_checkpoint(config)
    if not config.improve.guard or not recover_checkpoint(path):
        return None
    iteration = read_checkpoint_config(path).get("meta", {}).get("iteration")
    cache = RunDir(config.run_dir).eval("best")
    if resume and cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("best_iteration") == iteration:
            return cached
    same = next((other for other in (evaluated or {}) if _same_weights(path, Path(other))), None)
    if same is not None:
        result = {**evaluated[same], "checkpoint": str(path), "same_weights_as": str(same)}
    else:
        result = {k: v for k, v in evaluate(config, path).items() if k != "episodes"}
    result["best_iteration"] = iteration
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(dumps_json(result, indent=2) + "\n")
    tmp.replace(cache)
    return result


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold byte-identical weights."""
    fa, fb = a / "model.safetensors", b / "model.safetensors"
    return fa.exists() and fb.exists() and filecmp.cmp(fa, fb, shallow=False)


def guard_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "guard_score" in r]


def guard_summary(run_dir: Path, records: list[dict[str, Any]], best_eval: dict[str, Any] | None
                  ) -> dict[str, Any]:
    """The guarded best for ``summary.json``: iteration, score, true success (diagnostic), costs."""
    checks = guard_records(records)
    path = RunDir(run_dir).best_checkpoint
    if not checks or not path.exists():
        return {}
    meta = read_checkpoint_config(path).get("meta", {})
    keys = ("success_rate", "ci95", "mean_episode_length", "eval_episodes")
    scored = [r for r in checks if "eval_success_rate" in r]
    return {
        "best": {"iteration": meta.get("iteration"), "guard_score": meta.get("guard_score"),
                 **({k: best_eval[k] for k in keys} if best_eval else {})},
        "final": {"iteration": checks[-1]["iteration"], "guard_score": checks[-1]["guard_score"]},
        "sft": {"iteration": 0, "guard_score": checks[0]["guard_score"]} if checks[0]["iteration"] == 0 else {},
        "checks": len(checks), "episodes_per_check": checks[-1]["guard_episodes"],
        "robot_episodes": checks[-1]["guard_robot_episodes"],
        "spearman_score_vs_eval": spearman([r["guard_score"] for r in scored],
                                           [r["eval_success_rate"] for r in scored]) if len(scored) >= 3 else None,
    }
