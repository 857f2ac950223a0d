"""What differs between domains: the env, its expert, and how observations reach the model.

Everything else (store, trainers, reward, fleet, evaluation) is domain-agnostic and talks through
the functions here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import TYPE_CHECKING, Any, Callable, Hashable

import gymnasium as gym
import numpy as np
import torch

import selfimprove.envs  # noqa: F401  (registers the environment ids)
from selfimprove.config import RunConfig
from selfimprove.envs.experts import Expert, make_expert
from selfimprove.envs.instructions import instruction_problem
from selfimprove.envs.tabletop.tasks import goal_key
from selfimprove.errors import ConfigError, DatasetError
from selfimprove.model.policy import ModelSpec

if TYPE_CHECKING:
    from selfimprove.data.store import EpisodeStore

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


def expert_for(config: RunConfig) -> Expert:
    if "PointMass" not in config.env.id and "Tabletop" not in config.env.id:
        raise ConfigError(f"selfimprove has no scripted expert for {config.env.id!r}, so it cannot collect demos for "
                          "it: import your own (`selfimprove dataset import`, docs/tutorial.md) and point data.path "
                          "(--dataset) at the store")
    if "PointMass" in config.env.id:
        return make_expert(config.env.id, n_waypoints=config.data.expert_waypoints)
    return make_expert(config.env.id, noise_scale=config.data.expert_noise,
                       detour_prob=config.data.expert_detour_prob)


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
    return ModelSpec(domain=config.domain, obs_shapes=shapes, action_low=[float(x) for x in space.low],
                     action_high=[float(x) for x in space.high], action_bins=m.action_bins,
                     max_steps=m.max_steps, hidden=m.hidden, layers=m.layers, dropout=m.dropout,
                     encoder=m.encoder, frames=m.frames, image_init=m.image_init, text_encoder=m.text_encoder,
                     channels=list(m.channels), hf_model=m.hf_model, hf_dtype=m.hf_dtype, hf_device=m.hf_device,
                     hf_train=m.hf_train, hf_batch_size=m.hf_batch_size, stg_never=config.sft.negatives > 0)


_LEFT_RIGHT = {"left": "right", "right": "left"}


def mirror_instruction(text: str) -> str:
    """Swap 'left' and 'right' (block names and block2block goals are mirror-invariant)."""
    return " ".join(_LEFT_RIGHT.get(w, w) for w in text.split(" "))


def mirror_tabletop(obs: dict, tokens: torch.Tensor, bins: int, rows: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Mirror the board left-right for the chosen batch ``rows``: image columns, y coordinates, dy.

    The board is symmetric about y = 0 and image columns run along y, so the mirrored sample is
    as valid a demonstration as the original; action bins are symmetric about 0.
    """
    obs, tokens = _reflect_tabletop(obs, tokens, bins, rows, axis=1)
    if bool(rows.any()):
        obs["instruction"] = [mirror_instruction(t) if bool(r) else t for t, r in zip(obs["instruction"], rows)]
    return obs, tokens


def _reflect_tabletop(obs: dict, tokens: torch.Tensor, bins: int, rows: torch.Tensor,
                      axis: int) -> tuple[dict, torch.Tensor]:
    """Reflect the board about its centre line in ``axis`` (0: x, image rows; 1: y, image columns) for
    the chosen ``rows``: the image, that coordinate of the effector and its target, and that action bin."""
    from selfimprove.envs.tabletop.board import VIEW_X, VIEW_Y

    obs = dict(obs)
    if not bool(rows.any()):
        return obs, tokens
    image = obs["image"].clone()
    image[rows] = image[rows].flip(-3 + axis)  # [..., H, W, 3]: H is x, W is y
    obs["image"] = image
    lo, hi = (VIEW_X, VIEW_Y)[axis]
    for key in ("effector", "effector_target"):
        if key in obs:
            v = obs[key].clone()
            v[rows, axis] = (lo + hi) - v[rows, axis]
            obs[key] = v
    tokens = tokens.clone()
    tokens[rows, axis] = bins - 1 - tokens[rows, axis]
    return obs, tokens


def shift_tabletop(obs: dict, tokens: torch.Tensor, bins: int, rows: torch.Tensor, max_pixels: int = 3,
                   generator: torch.Generator | None = None) -> tuple[dict, torch.Tensor]:
    """Translate the whole scene by a few pixels for the chosen ``rows``: image and coordinates together.

    The image is padded with its edge and cropped at a random offset; the effector and its target
    move by the same distance in metres, so the sample stays a consistent scene (actions are deltas
    and steps-to-go are unchanged).
    """
    from selfimprove.envs.tabletop.board import VIEW_X, VIEW_Y

    obs = dict(obs)
    image = obs["image"]
    h, w = image.shape[-3], image.shape[-2]
    metres_per_row, metres_per_col = (VIEW_X[1] - VIEW_X[0]) / h, (VIEW_Y[1] - VIEW_Y[0]) / w
    k = max_pixels
    offsets = torch.randint(-k, k + 1, (len(rows), 2), generator=generator)
    offsets[~rows] = 0
    # Edge padding then a crop at the offset is a gather at clamped pixel indices: one torch.gather on
    # the uint8 batch (2.5x faster than the equivalent advanced indexing).
    r = (torch.arange(h)[None, :] + offsets[:, :1]).clamp(0, h - 1)  # [B, h]
    c = (torch.arange(w)[None, :] + offsets[:, 1:]).clamp(0, w - 1)  # [B, w]
    flat = image.reshape(len(rows), -1, h * w, image.shape[-1])  # [B, frames, pixels, channels]
    pixel = (r[:, :, None] * w + c[:, None, :]).reshape(len(rows), 1, h * w, 1).expand_as(flat)
    obs["image"] = torch.gather(flat, 2, pixel).reshape(image.shape)
    delta = torch.stack([-offsets[:, 0] * metres_per_row, -offsets[:, 1] * metres_per_col], dim=1).float()
    for key in ("effector", "effector_target"):
        if key in obs:
            obs[key] = obs[key] + delta
    return obs, tokens


#: words of absolute-location instructions; the top-bottom flip leaves such rows alone, because the
#: original's locations sit 0.025 m off the board's centre line in x (a flipped goal would be wrong).
_LOCATION_WORDS = frozenset({"top", "bottom", "upper", "lower", "base", "center", "middle", "left", "right",
                             "side", "corner"})


def flip_tabletop(obs: dict, tokens: torch.Tensor, bins: int, rows: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Flip the board top-bottom for the chosen ``rows``: image rows, x coordinates, dx.

    Walls, spawn region and physics are symmetric about the board's centre line in x, so for a task
    between blocks (block2block) the flipped sample is as valid a demonstration as the original.
    Rows whose instruction names an absolute location are not flipped (see ``_LOCATION_WORDS``).
    """
    rows = rows & torch.tensor([not (_LOCATION_WORDS & set(t.split(" "))) for t in obs["instruction"]],
                               dtype=torch.bool)
    return _reflect_tabletop(obs, tokens, bins, rows, axis=0)


def recolour_tabletop(obs: dict, tokens: torch.Tensor, bins: int, rows: torch.Tensor,
                      generator: torch.Generator | None = None) -> tuple[dict, torch.Tensor]:
    """Permute the four block colours for the chosen ``rows``, in the pixels and the instruction together.

    Colour is only a name: the physics and the expert ignore it, so swapping, say, red and blue in
    the frames and in "push the red moon to the blue cube" keeps the sample a valid demonstration.
    It yields colour-shape pairs the block set never holds ("blue pentagon"), which is the point:
    the model has to find blocks by colour *and* shape instead of memorising eight names. The renderer
    draws without anti-aliasing, so every block pixel is exactly one palette colour; other pixels
    (board, pusher, novel objects) are left as they are.
    """
    obs = dict(obs)
    if not bool(rows.any()):
        return obs, tokens
    names, codes, by_code, key_by_code = _palette_codes()
    sel = rows.nonzero().squeeze(1)
    # one permutation per batch row (chosen or not), so the random stream does not depend on the rows
    perms = torch.stack([torch.randperm(len(names), generator=generator) for _ in range(len(rows))])[sel]
    image = obs["image"]
    chosen = image[sel]
    flat = chosen.reshape(len(sel), -1, 3)  # [b, pixels, 3]
    red, green, blue = flat[..., 0], flat[..., 1], flat[..., 2]
    code = ((red > 200).to(torch.uint8) * 4 + (green > 200).to(torch.uint8) * 2 + (blue > 200).to(torch.uint8)).long()
    key = (red.int() << 16) | (green.int() << 8) | blue.int()
    table = by_code.expand(len(sel), 8, 3).clone()  # [b, code, rgb]
    table[:, codes] = by_code[codes[perms]]
    exact = key == key_by_code[code]
    new = torch.gather(table, 1, code[..., None].expand(-1, -1, 3))
    recoloured = image.clone()
    recoloured[sel] = torch.where(exact[..., None], new, flat).reshape(chosen.shape)
    obs["image"] = recoloured
    instructions = list(obs["instruction"])
    for i, p in zip(sel.tolist(), perms):
        words = {names[c]: names[int(p[c])] for c in range(len(names))}
        instructions[i] = " ".join(words.get(w, w) for w in instructions[i].split(" "))
    obs["instruction"] = instructions
    return obs, tokens


@functools.lru_cache(maxsize=1)
def _palette_codes() -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block colours' names, 3-bit codes, RGB by code and packed RGB by code (-1 where no block colour).

    Each palette colour has its own pattern of channels above 200 (board and pusher too), so a 3-bit
    code per pixel names its colour and one gather per pixel recolours it; a pixel whose packed RGB
    is not exactly its code's block colour (board, pusher, a novel object) keeps its colour.
    """
    from selfimprove.envs.tabletop.board import COLOURS_RGB

    names = list(COLOURS_RGB)
    by_code = torch.zeros(8, 3, dtype=torch.uint8)
    key_by_code = torch.full((8,), -1, dtype=torch.int32)
    codes = []
    for name in names:
        r, g, b = COLOURS_RGB[name]
        code = 4 * (r > 200) + 2 * (g > 200) + (b > 200)
        by_code[code] = torch.tensor((r, g, b), dtype=torch.uint8)
        key_by_code[code] = (r << 16) | (g << 8) | b
        codes.append(code)
    return names, torch.tensor(codes), by_code, key_by_code


AUGMENTATIONS = {name: {"language-table": fn} for name, fn in
                 (("mirror", mirror_tabletop), ("shift", shift_tabletop), ("flip", flip_tabletop),
                  ("recolour", recolour_tabletop))}


def _same_words(text: str) -> str:
    return " ".join(text.lower().split())


#: instruction -> what it asks for, per domain (see envs.tabletop.tasks.goal_key); other domains: the words
GOAL_KEYS = {"language-table": goal_key}


def goal_key_for(domain: str) -> Callable[[str], Hashable]:
    """How to tell whether two instructions ask for the same thing in ``domain`` (Stage 1's
    mismatched-instruction negatives must ask for something else)."""
    return GOAL_KEYS.get(domain, _same_words)


#: the observations that mark a built-in domain's episodes (a store's ``observation.*`` features):
#: key -> per-frame shape (camera frames, of any size, are not a mark)
DOMAIN_OBSERVATIONS: dict[str, dict[str, list[int]]] = {
    "pointmass": {"state": [6]},
    "language-table": {"effector": [2], "effector_target": [2]},
}


def domain_of_observations(shapes: dict[str, list[int]]) -> str | None:
    """The built-in domain whose episodes have these observations (key -> shape), or None.

    The point mass's are exactly ``state`` [6]; the tabletop's include the pusher's ``effector`` and
    ``effector_target`` [2] (and camera frames, when the env renders them).
    """
    def fits(domain: str) -> bool:
        marks = DOMAIN_OBSERVATIONS[domain]
        if domain == "pointmass" and set(shapes) != set(marks):
            return False
        return all(list(shapes.get(k, ())) == shape for k, shape in marks.items())

    found = [d for d in DOMAIN_OBSERVATIONS if fits(d)]
    return found[0] if len(found) == 1 else None


def check_store(store: "EpisodeStore", domain: str) -> None:
    """Raise DatasetError, before any frame is read, when ``store`` cannot train a ``domain`` model.

    Its episodes must not be another built-in domain's (told from its observation features), and
    every instruction in ``meta/tasks.parquet`` must be one of ``domain`` (see :func:`instruction_problem`).
    Reads meta/info.json (already loaded) and the task table only, and writes nothing.
    """
    shapes = store.observation_shapes
    held = domain_of_observations(shapes)
    if domain in DOMAIN_OBSERVATIONS and held is not None and held != domain:
        raise DatasetError(
            f"{store.root} holds {held} episodes (observations {shapes}) but the config is {domain!r}; "
            f"point data.path (--dataset) at a {domain} store (`selfimprove collect {domain} --out DIR`), "
            f"or use the {held!r} preset to train on this one")
    instructions = store.instructions
    bad = [(i, text, problem) for i, text in enumerate(instructions)
           if (problem := instruction_problem(domain, text)) is not None]
    if not bad:
        return
    i, text, problem = bad[0]
    more = f" ({len(bad)} of its {len(instructions)} instructions are invalid)" if len(bad) > 1 else ""
    empty = not isinstance(text, str) or not text.strip()
    fix = ("give every episode a non-empty instruction (Episode.instruction when you write the store, the task "
           "column when you import a LeRobot dataset) and write the store again" if empty else
           f"correct the task text and write the store again, or, for a task of your own, set domain to its "
           f"name (the {domain!r} domain only takes its own instructions)")
    raise DatasetError(f"{store.root}/meta/tasks.parquet: task {i} {text!r} is not a {domain} instruction: "
                       f"{problem}{more}. Fix: {fix}")
