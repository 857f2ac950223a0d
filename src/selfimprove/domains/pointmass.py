"""The point-mass domain's parts (named in ``domain_table.DOMAINS``): its demonstrator, the guard's
label-preserving view (the mirror about y = 0) and how its camera-less episodes are drawn for videos.
It has no SFT augmentations and no instruction grammar."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from selfimprove.config import RunConfig
from selfimprove.domains import DomainViews
from selfimprove.envs.experts import Expert


def expert(config: RunConfig) -> Expert:
    """The PD expert that visits ``data.expert_waypoints`` random waypoints before the goal."""
    from selfimprove.envs.pointmass import PointMassExpert

    return PointMassExpert(n_waypoints=config.data.expert_waypoints)


def _mirror_view(obs: dict) -> dict:
    """The point mass mirrored about y = 0 (walls and goal region are symmetric): y, vy, gy flip."""
    out = dict(obs)
    state = obs["state"].clone()
    state[:, [1, 3, 5]] = -state[:, [1, 3, 5]]
    out["state"] = state
    return out


VIEWS = DomainViews(_mirror_view, "the mirror about y = 0")


def pointmass_frame(state: np.ndarray, trail: np.ndarray, success_radius: float, size: int = 256
                    ) -> np.ndarray:
    """Top-down view of the point-mass arena [-1, 1]^2 (y up): goal disc, path so far, the point."""
    img = Image.new("RGB", (size, size), (40, 40, 46))
    draw = ImageDraw.Draw(img)

    def pix(x: float, y: float) -> tuple[float, float]:
        return ((x + 1) / 2 * (size - 1), (1 - y) / 2 * (size - 1))

    gx, gy = pix(float(state[4]), float(state[5]))
    r = success_radius / 2 * (size - 1)
    draw.ellipse([gx - r, gy - r, gx + r, gy + r], fill=(50, 120, 60), outline=(90, 200, 100))
    if len(trail) > 1:
        draw.line([pix(float(x), float(y)) for x, y in trail], fill=(120, 120, 150), width=2)
    px, py = pix(float(state[0]), float(state[1]))
    draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=(245, 245, 245))
    draw.rectangle([0, 0, size - 1, size - 1], outline=(150, 150, 150))
    return np.asarray(img)


def draw_states(obs: dict[str, np.ndarray], config: RunConfig, size: int) -> list[np.ndarray]:
    """One top-down frame per step of an episode's ``state`` observations (none when they are not 6-D)."""
    if "state" not in obs or obs["state"].shape[-1] < 6:
        return []
    radius = float(config.env.kwargs.get("success_radius", 0.15))
    state = np.asarray(obs["state"], dtype=np.float64)
    return [pointmass_frame(state[t], state[: t + 1, :2], radius, size) for t in range(len(state))]
