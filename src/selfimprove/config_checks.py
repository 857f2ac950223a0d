"""Which values a run config may hold: the checks that types alone cannot make.

``check_config`` runs whenever a config is built (``RunConfig.validate``: presets, overrides, a run's
``config.json``), so a bad value fails before any demo is collected or any step is trained. The
tuples of allowed names (domains, precisions, fleet backends, rewards) live here with the checks.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import TYPE_CHECKING, Any

from selfimprove.domain_table import AUGMENTATION_NAMES, DOMAINS, domain_of_env
from selfimprove.errors import ConfigError

if TYPE_CHECKING:
    from selfimprove.config import RunConfig

PRECISIONS = ("auto", "float32", "bfloat16")  # of gradient steps; see train/precision.py
FLEET_BACKENDS = ("local", "ray")
#: data.expert_labels: a demo's action labels are what the expert sent, or what it meant before its
#: noise and detours (which then only move the board: recovery states with clean labels, as in DART)
EXPERT_LABELS = ("executed", "intended")
#: the trunks of model/policy.ENCODERS (the model sits above the config, so its table cannot be read
#: here; tests/test_layers.py checks that the two name the same trunks)
ENCODER_NAMES = ("mlp", "film", "late_fusion", "hf")
#: the action decoders of model/decoders.DECODERS (kept equal by the same test)
DECODER_NAMES = ("independent", "autoregressive", "joint")
# Stage 2's reward: the learned one, its detector's success alone (no per-step shaping), and three
# controls (a constant; the simulator's success as the ceiling; and the simulator's success plus its
# dense progress to the goal, a ceiling with per-step credit)
REWARDS = ("steps_to_go", "steps_to_go_and_success", "detected_success", "constant", "true_success", "true_progress")
#: improve.advantage: train/objectives.advantages (the model and train layers sit above the config)
ADVANTAGES = ("return", "normalized", "group", "gae")
#: improve.train: what Stage 2 trains ("fusion": the fusion MLP and the action decoder, on the
#: conv features computed once per frame; needs an encoder with a fusion MLP)
STAGE2_TRAIN = ("all", "fusion")


def check_config(config: RunConfig) -> None:
    """Raise ConfigError naming the first value out of range (or of a name not allowed) in ``config``."""
    for where, value in _numbers(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"invalid config: {where} = {value} is not a finite number")
    known_env = domain_of_env(config.env.id)
    entry = DOMAINS.get(config.domain)
    checks = [
        (config.seed >= 0, f"seed must be >= 0 (it seeds the simulator), got {config.seed}"),
        (config.sft.lr > 0 and config.improve.lr > 0, "sft.lr and improve.lr must be > 0 (e.g. 3e-4, 1e-4)"),
        (config.sft.weight_decay >= 0 and config.sft.stg_weight >= 0 and config.improve.loss_scale > 0,
         "sft.weight_decay and sft.stg_weight must be >= 0 and improve.loss_scale > 0"),
        (config.improve.max_grad_norm > 0, "improve.max_grad_norm must be > 0"),
        (config.model.hidden >= 1 and config.model.layers >= 1, "model.hidden and model.layers must be >= 1"),
        (all(c >= 1 for c in config.model.channels), "model.channels must all be >= 1"),
        (0 <= config.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (config.env.max_episode_steps >= 1, "env.max_episode_steps must be >= 1"),
        (config.improve.success_threshold is None or config.improve.success_threshold > 0,
         f"improve.success_threshold (--threshold) must be > 0 steps (d >= 0, so s <= 0 never fires); "
         f"got {config.improve.success_threshold}; leave it unset to calibrate s on held-out demos"),
        (config.improve.max_robot_episodes >= 0 and config.improve.eval_every >= 0 and config.improve.eval_episodes >= 1,
         "improve.max_robot_episodes and improve.eval_every must be >= 0 and improve.eval_episodes >= 1"),
        (config.sft.eval_every >= 1 and config.sft.checkpoint_every >= 1,
         "sft.eval_every and sft.checkpoint_every must be >= 1"),
        (config.data.collect_workers >= 1, "data.collect_workers (--workers) must be >= 1"),
        (config.eval.robots >= 1 and config.eval.seed >= 0, "eval.robots must be >= 1 and eval.seed >= 0"),
        (all(t >= 0 for t in config.eval.control_temperatures), "eval.control_temperatures must be >= 0 (0: greedy)"),
        (config.domain in DOMAINS or known_env is None,
         f"domain {config.domain!r} is not a built-in domain ({', '.join(DOMAINS)}) but env.id {config.env.id!r} "
         f"is the {known_env!r} domain's environment: set domain={known_env!r}, or point env.id at your own "
         "task's environment (docs/tutorial.md)"),
        (config.domain not in DOMAINS or known_env in (None, config.domain),
         f"domain {config.domain!r} does not match env.id {config.env.id!r} (an environment of the {known_env!r} "
         f"domain); use the {known_env!r} preset or set domain={known_env!r}"),
        (0 < config.data.fraction <= 1, "data.fraction must be in (0, 1]"),
        (0 < config.data.val_fraction < 1, "data.val_fraction must be in (0, 1)"),
        (config.data.episodes >= 2, "data.episodes must be >= 2"),
        (config.model.action_bins >= 2, "model.action_bins must be >= 2"),
        (config.model.max_steps >= 1, "model.max_steps must be >= 1"),
        (config.env.max_episode_steps <= config.model.max_steps,
         "model.max_steps must cover env.max_episode_steps (the longest demo)"),
        (config.sft.steps >= 1 and config.sft.batch_size >= 1, "sft.steps and sft.batch_size must be >= 1"),
        (0 < config.improve.gamma <= 1, "improve.gamma must be in (0, 1]"),
        (config.fleet.robots >= 1, "fleet.robots must be >= 1"),
        (config.fleet.robots_per_actor >= 0 and config.fleet.reset_every >= 0 and config.fleet.max_restarts >= 0,
         "fleet.robots_per_actor, fleet.reset_every and fleet.max_restarts must be >= 0"),
        (config.fleet.timeout_s > 0 and config.fleet.robots_per_human >= 1,
         "fleet.timeout_s must be > 0 and fleet.robots_per_human >= 1"),
        (config.improve.max_staleness >= 0, "improve.max_staleness must be >= 0"),
        (config.improve.guard_every is None or config.improve.guard_every >= 0,
         "improve.guard_every must be >= 0 (0: guard only the SFT and the final policy; none: eval_every)"),
        (config.improve.guard_episodes >= 1, "improve.guard_episodes must be >= 1 (validation episodes per check)"),
        (config.improve.iterations >= 0, "improve.iterations must be >= 0"),
        (config.improve.steps_per_iteration >= 1, "improve.steps_per_iteration must be >= 1"),
        (config.improve.minibatch_size >= 0, "improve.minibatch_size must be >= 0 (0: the whole batch)"),
        (config.improve.threshold_rule in ("f1", "precision"), "improve.threshold_rule must be 'f1' or 'precision'"),
        (0 < config.improve.threshold_precision <= 1, "improve.threshold_precision must be in (0, 1]"),
        (config.improve.success_hold >= 1, "improve.success_hold must be >= 1 (consecutive steps with d <= s)"),
        (config.improve.advantage in ADVANTAGES, f"improve.advantage must be one of {', '.join(map(repr, ADVANTAGES))}"),
        (config.improve.group_size >= 1, "improve.group_size must be >= 1"),
        (0 <= config.improve.gae_lambda <= 1 and config.improve.value_lr > 0,
         "improve.gae_lambda must be in [0, 1] and improve.value_lr > 0"),
        (config.improve.advantage != "gae" or config.improve.baseline == "none",
         "improve.advantage = 'gae' has its own baseline (the critic); set improve.baseline = 'none'"),
        (config.improve.practice_boards >= 0, "improve.practice_boards must be >= 0 (0: a new board every time)"),
        (config.improve.group_weighting in ("frame", "episode"), "improve.group_weighting must be 'frame' or 'episode'"),
        (config.improve.train in STAGE2_TRAIN, f"improve.train must be one of {', '.join(map(repr, STAGE2_TRAIN))}"),
        (config.improve.train == "all" or config.model.encoder in ("film", "late_fusion"),
         "improve.train = 'fusion' (the tabletop preset's) needs model.encoder 'film' or 'late_fusion' "
         "(a trunk with a fusion MLP); with another encoder add --set improve.train=all"),
        ((config.improve.advantage == "group") == (config.improve.group_size > 1),
         "improve.advantage = 'group' and improve.group_size > 1 go together (several attempts per start board)"),
        (config.improve.group_size == 1 or not config.fleet.reset_free,
         "improve.group_size > 1 needs episodic practice (fleet.reset_free = false): each attempt starts from the same board"),
        (config.improve.kl_target >= 0 and (config.improve.kl_target == 0 or config.improve.kl_coef > 0),
         "improve.kl_target must be >= 0, and > 0 only with a starting improve.kl_coef > 0"),
        (config.improve.baseline in ("none", "reward_model"), "improve.baseline must be 'none' or 'reward_model'"),
        (not config.improve.reward_ensemble or not config.improve.guard,
         "improve.reward_ensemble with improve.guard is not supported (the guard scores episodes with one model); "
         "add --set improve.guard=false"),
        (isinstance(config.improve.reward_ensemble, list)
         and all(isinstance(p, str) and p for p in config.improve.reward_ensemble),
         "improve.reward_ensemble must be a list of checkpoint folders, e.g. [\"runs/sft-s1/checkpoints/sft\"]"),
        (config.improve.reward_steps in ("expected", "reachable"), "improve.reward_steps must be 'expected' or 'reachable'"),
        (config.improve.detector in ("steps_to_go", "goal_probability", "reachable_steps_to_go"),
         "improve.detector must be 'steps_to_go', 'goal_probability' or 'reachable_steps_to_go', "
         f"got {config.improve.detector!r}"),
        (config.improve.detector == "steps_to_go" or not config.improve.guard,
         f"improve.detector = {config.improve.detector!r} with improve.guard is not supported (the guard scores "
         "episodes with d); add --set improve.guard=false"),
        (config.improve.detector != "goal_probability" or config.improve.success_threshold is None
         or 0 < config.improve.success_threshold < 1,
         "improve.success_threshold with improve.detector = 'goal_probability' is a score 1 - P(goal) in (0, 1)"),
        (0 <= config.improve.baseline_decay < 1, "improve.baseline_decay must be in [0, 1)"),
        (config.improve.reward_clip >= 0 and config.improve.kl_coef >= 0,
         "improve.reward_clip and improve.kl_coef must be >= 0 (0: off)"),
        (0 <= config.sft.negatives <= 4, "sft.negatives must be in [0, 4] (negative rows per batch row)"),
        (config.data.hold_steps >= 0, "data.hold_steps must be >= 0"),
        (config.data.expert_labels in EXPERT_LABELS,
         f"data.expert_labels must be one of {', '.join(map(repr, EXPERT_LABELS))}, got {config.data.expert_labels!r}"),
        (config.sft.negatives == 0 or config.model.encoder != "mlp",
         "sft.negatives needs an instruction-conditioned model (model.encoder 'film', 'late_fusion' or 'hf')"),
        (config.fleet.backend in FLEET_BACKENDS, f"fleet.backend must be one of {FLEET_BACKENDS}"),
        (config.improve.temperature > 0 and config.eval.temperature >= 0,
         "improve.temperature must be > 0 and eval.temperature (--temperature) >= 0 (0: greedy)"),
        (config.eval.episodes >= 1, "eval.episodes must be >= 1"),
        (config.diagnose.rollouts >= 0, "diagnose.rollouts must be >= 0 (0: held-out demos only)"),
        (config.eval.videos >= 0, "eval.videos must be >= 0 (0: no rollout videos)"),
        (config.torch_threads >= 1, "torch_threads must be >= 1"),
        (config.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {config.precision!r}"),
        (config.model.encoder in ENCODER_NAMES,
         f"model.encoder must be one of {', '.join(map(repr, ENCODER_NAMES))}"),
        (config.model.action_decoder in DECODER_NAMES,
         f"model.action_decoder must be one of {', '.join(map(repr, DECODER_NAMES))}"),
        (config.model.encoder != "hf" or bool(config.model.hf_model),
         "model.encoder = 'hf' needs model.hf_model (a local folder or a hub id); see docs/hf_backbones.md"),
        (config.model.hf_dtype in ("auto", "bfloat16", "float32"),
         "model.hf_dtype must be 'auto', 'bfloat16' or 'float32'"),
        (config.model.hf_device in ("auto", "cpu", "cuda") or config.model.hf_device.startswith("cuda:"),
         "model.hf_device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (config.model.hf_train in ("all", "language", "heads"), "model.hf_train must be 'all', 'language' or 'heads'"),
        (config.model.hf_batch_size >= 1, "model.hf_batch_size must be >= 1"),
        (config.model.image_init in ("scratch", "pretrained"), "model.image_init must be 'scratch' or 'pretrained'"),
        (config.model.text_encoder in ("hashed_roles", "hashed_bow", "minilm"),
         "model.text_encoder must be 'hashed_roles', 'hashed_bow' or 'minilm'"),
        (config.model.frames >= 1 and len(config.model.channels) >= 1, "model.frames and model.channels must be >= 1"),
        (bool(config.domain) and not any(c.isspace() for c in config.domain),
         f"domain must be a name without spaces: one of {tuple(DOMAINS)} or your task's own (e.g. 'reach')"),
        (set(config.sft.augment) <= set(AUGMENTATION_NAMES),
         f"sft.augment may hold {', '.join(map(repr, AUGMENTATION_NAMES))}, got {config.sft.augment}"),
        (config.improve.reward in REWARDS, f"improve.reward must be one of {', '.join(REWARDS)}"),
        (config.improve.reward != "true_progress" or getattr(DOMAINS.get(config.domain), "goal_distance", False),
         f"improve.reward = 'true_progress' needs an env that reports its distance to the goal; domain "
         f"{config.domain!r} does not (the built-in ones that do: "
         f"{', '.join(d.name for d in DOMAINS.values() if d.goal_distance)})"),
        (config.improve.objective in ("reinforce", "ppo", "ppo_token"),
         f"improve.objective must be 'reinforce', 'ppo' or 'ppo_token', got {config.improve.objective!r}"),
        (0 < config.improve.ppo_clip < 1, f"improve.ppo_clip must be in (0, 1) (e.g. 0.2), got {config.improve.ppo_clip}"),
        (config.improve.epochs is None or config.improve.epochs >= 1,
         f"improve.epochs must be >= 1 (or none for the objective's default), got {config.improve.epochs}"),
        (set(config.sft.augment) <= set(entry.augmentations if entry else ()),
         f"sft.augment {config.sft.augment} is not defined for the {config.domain!r} domain"
         + (f" (it has {', '.join(map(repr, entry.augmentations))})" if entry and entry.augmentations else
            " (it has none: set sft.augment = [])")),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid config: {message}")
    if not config.name or "/" in config.name or config.name.startswith("."):
        raise ConfigError(f"invalid run name {config.name!r}: use a plain folder name such as 'pointmass'")


def _numbers(node: Any, where: str = "") -> typing.Iterator[tuple[str, Any]]:
    """Every (dotted name, value) of a config's numeric fields, nested sections included."""
    for f in dataclasses.fields(node):
        value, name = getattr(node, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value
        elif isinstance(value, list):
            yield from ((f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (int, float)))



