"""Everything the steps-to-go prediction ``d(o, g)`` of a FROZEN model is used for.

Stage 2's reward ``r_t = d(o_t, g) - d(o_{t+1}, g)`` and success detector ``[d(o, g) <= s]`` (held
for ``hold`` steps), the calibration of ``s`` on held-out demos, the baseline built from ``d``, and the
mismatched-instruction negatives that teach ``d`` to say "not on the way" in Stage 1. The model is
put in eval mode with gradients off and is never handed to an optimizer.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch

from selfimprove.config import RunConfig
from selfimprove.data.episode import Episode
from selfimprove.data.store import EpisodeStore, split_episodes
from selfimprove.data.v3 import INFO_PATH
from selfimprove.domains import check_store, goal_key_for
from selfimprove.errors import DatasetError
from selfimprove.model.checkpoint import load_checkpoint
from selfimprove.model.inputs import FrameSource, frame_source, from_episodes
from selfimprove.model.policy import EmbodiedModel, ModelSpec

log = logging.getLogger(__name__)


class StepsToGoReward:
    """The frozen model as reward ``d(o_t) - d(o_{t+1})`` and success detector.

    The detector fires once ``d <= s`` has held on ``hold`` consecutive observations
    (``improve.success_hold``; LanguageTable's delayed reward): a single optimistic frame, the most
    common false success, does not end an episode.

    ``ensemble``: more frozen models of the same spec (``improve.reward_ensemble``, e.g. Stage 1 with
    other seeds). Then ``d`` is the largest of the members' predictions, the pessimistic ensemble
    (Coste et al., 2024): a state counts as near the goal only when every member says so, so the
    policy cannot cash in one model's error. ``model`` stays the first member (its trunk may be
    shared with the policy's).

    ``detector``: what the detector reads (:data:`DETECTORS`). ``"steps_to_go"`` is the paper's
    ``d <= s``. ``"goal_probability"`` reads the head's probability that the frame is the goal,
    ``P(steps-to-go = 0)``, as the score ``1 - P`` (``<= s``): the expectation ``d`` also carries the
    distribution's far tail and its "never" class, so a frame the model is sure is the goal and one it
    thinks is a few steps off can have the same ``d``. ``"reachable_steps_to_go"`` reads ``d`` without
    the "never" class (the expectation over 0..max_steps, renormalised): a head that keeps some mass
    on "never" for frames it places well (14% on held-out demo frames at 950 demos, which puts ~28
    steps into ``d``) no longer has that flicker in its verdict. An ensemble's score is its least sure
    member's.
    """

    def __init__(self, model: EmbodiedModel, threshold: float, hold: int = 1,
                 ensemble: Sequence[EmbodiedModel] = (), detector: str = "steps_to_go") -> None:
        self.model = model.eval()
        self.ensemble = [m.eval() for m in ensemble]
        if any(member.spec != model.spec for member in self.ensemble):
            raise ValueError("every member of a reward ensemble needs the spec of the first (the same "
                             "inputs and steps-to-go head); retrain it with the same model config")
        for member in self.members:
            for p in member.parameters():
                p.requires_grad_(False)
        self.threshold = float(threshold)
        if hold < 1:
            raise ValueError(f"hold must be >= 1 consecutive steps, got {hold}")
        self.hold = int(hold)
        if detector not in DETECTORS:
            raise ValueError(f"unknown detector {detector!r}; use one of {sorted(DETECTORS)}")
        self.detector = detector

    @classmethod
    def from_checkpoint(cls, path: str | Path, threshold: float, expect_domain: str | None = None,
                        hold: int = 1) -> "StepsToGoReward":
        model, _ = load_checkpoint(path, expect_domain=expect_domain)
        return cls(model, threshold, hold)

    @property
    def members(self) -> list[EmbodiedModel]:
        return [self.model, *self.ensemble]

    @property
    def spec(self) -> ModelSpec:
        """The reward model's own input spec (its frames and observation keys, not the policy's)."""
        return self.model.spec

    @property
    def separate_score(self) -> bool:
        """Whether the detector reads something other than ``d`` (then the fleet records both)."""
        return self.detector != "steps_to_go"

    @property
    def thresholds(self) -> np.ndarray:
        """The grid the calibration chooses ``s`` from, in the detector's own units."""
        return DETECTORS[self.detector]

    @torch.no_grad()
    def read(self, obs: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """``(d, score)`` for a batch of observations from one pass of each member's head: the reward's
        ``d`` and the detector's score (``d`` itself for the ``"steps_to_go"`` detector)."""
        return self._read(self.model.steps_to_go_distribution(obs), obs)

    @torch.no_grad()
    def read_from_fusion(self, z: torch.Tensor, obs: dict[str, torch.Tensor] | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`read` from the first member's fusion inputs (computed once for the policy too); an
        ensemble's other members read ``obs``."""
        if self.ensemble and obs is None:
            raise ValueError("a reward ensemble needs the observations for its other members")
        return self._read(self.model.stg_head(self.model.encoder.fuse(z)), obs)

    def _read(self, logits: torch.Tensor, obs: dict[str, torch.Tensor] | None, reachable: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
        """The first member's ``(d, score)`` from ``logits``, each raised to the largest of the other
        members' on ``obs`` (the pessimistic ensemble), as numpy."""
        d, score = self._reading(self.model, logits, reachable)
        for member in self.ensemble:
            d_m, score_m = self._reading(member, member.steps_to_go_distribution(obs), reachable)
            d, score = torch.maximum(d, d_m), torch.maximum(score, score_m)
        return d.numpy().astype(np.float32), score.numpy().astype(np.float32)

    def _reading(self, model: EmbodiedModel, logits: torch.Tensor, reachable: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        d = model.expected_from_logits(logits, reachable)
        if self.detector == "steps_to_go":
            return d, d
        if self.detector == "reachable_steps_to_go":
            return d, (d if reachable else model.expected_from_logits(logits, True))
        return d, 1.0 - torch.softmax(logits, dim=-1)[:, 0]

    def score_of(self, source: FrameSource, chunk: int = 1024) -> np.ndarray:
        """The detector's score on every row of ``source`` (``d`` for the ``"steps_to_go"`` detector)."""
        return _read_of(self, source, chunk)[1]

    @torch.no_grad()
    def steps_to_go(self, obs: dict[str, torch.Tensor], reachable: bool = False) -> np.ndarray:
        """d(o, g) for a batch of observations, as float32 numpy [B] (``reachable``: see
        :meth:`EmbodiedModel.expected_steps_to_go`); an ensemble's largest."""
        return self._read(self.model.steps_to_go_distribution(obs), obs, reachable)[0]

    def steps_to_go_of(self, source: FrameSource, chunk: int = 1024, reachable: bool = False) -> np.ndarray:
        """d(o, g) on every row of ``source`` (stored frames with their history), in chunks."""
        n = len(source.frame_index)
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([self.steps_to_go(source.obs(torch.arange(i, min(i + chunk, n))), reachable)
                               for i in range(0, n, chunk)])

    @staticmethod
    def reward(d_t: np.ndarray, d_next: np.ndarray) -> np.ndarray:
        return np.asarray(d_t, dtype=np.float32) - np.asarray(d_next, dtype=np.float32)

    def is_success(self, score: np.ndarray | float) -> np.ndarray:
        """``score <= s`` for each observation (one frame's verdict; see :meth:`detects`); the score is
        ``d`` for the ``"steps_to_go"`` detector."""
        return np.asarray(score) <= self.threshold

    def detects(self, score_history: Sequence[float]) -> bool:
        """The detector's verdict after the latest step: ``score <= s`` on each of the last ``hold`` observations."""
        if len(score_history) < self.hold:
            return False
        return bool(np.all(np.asarray(score_history[-self.hold:]) <= self.threshold))


def load_ensemble(paths: Sequence[str | Path], first: EmbodiedModel) -> list[EmbodiedModel]:
    """The extra members of a reward ensemble (``improve.reward_ensemble``), each checked against the
    first member's spec before any work starts."""
    return [load_checkpoint(p, expect_domain=first.spec.domain, expect_spec=first.spec)[0] for p in paths]


def episode_ids(episode_start: np.ndarray, n: int) -> np.ndarray:
    """Per row of ``n`` consecutive frames, the index of its episode (from each episode's first row)."""
    return np.cumsum(np.isin(np.arange(n), episode_start)) - 1


def held_firing(d: np.ndarray, episode: np.ndarray, threshold: float, hold: int = 1) -> np.ndarray:
    """Per frame: would the detector fire here, i.e. ``d <= s`` on this frame and the ``hold - 1``
    frames before it in the same episode (rows of one episode consecutive, in order)."""
    fired = np.asarray(d) <= threshold
    out = fired.copy()
    episode = np.asarray(episode)
    for lag in range(1, hold):
        prev = np.zeros_like(fired)
        prev[lag:] = fired[:-lag] & (episode[lag:] == episode[:-lag])
        out &= prev
    return out


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Monte Carlo returns ``R_t = sum_i gamma^(i-t) r_i`` within one episode."""
    out = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out.astype(np.float32)


def past_average(d: np.ndarray, decay: float) -> np.ndarray:
    """``b_t = decay * b_{t-1} + (1 - decay) * d_t`` (``b_0 = d_0``): the level of ``d`` over the frames up
    to ``t``, none after it."""
    out = np.empty(len(d), dtype=np.float64)
    level = float(d[0]) if len(d) else 0.0
    for t, value in enumerate(np.asarray(d, dtype=np.float64)):
        level = decay * level + (1.0 - decay) * value
        out[t] = level
    return out.astype(np.float32)


def reward_model_baseline(d: np.ndarray, decay: float) -> np.ndarray:
    """The baseline ``d(o_t) - past_average(d)_t`` of each acting step ``t`` (``d`` over ``T + 1`` frames).

    ``R_t`` of the shaped reward telescopes to ``d(o_t)`` minus a discounted average of the ``d`` that
    follow, so one frame's noise in ``d(o_t)`` enters every advantage whole, although it cannot depend on
    ``a_t``. Subtracting it and adding back the level of ``d`` up to ``t`` leaves "the near future's ``d``
    against the recent past's": a function of frames before the action only, so the gradient stays
    unbiased, with far less noise (docs/self_improvement.md).
    """
    d = np.asarray(d, dtype=np.float32)
    return (d - past_average(d, decay))[:-1]


def detector_table(d: np.ndarray, positive: np.ndarray, thresholds: np.ndarray | None = None
                   ) -> list[dict[str, Any]]:
    """Precision/recall/F1 of ``d <= s`` against boolean labels, for each threshold ``s``."""
    d = np.asarray(d, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if thresholds is None:
        thresholds = np.array([0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 7.5, 10])
    rows = []
    for s in thresholds:
        fired = d <= s
        tp = int(np.sum(fired & positive))
        fp = int(np.sum(fired & ~positive))
        fn = int(np.sum(~fired & positive))
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        rows.append({"threshold": float(s), "precision": precision, "recall": recall, "f1": f1,
                     "fired": int(fired.sum()), "positives": int(positive.sum())})
    return rows


# The thresholds ``s`` the calibration chooses from (steps): fine below a few steps, where it matters.
THRESHOLD_GRID = np.round(np.arange(0.25, 20.01, 0.25), 2)
THRESHOLD_RULE = ("max F1 of {score} <= s against the goal frames of held-out demos, over s = {grid}; "
                  "ties go to the smaller s")
PRECISION_RULE = ("the largest s = {grid} whose detector ({score} <= s held for {hold} steps) reaches a "
                  "per-frame precision of {target:g} on held-out demos plus the same frames under mismatched "
                  "instructions (positives: frames at the goal; negatives: frames more than {near} steps from it "
                  "and every mismatched frame)")
# What the detector can read, each with the grid its s is calibrated on: d in steps, or 1 - P(goal).
PROBABILITY_GRID = np.round(np.arange(0.005, 0.9951, 0.005), 3)
DETECTORS = {"steps_to_go": THRESHOLD_GRID, "goal_probability": PROBABILITY_GRID, "reachable_steps_to_go": THRESHOLD_GRID}
REPORT_PROBABILITIES = np.array([0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9])  # 1 - P(goal) thresholds a report shows
NEAR_GOAL = 2  # frames this close to the goal are neither positives nor negatives of the precision rule


def _grid_text(grid: np.ndarray) -> str:
    return f"{grid[0]:g}, {grid[1]:g}, ..., {grid[-1]:g}"


def _score_text(grid: np.ndarray) -> str:
    return "d" if np.array_equal(grid, THRESHOLD_GRID) else "1 - P(goal)"


def recommend_threshold(d: np.ndarray, is_goal_frame: np.ndarray, grid: np.ndarray = THRESHOLD_GRID) -> dict[str, Any]:
    """The ``"f1"`` rule: the ``s`` with the highest F1 of ``d <= s`` against held-out goal frames.

    It uses only what a real robot has (every demo ends where its goal was reached) and it favours
    recall: the frame one step before the goal counts as a false positive although stopping there
    costs one step. On the policy's own states that recall is bought with false successes (the
    tabletop's measured failure), so :func:`precision_threshold` is the rule the tabletop preset uses.
    """
    table = detector_table(d, is_goal_frame, grid)
    best = max(table, key=lambda r: (r["f1"], -r["threshold"]))
    return {"threshold": best["threshold"], "rule": THRESHOLD_RULE.format(grid=_grid_text(grid), score=_score_text(grid)),
            "table": table, "at_grid_edge": best["threshold"] == float(grid[-1])}


def precision_threshold(d: np.ndarray, steps_to_go: np.ndarray, episode: np.ndarray, target: float,
                        hold: int = 1, d_mismatched: np.ndarray | None = None,
                        grid: np.ndarray = THRESHOLD_GRID) -> dict[str, Any]:
    """The ``"precision"`` rule (see :data:`PRECISION_RULE`): a false success ends an episode and pays
    the whole remaining steps-to-go at once, a missed one only makes the episode longer.

    ``d`` and ``steps_to_go`` are per held-out demo frame (``episode`` ids, consecutive rows);
    ``d_mismatched`` is ``d`` on the same frames under an instruction that asks for something else
    (one per episode), or None for a model without that training. When no ``s`` reaches the target
    the most precise one is taken and ``target_met`` is False.
    """
    steps_to_go = np.asarray(steps_to_go)
    positive, far = steps_to_go <= 0, steps_to_go > NEAR_GOAL
    rows = []
    for s in grid:
        fired = held_firing(d, episode, s, hold)
        tp, fp = int(np.sum(fired & positive)), int(np.sum(fired & far))
        fp_mismatched = int(held_firing(d_mismatched, episode, s, hold).sum()) if d_mismatched is not None else 0
        fired_total = tp + fp + fp_mismatched
        rows.append({"threshold": float(s), "precision": tp / fired_total if fired_total else float("nan"),
                     "recall": tp / max(1, int(positive.sum())), "true_positives": tp, "false_positives": fp,
                     "false_positives_mismatched": fp_mismatched})
    ok = [r for r in rows if r["true_positives"] and r["precision"] >= target]
    if ok:
        best = max(ok, key=lambda r: r["threshold"])
    else:
        scored = [r for r in rows if r["true_positives"]] or rows
        best = max(scored, key=lambda r: (np.nan_to_num(r["precision"]), -r["threshold"]))
    return {"threshold": best["threshold"], "rule": PRECISION_RULE.format(
                hold=hold, target=target, near=NEAR_GOAL, grid=_grid_text(grid), score=_score_text(grid)),
            "table": rows, "target_met": bool(ok), "precision": best["precision"], "recall": best["recall"],
            "at_grid_edge": best["threshold"] == float(grid[-1])}


def detector_view(held_out: dict[str, np.ndarray], detector: str = "steps_to_go") -> dict[str, np.ndarray]:
    """``held_out`` (from :func:`demo_steps_to_go`) with ``d`` and ``d_mismatched`` replaced by the
    detector's score on the same frames, for everything that replays the detector (the calibration, the
    audit); the ``"steps_to_go"`` detector reads ``d`` itself."""
    if detector == "steps_to_go":
        return held_out
    if "score" not in held_out:
        raise ValueError(f"the held-out pass has no score for the {detector!r} detector")
    view = {**held_out, "d": held_out["score"]}
    if "score_mismatched" in held_out:
        view["d_mismatched"] = held_out["score_mismatched"]
    return view


def calibrate_threshold(held_out: dict[str, np.ndarray], rule: str = "f1", target: float = 0.9,
                        hold: int = 1, detector: str = "steps_to_go") -> dict[str, Any]:
    """Choose ``s`` on the frozen model's pass over held-out demos (``held_out``: ``d``, ``goal_frame``,
    ``steps_to_go``, ``episode_start`` and, when the model was trained with negatives,
    ``d_mismatched``; for another ``detector`` its ``score``), by the ``"f1"`` or the ``"precision"``
    rule, on that detector's grid. The one place ``s`` is chosen: Stage 2 and ``selfimprove diagnose``
    both call it."""
    grid = DETECTORS[detector]
    held_out = detector_view(held_out, detector)
    if rule == "f1":
        choice = recommend_threshold(held_out["d"], held_out["goal_frame"], grid)
    elif rule == "precision":
        episode = episode_ids(held_out["episode_start"], len(held_out["d"]))
        choice = precision_threshold(held_out["d"], held_out["steps_to_go"], episode, target, hold,
                                     held_out.get("d_mismatched"), grid)
        if not choice["target_met"]:
            log.warning("no success threshold reaches precision %.2f on held-out demos and mismatched instructions; "
                        "taking the most precise one, s = %g (precision %.3f)", target, choice["threshold"],
                        choice["precision"])
    else:
        raise ValueError(f"unknown threshold rule {rule!r}; use 'f1' or 'precision'")
    if not any(r.get("f1", 0) > 0 or r.get("true_positives", 0) > 0 for r in choice["table"]):
        log.warning("the steps-to-go head does not separate goal frames on held-out demos (no threshold "
                    "fires on them); Stage 2 will see no detected success. Train Stage 1 longer.")
    if choice["at_grid_edge"]:
        log.warning("the calibrated success threshold s = %g is the largest on the grid; d may be poorly "
                    "calibrated (check `selfimprove diagnose`) or fix improve.success_threshold", choice["threshold"])
    return choice


def reachable_steps_to_go(episodes: list[Episode], reward: StepsToGoReward) -> list[np.ndarray]:
    """Per episode, ``d`` without the "never" class (``improve.reward_steps = "reachable"``): the frozen
    model's expectation over 0..max_steps on every frame, in one batched pass."""
    source, _ = from_episodes(episodes, reward.spec)
    d = reward.steps_to_go_of(source, reachable=True)
    return np.split(d, np.cumsum([e.length + 1 for e in episodes])[:-1])


class MismatchedInstructions:
    """Label-free negatives for the steps-to-go head (as in ReWiND): a demo frame paired with an
    instruction of the dataset that asks for something else is "not on the way"; its label is the
    head's "never" class. ``goal_key`` says when two instructions ask for the same thing (a
    paraphrase, or a role swap where success is symmetric): those are never drawn as negatives."""

    def __init__(self, instructions: list[str], goal_key: Callable[[str], Hashable]) -> None:
        self.instructions = list(instructions)
        self.goal_key = goal_key
        self._keys: dict[str, Hashable] = {}
        self.keys = [self.key(t) for t in self.instructions]
        if len(set(self.keys)) < 2:
            raise DatasetError("sft.negatives needs a dataset with at least two different goals (it pairs frames "
                               "with instructions that ask for something else); set sft.negatives = 0")

    def key(self, text: str) -> Hashable:
        if text not in self._keys:
            self._keys[text] = self.goal_key(text)
        return self._keys[text]

    def draw(self, texts: list[str], generator: torch.Generator) -> list[str]:
        """One instruction per text, asking for something else (uniform draw, then the next that differs)."""
        n = len(self.instructions)
        out = []
        for text, j in zip(texts, torch.randint(0, n, (len(texts),), generator=generator).tolist()):
            key = self.key(text)
            while self.keys[j] == key:
                j = (j + 1) % n
            out.append(self.instructions[j])
        return out


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
    key = _held_out_key(reward.members, config, val_idx, reward.detector) if cache is not None else ""
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as saved:
                if str(saved["key"]) == key:
                    return {k: saved[k] for k in saved.files if k != "key"}
        except (OSError, ValueError, KeyError, EOFError) as exc:  # unreadable: compute again
            log.warning("ignoring the unreadable held-out cache %s (%s)", cache, exc)
    frames = store.frames(val_idx)
    source = frame_source(frames, reward.spec)
    d, score = _read_of(reward, source)
    true = frames.extras.get("info.is_success", frames.is_terminal)
    out = {"d": d, **({"score": score} if reward.separate_score else {}), "goal_frame": frames.goal_reached, "true_success": np.asarray(true, dtype=bool),
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
        out["d_mismatched"], score = _read_of(reward, source)
        if reward.separate_score:
            out["score_mismatched"] = score
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez_compressed(tmp, key=np.array(key), **out)
        tmp.replace(cache)
    return out


def _read_of(reward: StepsToGoReward, source: FrameSource, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """``(d, score)`` (:meth:`StepsToGoReward.read`) on every row of ``source``, in chunks."""
    n = len(source.frame_index)
    parts = [reward.read(source.obs(torch.arange(i, min(i + chunk, n)))) for i in range(0, n, chunk)]
    if not parts:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _held_out_key(members: list[EmbodiedModel], config: RunConfig, val_idx: np.ndarray,
                  detector: str = "steps_to_go") -> str:
    """What d on the held-out demos depends on: the models' weights, which frames of which store and,
    for a detector that reads its own score, which detector."""
    h = hashlib.sha256(b"held-out v2: goal frames with hold, d_mismatched")
    if detector != "steps_to_go":  # a "steps_to_go" key is what it was before other detectors existed
        h.update(f"detector {detector}".encode())
    for k, model in enumerate(members):
        if k:  # a lone model's key is what it was before ensembles existed
            h.update(f"ensemble member {k}".encode())
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    info = config.dataset_path / INFO_PATH
    h.update(str(config.dataset_path.resolve()).encode())
    h.update(info.read_bytes() if info.exists() else b"")
    h.update(np.asarray(val_idx, dtype=np.int64).tobytes())
    return h.hexdigest()


def calibrate_detector(reward_model: EmbodiedModel, config: RunConfig, cache: Path | None = None,
                       ensemble: Sequence[EmbodiedModel] = ()) -> dict[str, Any]:
    """Choose the success threshold ``s`` on held-out demos (``reward.calibrate_threshold``), or take the
    configured one; with the numbers a report shows beside it. With an ``ensemble``, ``s`` is chosen on
    the ensemble's ``d`` (the largest of the members'); with ``improve.detector = "goal_probability"``
    on the score ``1 - P(goal)`` (:class:`StepsToGoReward`)."""
    cfg = config.improve
    probe = StepsToGoReward(reward_model, threshold=0.0, ensemble=ensemble, detector=cfg.detector)
    frames = demo_steps_to_go(probe, config, cache)
    if not reward_model.spec.stg_never and "d_mismatched" in frames:  # a store with several goals
        log.warning("the reward model was trained without mismatched-instruction negatives (sft.negatives = 0): "
                    "its steps-to-go head cannot say 'not on the way', and its detector is known to fire on "
                    "states that are not the goal; retrain Stage 1 with sft.negatives > 0")
    choice = calibrate_threshold(frames, cfg.threshold_rule, cfg.threshold_precision, cfg.success_hold, cfg.detector)
    recommended = choice["threshold"]
    fixed = cfg.success_threshold
    view = detector_view(frames, cfg.detector)
    return {
        "threshold": float(fixed) if fixed is not None else recommended,
        "recommended": recommended,
        "hold": cfg.success_hold,
        "detector": cfg.detector,
        "source": "config" if fixed is not None else f"calibrated on held-out demos ({cfg.threshold_rule} rule)",
        "rule": choice["rule"],
        "table": choice["table"],
        "negatives_trained": bool(reward_model.spec.stg_never),
        "held_out_demos_vs_true_success": detector_table(view["d"], view["true_success"],
                                                         REPORT_PROBABILITIES if cfg.detector == "goal_probability" else None),
        "mismatched_firing_rate": (float(np.mean(held_firing(
            view["d_mismatched"], episode_ids(view["episode_start"], len(view["d"])), recommended,
            cfg.success_hold))) if "d_mismatched" in view else None),
        "d_goal_frames_mean": float(frames["d"][frames["goal_frame"]].mean()),
        "d_other_frames_mean": float(frames["d"][~frames["goal_frame"]].mean()),
        "ensemble_members": 1 + len(ensemble),
    }
