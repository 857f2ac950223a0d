"""What differs between domains, behind one set of functions: the env, its expert, how observations
reach the model, its SFT augmentations and the guard's views.

Each domain's parts are named in the domain table (``domain_table.DOMAINS``) and live in its own module
(``domains/pointmass.py``, ``domains/tabletop.py``); everything else (store, trainers, reward, fleet,
evaluation) is domain-agnostic and talks through the functions here. No code outside the table
dispatches on a domain's name.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable

import gymnasium as gym
import numpy as np

import selfimprove.envs  # noqa: F401  (registers the environment ids)
from selfimprove.config import RunConfig
from selfimprove.domain_table import DOMAINS, Domain, resolve
from selfimprove.envs.experts import Expert
from selfimprove.envs.instructions import instruction_problem, task_problem
from selfimprove.errors import ConfigError, DatasetError
from selfimprove.model.decoders import MAX_JOINT_CLASSES
from selfimprove.model.policy import ModelSpec

if TYPE_CHECKING:
    from selfimprove.data.store import EpisodeStore

log = logging.getLogger(__name__)

# Seed ranges are disjoint so evaluation never replays a board seen in training.
DEMO_SEED_BASE = 0  # + run seed * 100_000 + episode
IMPROVE_SEED_BASE = 2_000_000_000


class EndOnSuccess(gym.Wrapper):
    """Ends an episode when ``info["is_success"]`` turns true, for envs without ``terminate_on_success``."""

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, bool(terminated or info.get("is_success", False)), truncated, info


def import_env_module(module: str) -> None:
    """Import ``env.module``: a module of your own whose import registers ``env.id`` with gymnasium."""
    if not module:
        return
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"env.module {module!r} cannot be imported ({exc}); install the package that holds it "
                          "or add its folder to PYTHONPATH") from exc


def _takes_keyword(env_id: str, name: str) -> bool:
    """Whether the constructor registered for ``env_id`` accepts the keyword ``name``."""
    spec = gym.spec(env_id)
    if name in (spec.kwargs or {}):
        return True
    try:
        creator = spec.entry_point if callable(spec.entry_point) else \
            gym.envs.registration.load_env_creator(spec.entry_point)
        params = inspect.signature(creator).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return True  # gym.make says what is wrong
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def make_env(config: RunConfig, **overrides: Any) -> gym.Env:
    """A gymnasium env for this run; ``overrides`` change constructor kwargs (e.g. termination).

    ``terminate_on_success`` (True in evaluation; False in Stage 2, where only the detector or the
    time limit ends an episode) goes to the env's constructor when it takes that keyword; otherwise
    True wraps the env in :class:`EndOnSuccess` and False leaves the env as it is.
    """
    import_env_module(config.env.module)
    kwargs = {**config.env.kwargs, **overrides}
    try:
        end_on_success = False
        if "terminate_on_success" in overrides and not _takes_keyword(config.env.id, "terminate_on_success"):
            end_on_success = bool(kwargs.pop("terminate_on_success"))
        env = gym.make(config.env.id, max_episode_steps=config.env.max_episode_steps, **kwargs)
    except gym.error.Error as exc:
        raise ConfigError(f"cannot make environment {config.env.id!r}: {exc}. Registered selfimprove ids: "
                          f"{sorted(k for k in gym.registry if k.startswith('selfimprove/'))}; an env of your own "
                          "must be registered with gymnasium.register by the module named in env.module "
                          "(docs/tutorial.md)") from exc
    except TypeError as exc:
        raise ConfigError(f"env.kwargs {kwargs} are not accepted by {config.env.id!r}: {exc}") from exc
    return EndOnSuccess(env) if end_on_success else env


def continue_on_board(env: gym.Env, rng: np.random.Generator) -> tuple[Any, dict[str, Any]] | str:
    """Reset-free practice: a new valid task on the board as it is, as ``(obs, info)``.

    Returns the reason a human reset is needed instead ("unusable" board or "no_task" valid for
    it). Envs opt in with ``new_task(rng)``, ``board_usable()`` and ``observe()``. The time-limit
    wrapper's step count restarts, as it would on a reset.
    """
    base = env.unwrapped
    if not all(hasattr(base, m) for m in ("new_task", "board_usable", "observe")):
        raise ConfigError(f"{type(base).__name__} does not support reset-free practice (it needs new_task(rng), "
                          "board_usable() and observe()); set fleet.reset_free=false")
    if not base.board_usable():
        return "unusable"
    if base.new_task(rng) is None:
        return "no_task"
    wrapper = env
    while isinstance(wrapper, gym.Wrapper):
        if isinstance(wrapper, gym.wrappers.TimeLimit):
            wrapper._elapsed_steps = 0
        wrapper = wrapper.env
    return base.observe()


def domain(name: str) -> Domain | None:
    """The table entry of a built-in domain, or None for a task of your own."""
    return DOMAINS.get(name)


def expert_for(config: RunConfig) -> Expert:
    """The domain's scripted demonstrator with the run's ``data.expert_*`` settings."""
    entry = domain(config.domain)
    if entry is None or not entry.expert:
        raise ConfigError(f"selfimprove has no scripted expert for {config.env.id!r}, so it cannot collect demos for "
                          "it: import your own (`selfimprove dataset import`, docs/tutorial.md) and point data.path "
                          "(--dataset) at the store")
    return resolve(entry.expert)(config)


def observation_dict(obs: Any) -> dict[str, np.ndarray]:
    """A gym observation -> the named arrays that the store keeps and the model reads.

    Camera observations arrive as the env's latest frames ``rgb`` [F, H, W, 3]; only the newest one
    is kept (as ``image``): the model's frame history is rebuilt from the episode, so nothing is
    stored twice. The instruction travels separately.
    """
    if isinstance(obs, dict):
        out = {k: np.asarray(v) for k, v in obs.items() if k not in ("instruction", "rgb")}
        if "rgb" in obs:
            out["image"] = np.asarray(obs["rgb"])[-1]
        return out
    return {"state": np.asarray(obs, dtype=np.float32)}


def instruction_of(obs: Any, info: dict[str, Any], env: gym.Env) -> str:
    if isinstance(obs, dict) and "instruction" in obs:
        return str(obs["instruction"])
    return str(info.get("instruction", getattr(env.unwrapped, "instruction", "")))


def model_spec(config: RunConfig, env: gym.Env) -> ModelSpec:
    """The model architecture for this run's env and model config."""
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        raise ConfigError(f"{config.env.id} has a {type(space).__name__} action space; only Box is supported")
    obs, _ = env.reset(seed=0)
    shapes = {k: list(v.shape) for k, v in observation_dict(obs).items()}
    m = config.model
    classes = m.action_bins ** int(np.prod(space.shape))
    if m.action_decoder == "joint" and classes > MAX_JOINT_CLASSES:
        raise ConfigError(f"model.action_decoder = 'joint' over {config.env.id}'s {int(np.prod(space.shape))}-D actions "
                          f"needs {m.action_bins} ** {int(np.prod(space.shape))} = {classes} classes (at most "
                          f"{MAX_JOINT_CLASSES}); use 'autoregressive' or fewer model.action_bins")
    return ModelSpec(domain=config.domain, obs_shapes=shapes, action_low=[float(x) for x in space.low],
                     action_high=[float(x) for x in space.high], action_bins=m.action_bins,
                     action_decoder=m.action_decoder,
                     max_steps=m.max_steps, hidden=m.hidden, layers=m.layers, dropout=m.dropout,
                     encoder=m.encoder, frames=m.frames, image_init=m.image_init, text_encoder=m.text_encoder,
                     channels=list(m.channels), hf_model=m.hf_model, hf_dtype=m.hf_dtype, hf_device=m.hf_device,
                     hf_train=m.hf_train, hf_batch_size=m.hf_batch_size, stg_never=config.sft.negatives > 0)


def _same_words(text: str) -> str:
    return " ".join(text.lower().split())


def goal_key_for(name: str) -> Callable[[str], Hashable]:
    """How to tell whether two instructions ask for the same thing in domain ``name`` (Stage 1's
    mismatched-instruction negatives must ask for something else); by default, the same words."""
    entry = domain(name)
    return resolve(entry.goal_key) if entry is not None and entry.goal_key else _same_words


def augmentation(name: str, augment: str) -> Callable:
    """SFT augmentation ``augment`` of domain ``name`` (``sft.augment``; the config checks that it exists)."""
    entry = domain(name)
    if entry is None or augment not in entry.augmentations:
        raise ConfigError(f"sft.augment {augment!r} is not defined for the {name!r} domain")
    return resolve(entry.augmentations[augment])


def domain_of_observations(shapes: dict[str, list[int]]) -> str | None:
    """The built-in domain whose episodes have these observations (key -> shape), or None.

    Each entry's ``observations`` mark its episodes (the point mass's are exactly ``state`` [6]; the
    tabletop's include the pusher's ``effector`` and ``effector_target`` [2], beside camera frames).
    """
    def fits(entry: Domain) -> bool:
        if entry.only_these_observations and set(shapes) != set(entry.observations):
            return False
        return all(list(shapes.get(k, ())) == list(shape) for k, shape in entry.observations.items())

    found = [d.name for d in DOMAINS.values() if fits(d)]
    return found[0] if len(found) == 1 else None


def states_drawing(name: str) -> Callable | None:
    """How domain ``name`` draws episodes that have no camera frames (``Domain.draw_states``), or None."""
    entry = domain(name)
    return resolve(entry.draw_states) if entry is not None and entry.draw_states else None


@dataclass(frozen=True)
class DomainViews:
    """A domain's label-preserving view changes for the guard (train/guard.py): its mirror, in words too,
    and optionally small random scene shifts (``shift(seed)`` gives one)."""

    mirror: Callable[[dict], dict]
    mirror_words: str
    shift: Callable[[int], Callable[[dict], dict]] | None = None


def _views(name: str | None) -> DomainViews | None:
    entry = domain(name or "")
    return resolve(entry.views) if entry is not None and entry.views else None


def views_for(name: str, shifts: int = 0) -> list[Callable[[dict], dict]]:
    """Label-preserving view changes of domain ``name``: the mirror first, then ``shifts`` random shifts.

    Empty for a domain without known symmetries (a task of your own): the guard then scores plain detections.
    """
    known = _views(name)
    if known is None:
        return []
    return [known.mirror] + ([known.shift(j) for j in range(shifts)] if known.shift is not None else [])


def describe_views(name: str | None, shifts: int) -> str:
    """The view changes of domain ``name`` in words, as :func:`views_for` makes them ('' if none)."""
    known = _views(name)
    if known is None:
        return ""
    return known.mirror_words + (f" and {shifts} small scene shifts" if known.shift is not None and shifts else "")


def check_store(store: "EpisodeStore", domain: str) -> None:
    """Raise DatasetError, before any frame is read, when ``store`` cannot train a ``domain`` model.

    Its episodes must not be another built-in domain's (told from its observation features), and
    every instruction in ``meta/tasks.parquet`` must be non-empty text (see :func:`instruction_problem`);
    instructions the domain's simulator cannot score (outside its task grammar: paraphrases, a real
    robot's free-form instructions) train all the same, with a warning. Every data file must hold the
    columns frames are read from. Reads meta/info.json (already loaded), the task table and the data
    files' Parquet footers only, and writes nothing.
    """
    shapes = store.observation_shapes
    held = domain_of_observations(shapes)
    if domain in DOMAINS and held is not None and held != domain:
        raise DatasetError(
            f"{store.root} holds {held} episodes (observations {shapes}) but the config is {domain!r}; "
            f"point data.path (--dataset) at a {domain} store (`selfimprove collect {domain} --out DIR`), "
            f"or use the {held!r} preset to train on this one")
    store.check_columns()
    instructions = store.instructions
    bad = [(i, text, problem) for i, text in enumerate(instructions)
           if (problem := instruction_problem(domain, text)) is not None]
    if bad:
        i, text, problem = bad[0]
        more = f" ({len(bad)} of its {len(instructions)} instructions are invalid)" if len(bad) > 1 else ""
        raise DatasetError(f"{store.root}/meta/tasks.parquet: task {i} {text!r} cannot train a {domain} model: "
                           f"{problem}{more}. Fix: give every episode a non-empty instruction (Episode.instruction "
                           "when you write the store, the task column when you import a LeRobot dataset) and write "
                           "the store again")
    free = [text for text in instructions if task_problem(domain, text) is not None]
    if free:
        log.warning("%s: %d of its %d instructions (e.g. %r) are outside the %s task grammar; the model trains on "
                    "them as they are, and the simulator evaluates on tasks of its own", store.root, len(free),
                    len(instructions), free[0], domain)
