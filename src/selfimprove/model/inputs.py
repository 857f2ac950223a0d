"""Model inputs from stored frames or live robots: frame history stacking and instructions.

Stores and robots keep one camera frame per step; the model sees the last ``spec.frames`` of them
(repeating the first frame at an episode's start), so nothing is stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfimprove.model.policy import ModelSpec


@dataclass
class FrameSource:
    """Rows of observations (whole episodes, in order) from which batches with history are gathered."""

    arrays: dict[str, torch.Tensor]
    frame_index: torch.Tensor  # [N] position of each row in its episode
    task_index: torch.Tensor  # [N] index into ``instructions``
    instructions: list[str]
    spec: ModelSpec

    def obs(self, idx: torch.Tensor) -> dict:
        out: dict = {}
        image_keys = set(self.spec.image_keys)
        for key in self.spec.obs_shapes:
            values = self.arrays[key]
            if key in image_keys:
                offsets = torch.arange(self.spec.frames - 1, -1, -1)
                back = torch.minimum(offsets[None, :], self.frame_index[idx][:, None])
                out[key] = values[idx[:, None] - back]
            else:
                out[key] = values[idx]
        out["instruction"] = [self.instructions[int(t)] for t in self.task_index[idx]]
        return out


def from_histories(histories: list[list[dict[str, np.ndarray]]], instructions: list[str], spec: ModelSpec) -> dict:
    """Batch the latest observation (with frame history) of each robot."""
    out: dict = {}
    image_keys = set(spec.image_keys)
    for key in spec.obs_shapes:
        if key in image_keys:
            stacks = []
            for history in histories:
                frames = [history[max(0, len(history) - spec.frames + i)][key] for i in range(spec.frames)]
                stacks.append(np.stack(frames))
            out[key] = torch.as_tensor(np.stack(stacks))
        else:
            out[key] = torch.as_tensor(np.stack([h[-1][key] for h in histories]))
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
