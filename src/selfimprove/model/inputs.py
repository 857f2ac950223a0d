"""Model inputs from stored frames or live robots: frame history stacking and instructions.

Stores and robots keep one camera frame per step; the model sees the last ``spec.frames`` of them
(repeating the first frame at an episode's start), so nothing is stored twice.

:func:`check_inputs` is the one place a batch is checked against the model's spec (the model runs it
on every forward pass): observation keys, shapes, channels and dtype once per batch, and that each
instruction is non-empty text, so a bad input raises :class:`~selfimprove.errors.InputError` naming
the problem and the fix instead of a torch error from deep inside the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from selfimprove.envs.instructions import instruction_problem
from selfimprove.errors import ConfigError, DatasetError, InputError

if TYPE_CHECKING:  # policy.py imports this module
    from selfimprove.data.store import Frames
    from selfimprove.model.policy import ModelSpec


def _image_fix(got: Sequence[int], shape: Sequence[int], frames: int) -> str:
    """What to do about camera frames of per-row shape ``got`` when the model takes ``shape`` [H, W, C]."""
    h, w, c = shape
    got = tuple(got)
    if got[-3:] == (c, h, w):
        return "frames are channels-last [H, W, C]: transpose channels-first ones, e.g. frame.transpose(1, 2, 0)"
    if got[-2:] == (h, w):
        return f"a grayscale frame has no colour axis: give [H, W, {c}], e.g. np.repeat(frame[..., None], {c}, axis=-1)"
    if got[-3:] == (h, w, 1):
        return f"a grayscale frame has 1 channel: give {c}, e.g. np.repeat(frame, {c}, axis=-1)"
    if len(got) >= 3 and got[-1] == c and got[-3:-1] != (h, w):
        return f"resize each frame to {h}x{w}, the size the model was trained on"
    if len(got) >= 3 and got[-3:] == (h, w, c):
        return f"stack the last {frames} frame(s) of each robot (model.inputs.from_histories does it)"
    return f"give each frame as [{h}, {w}, {c}] uint8 RGB"


def _batch_problem(spec: ModelSpec, key: str, got: tuple[int, ...]) -> str | None:
    """Why a batch ``got`` of observation ``key`` does not fit the spec (None when it does)."""
    shape = tuple(spec.obs_shapes[key])
    if len(shape) == 3:
        if got[1:] == (spec.frames, *shape) or (spec.frames == 1 and got[1:] == shape):
            return None
        return (f"camera observation {key!r} has shape {list(got)} but the model takes "
                f"[batch, {spec.frames} frame(s), {shape[0]}, {shape[1]}, {shape[2]}] uint8: "
                f"{_image_fix(got[1:], shape, spec.frames)}")
    if got[1:] == shape:
        return None
    return (f"observation {key!r} has shape {list(got)} but the model takes [batch, "
            f"{', '.join(map(str, shape))}]: give each robot's {key!r} as {list(shape)} (the shape it had in the "
            "training data)")


def check_instructions(domain: str, texts: Sequence[str]) -> None:
    """Raise InputError when an instruction is not text or is empty; any other text is read (a task
    grammar is the simulator's business, not the model's: ``envs/instructions.py``)."""
    try:
        distinct = set(texts)
    except TypeError as exc:
        raise InputError(f"instructions must be strings, got {[type(t).__name__ for t in texts][:4]}") from exc
    for text in distinct:
        problem = instruction_problem(domain, text)
        if problem is not None:
            raise InputError(f"instruction {text!r} cannot be read by a {domain!r} model: {problem}")


def check_inputs(spec: ModelSpec, obs: Mapping) -> None:
    """Raise InputError when ``obs`` does not fit a model of ``spec`` (see the module docstring).

    ``obs`` maps each of ``spec.obs_shapes``' keys to a torch tensor ``[B, *shape]`` (camera frames
    ``[B, spec.frames, H, W, C]`` uint8) and ``"instruction"`` to ``B`` strings (required by the
    trunks that read it, checked whenever present).
    """
    if not isinstance(obs, Mapping):
        raise InputError(f"the model takes a dict of observations, got {type(obs).__name__}; build one with "
                         "selfimprove.model.inputs.from_histories")
    batch: int | None = None
    for key in spec.obs_shapes:
        value = obs.get(key)
        if value is None:
            raise InputError(f"the observations lack {key!r} (they have {sorted(obs)}); the model reads "
                             f"{sorted(spec.obs_shapes)}: give every robot the observations it was trained on")
        if not isinstance(value, torch.Tensor):
            raise InputError(f"observation {key!r} is a {type(value).__name__}, not a torch tensor; convert it "
                             "with torch.as_tensor or build the batch with model.inputs.from_histories")
        got = tuple(value.shape)
        if not got:
            raise InputError(f"observation {key!r} is a scalar; the model takes a batch [batch, ...]")
        problem = _batch_problem(spec, key, got)
        if problem is not None:
            raise InputError(problem)
        if key in spec.image_keys and value.dtype != torch.uint8:
            raise InputError(f"camera observation {key!r} is {value.dtype}; the model takes uint8 RGB in 0..255 "
                             "(convert with (frame * 255).round().to(torch.uint8) if yours is float in 0..1)")
        if batch is not None and got[0] != batch:
            raise InputError(f"observation {key!r} holds {got[0]} rows but the others hold {batch}; "
                             "give every observation one row per robot")
        batch = got[0]
    texts = obs.get("instruction")
    if texts is None:
        if spec.encoder != "mlp":
            raise InputError(f"the observations lack 'instruction'; the {spec.encoder!r} trunk reads one "
                             "instruction string per row")
        return
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError(f"'instruction' must be a list of strings, one per row, got {type(texts).__name__}")
    if batch is not None and len(texts) != batch:
        raise InputError(f"{len(texts)} instructions for a batch of {batch} observations; give one per row")
    check_instructions(spec.domain, texts)


@dataclass
class FrameSource:
    """Rows of observations (whole episodes, in order) from which batches with history are gathered.

    Built once per dataset, it checks its arrays' shapes and instructions against ``spec`` then.
    """

    arrays: dict[str, torch.Tensor]
    frame_index: torch.Tensor  # [N] position of each row in its episode
    task_index: torch.Tensor  # [N] index into ``instructions``
    instructions: list[str]
    spec: ModelSpec

    def __post_init__(self) -> None:
        for key, shape in self.spec.obs_shapes.items():
            if key not in self.arrays:
                raise InputError(f"the frames lack observation {key!r} (they have {sorted(self.arrays)}); the "
                                 f"model reads {sorted(self.spec.obs_shapes)}")
            got = tuple(self.arrays[key].shape)
            if got[1:] != tuple(shape):
                rows = (got[0], *([self.spec.frames] if len(shape) == 3 else []), *got[1:])
                raise InputError(_batch_problem(self.spec, key, rows) or
                                 f"observation {key!r} has per-row shape {list(got[1:])}, not {list(shape)}")
        check_instructions(self.spec.domain, self.instructions)

    def obs(self, idx: torch.Tensor) -> dict:
        out: dict = {}
        image_keys = set(self.spec.image_keys)
        for key in self.spec.obs_shapes:
            values = self.arrays[key]
            if key in image_keys:
                offsets = torch.arange(self.spec.frames - 1, -1, -1)
                back = torch.minimum(offsets[None, :], self.frame_index[idx][:, None])
                rows = (idx[:, None] - back).reshape(-1)  # index_select copies whole frames: ~2x advanced indexing
                out[key] = values.index_select(0, rows).view(len(idx), self.spec.frames, *values.shape[1:])
            else:
                out[key] = values[idx]
        out["instruction"] = [self.instructions[t] for t in self.task_index[idx].tolist()]
        return out


def _check_rows(key: str, rows: list[tuple[int, np.ndarray]], spec: ModelSpec) -> None:
    """Raise InputError naming the robot whose ``key`` (a frame or a vector: ``(robot, value)``) has another shape."""
    want = tuple(spec.obs_shapes[key])
    for robot, value in rows:
        got = np.shape(value)
        if got != want:
            fix = (_image_fix(got, want, spec.frames) if len(want) == 3 else
                   f"give it as {list(want)}, the shape it had in the training data")
            raise InputError(f"robot {robot}'s observation {key!r} has shape {list(got)} but the model takes "
                             f"{list(want)}{' uint8' if len(want) == 3 else ''}: {fix}")


def from_histories(histories: list[list[dict[str, np.ndarray]]], instructions: list[str], spec: ModelSpec) -> dict:
    """Batch the latest observation (with frame history) of each robot.

    Raises InputError naming the robot when an observation is missing or has another shape than the
    model's, or when there is not one instruction per robot (the robots are looked at one by one only
    when the stacked batch does not fit).
    """
    if len(instructions) != len(histories):
        raise InputError(f"{len(instructions)} instructions for {len(histories)} robots; give one per robot")
    if any(not h for h in histories):
        raise InputError("a robot has no observations yet; reset it before asking the model")
    out: dict = {}
    image_keys = set(spec.image_keys)
    for key in spec.obs_shapes:
        missing = [i for i, h in enumerate(histories) if key not in h[-1]]
        if missing:
            raise InputError(f"robot {missing[0]}'s observation lacks {key!r} (it has "
                             f"{sorted(histories[missing[0]][-1])}); the model reads {sorted(spec.obs_shapes)}")
        if key in image_keys:
            stacks = [[history[max(0, len(history) - spec.frames + i)][key] for i in range(spec.frames)]
                      for history in histories]
            rows = [(r, frame) for r, frames in enumerate(stacks) for frame in frames]
        else:
            stacks = [h[-1][key] for h in histories]
            rows = list(enumerate(stacks))
        try:
            batch = np.stack([np.stack(x) for x in stacks]) if key in image_keys else np.stack(stacks)
        except ValueError:  # robots disagree on the shape: name the first that is wrong
            _check_rows(key, rows, spec)
            raise
        if batch.shape[1:] != (*([spec.frames] if key in image_keys else []), *spec.obs_shapes[key]):
            _check_rows(key, rows, spec)  # every robot has the same wrong shape
        out[key] = torch.as_tensor(batch)
    out["instruction"] = list(instructions)
    return out


def from_episodes(episodes, spec: ModelSpec) -> tuple[FrameSource, torch.Tensor]:
    """All frames of ``episodes`` as a FrameSource, and the rows where an action was taken (t < T)."""
    instructions = sorted({e.instruction for e in episodes})
    lookup = {t: i for i, t in enumerate(instructions)}
    arrays = {k: torch.as_tensor(np.concatenate([e.observations[k] for e in episodes])) for k in spec.obs_shapes}
    frame_index = torch.as_tensor(np.concatenate([np.arange(e.length + 1) for e in episodes]))
    task_index = torch.as_tensor(np.concatenate([np.full(e.length + 1, lookup[e.instruction]) for e in episodes]))
    is_last = np.concatenate([np.arange(e.length + 1) == e.length for e in episodes])
    acting = torch.as_tensor(np.flatnonzero(~is_last))
    return FrameSource(arrays, frame_index, task_index, instructions, spec), acting


def check_observation_shapes(spec: ModelSpec, shapes: dict[str, list[int]], source: str, fix: str) -> None:
    """Raise ConfigError when ``source`` gives observations of other shapes than the model expects."""
    for key, expected in spec.obs_shapes.items():
        got = shapes.get(key)
        if got is None:
            raise ConfigError(f"{source} has no observation {key!r} (it has {sorted(shapes)}); the model needs it: "
                              f"{fix}")
        if list(got) != list(expected):
            raise ConfigError(f"{source} gives {key!r} of shape {list(got)} but the model expects {list(expected)}; {fix}")


def frame_source(frames: Frames, spec: ModelSpec) -> FrameSource:
    """Stored frames as model inputs, after checking they have the shapes the model expects."""
    try:
        check_observation_shapes(spec, {k: list(v.shape[1:]) for k, v in frames.observations.items()},
                                 "the dataset", "collect it with the same env config as this run, or import it "
                                 "with `selfimprove dataset import --map LEROBOT_FEATURE=OUR_KEY` so that "
                                 "its observation keys are the env's")
    except ConfigError as exc:
        raise DatasetError(str(exc)) from exc
    return FrameSource({k: torch.as_tensor(frames.observations[k]) for k in spec.obs_shapes},
                       torch.as_tensor(frames.frame_index), torch.as_tensor(frames.task_index),
                       frames.instructions, spec)
