"""The aloha domain's parts (named in ``domain_table.DOMAINS``): how its demos are collected. It has no
SFT augmentations (the two arms are not mirror images of each other's task), no guard views and one
instruction."""

from __future__ import annotations

from selfimprove.config import RunConfig
from selfimprove.envs.experts import Expert


def expert(config: RunConfig) -> Expert:
    """The scripted bimanual insertion expert, with the run's joint-target noise (rad)."""
    from selfimprove.envs.aloha.expert import AlohaExpert

    return AlohaExpert(noise=config.data.expert_noise)
