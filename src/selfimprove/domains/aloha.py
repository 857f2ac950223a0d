"""The aloha domain's parts (named in ``domain_table.DOMAINS``): how its demos are collected. It has no
SFT augmentations (the two arms are not mirror images of each other's task), no guard views and one
instruction."""

from __future__ import annotations

import numpy as np

from selfimprove.config import RunConfig
from selfimprove.data.episode import Episode
from selfimprove.envs.experts import Expert


def expert(config: RunConfig) -> Expert:
    """The scripted bimanual insertion expert, with the run's joint-target noise (rad)."""
    from selfimprove.envs.aloha.expert import AlohaExpert

    return AlohaExpert(noise=config.data.expert_noise)


LIFTED, ON_TABLE = 0.06, 0.03  # peg centre heights (m): held up, and back down (it rests at 0.01)


def peg_dropped(episode: Episode) -> int | None:
    """The first frame the peg is back on the table after it was lifted (None: never dropped, or not recorded)."""
    if "peg_position" not in episode.info:
        return None
    height = np.asarray(episode.info["peg_position"])[:, 2]
    lifted = np.flatnonzero(height > LIFTED)
    if not len(lifted):
        return None
    down = np.flatnonzero(height[lifted[0]:] < ON_TABLE)
    return int(lifted[0] + down[0]) if len(down) else None
