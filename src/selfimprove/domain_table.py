"""The domain table: one entry per built-in domain, and the only place a domain is named.

An entry says which gymnasium envs are the domain's, which preset runs it, what marks its episodes in
a store, and where its parts live: the scripted expert, the instruction grammar, when two
instructions ask for the same thing, the SFT augmentations and the guard's label-preserving view
changes. Parts are named by ``"module:attribute"`` (as gymnasium names entry points), so this table
sits at the bottom of the package: the config checks and the model's input checks read it without
importing the layers above; :func:`resolve` imports a part when it is first used.

Adding a domain is one entry here plus its folders (``envs/<world>/``, ``domains/<name>.py``) and its
preset (``configs/<name>.toml``); docs/architecture.md walks through it with the two built-in ones.
A name not in the table is a task of your own (docs/tutorial.md): any env, any non-empty instruction,
no augmentations, no views.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any


#: the env info key of the distance left to the goal (domains with ``goal_distance``)
GOAL_DISTANCE = "goal_distance"


@dataclass(frozen=True)
class Domain:
    name: str
    env_prefix: str  # every gymnasium id of the domain's envs starts with this
    preset: str  # configs/<preset>.toml runs it (diagnose loads it for a bare checkpoint)
    observations: dict[str, tuple[int, ...]]  # observation key -> per-frame shape that marks its episodes
    only_these_observations: bool = False  # the marks are all its observations (else camera frames may join)
    expert: str = ""  # "module:function": (config) -> Expert that collects its demos; "" = none (import demos)
    instruction_parser: str = ""  # "module:function": (text) -> task, raising ConfigError; "" = any non-empty text
    goal_key: str = ""  # "module:function": (text) -> what the instruction asks for; "" = its words
    augmentations: dict[str, str] = field(default_factory=dict)  # SFT augmentation name -> "module:function" (obs, tokens, bins, rows, generator=) -> (obs, tokens)
    views: str = ""  # "module:attribute": the guard's DomainViews (domains/__init__.py); "" = none
    draw_states: str = ""  # "module:function": (observations, config, size) -> RGB frames, for videos of
    #                        episodes without camera frames; "" = no video for those
    setback: str = ""  # "module:function": (episode) -> the frame the task fell back at (the peg dropped), or
    #                    None; the diagnostics plot the steps-to-go distribution through it; "" = none
    setback_info: tuple[str, ...] = ()  # the env info keys ``setback`` reads, kept per frame in rollouts
    goal_distance: bool = False  # its env reports info[GOAL_DISTANCE], the distance left to the goal, which the
    #                              dense true-progress control reward reads (``improve.reward = "true_progress"``)


DOMAINS: dict[str, Domain] = {
    "pointmass": Domain(
        name="pointmass", env_prefix="selfimprove/PointMass", preset="pointmass",
        observations={"state": (6,)}, only_these_observations=True,
        expert="selfimprove.domains.pointmass:expert",
        views="selfimprove.domains.pointmass:VIEWS",
        draw_states="selfimprove.domains.pointmass:draw_states"),
    "language-table": Domain(
        name="language-table", env_prefix="selfimprove/Tabletop", preset="language-table",
        observations={"effector": (2,), "effector_target": (2,)},
        expert="selfimprove.domains.tabletop:expert",
        instruction_parser="selfimprove.envs.tabletop.tasks:parse_instruction",
        goal_key="selfimprove.envs.tabletop.tasks:goal_key",
        augmentations={name: f"selfimprove.domains.tabletop:{name}_tabletop"
                       for name in ("mirror", "shift", "flip", "recolour")},
        views="selfimprove.domains.tabletop:VIEWS", goal_distance=True),
    "aloha": Domain(
        name="aloha", env_prefix="selfimprove/Aloha", preset="aloha",
        observations={"joints": (14,)},
        expert="selfimprove.domains.aloha:expert",
        setback="selfimprove.domains.aloha:peg_dropped", setback_info=("peg_position",)),
}

#: every SFT augmentation any domain defines (config checks name them)
AUGMENTATION_NAMES = tuple(dict.fromkeys(a for d in DOMAINS.values() for a in d.augmentations))


@functools.lru_cache(maxsize=None)
def resolve(ref: str) -> Any:
    """The object a ``"module:attribute"`` reference names (imported once)."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


def domain_of_env(env_id: str) -> str | None:
    """The built-in domain whose environment ``env_id`` is, or None for an environment of your own."""
    found = [d.name for d in DOMAINS.values() if env_id.startswith(d.env_prefix)]
    return found[0] if found else None
