"""The board of the tabletop world: the original's workspace and physical constants, and the objects on it.

Numbers follow the original LanguageTable simulator (metres, kilograms, seconds; docs/tabletop.md).
Every object is a rigid body with convex collision pieces and an outline to draw, built here once
per shape (``GEOMETRY``); ``object_look`` names an object's shape and colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from selfimprove.errors import ConfigError


# ---------------------------------------------------------------------------------------------
# Constants of the original (metres, kilograms, seconds)
# ---------------------------------------------------------------------------------------------
X_BOUNDS = (0.15, 0.60)
Y_BOUNDS = (-0.3048, 0.3048)
SPAWN_SHRINK = 0.08
SPAWN_X = (X_BOUNDS[0] + SPAWN_SHRINK, X_BOUNDS[1] - SPAWN_SHRINK)
SPAWN_Y = (Y_BOUNDS[0] + SPAWN_SHRINK, Y_BOUNDS[1] - SPAWN_SHRINK)
PUSHER_RADIUS = 0.0127
BLOCK_MASS = 0.01
BLOCK_FRICTION = 0.5
PUSHER_FRICTION = 1.0
MIN_BLOCK_PUSHER_DISTANCE = 0.06
ACTION_LIMIT = 0.1
CONTROL_HZ = 10.0
GRAVITY = 9.81

#: walls sit this far outside the workspace bounds, so the pusher (whose centre is clipped to the
#: bounds) never touches them but blocks cannot leave the table.
WALL_MARGIN = 0.025
#: the rendered area is the table inside the walls.
VIEW_X = (X_BOUNDS[0] - WALL_MARGIN, X_BOUNDS[1] + WALL_MARGIN)
VIEW_Y = (Y_BOUNDS[0] - WALL_MARGIN, Y_BOUNDS[1] + WALL_MARGIN)
#: a block whose centre is farther than this outside the bounds counts as stuck (board unusable).
USABLE_MARGIN = 0.012
#: the banana lies flat against a wall with its centre ~0.01 m outside the bounds, where the pusher
#: (its centre clipped to the bounds) can never get behind it: any centre outside the bounds is stuck.
NOVEL_USABLE_MARGIN = {"banana": -0.02}

FOOTPRINTS = {  # (extent along body x, extent along body y), metres
    "cube": (0.0397, 0.0397),
    "moon": (0.0525, 0.0257),
    "star": (0.0444, 0.0408),
    "pentagon": (0.0444, 0.0413),
}
COLOURS_RGB = {
    "red": (255, 102, 102),
    "blue": (102, 102, 255),
    "green": (102, 255, 102),
    "yellow": (255, 255, 102),
}
#: novel objects (BananaTable): never in a demo, named by themselves; (length, depth) of the
#: bounding box in the body frame, metres, and a colour of their own.
NOVEL_FOOTPRINTS = {"banana": (0.088, 0.030)}
NOVEL_COLOURS_RGB = {"banana": (250, 215, 40)}
BOARD_RGB = (48, 48, 48)
PUSHER_RGB = (205, 205, 205)


# ---------------------------------------------------------------------------------------------
# Block geometry (body frame, metres, centroid at the origin)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockGeometry:
    """Convex collision pieces and a (possibly concave) outline for drawing, both in the body frame."""

    pieces: tuple[np.ndarray, ...]
    outline: np.ndarray
    radius: float  # bounding circle radius around the centroid


def _fit_box(points: np.ndarray, size: tuple[float, float]) -> np.ndarray:
    """Scales points so their bounding box is exactly `size`."""
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) * (np.asarray(size) / (hi - lo))


def _area_centroid(pieces: list[np.ndarray]) -> np.ndarray:
    total, acc = 0.0, np.zeros(2)
    for p in pieces:
        x, y = p[:, 0], p[:, 1]
        xn, yn = np.roll(x, -1), np.roll(y, -1)
        cross = x * yn - xn * y
        a = cross.sum() / 2
        c = np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * a)
        total += a
        acc += a * c
    return acc / total


def _regular(n: int, radius: float, phase: float) -> np.ndarray:
    ang = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(ang), radius * np.sin(ang)], 1)


def _make_geometry(shape: str) -> BlockGeometry:
    size = FOOTPRINTS.get(shape, (1.0, 1.0))
    if shape == "cube":
        outline = _fit_box(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), size)
        pieces = [outline]
    elif shape == "pentagon":
        outline = _fit_box(_regular(5, 1.0, np.pi / 2), size)
        pieces = [outline]
    elif shape == "star":
        outer = _regular(5, 1.0, np.pi / 2)
        inner = _regular(5, 0.55, np.pi / 2 + np.pi / 5)
        outline = np.empty((10, 2))
        outline[0::2], outline[1::2] = outer, inner
        outline = _fit_box(outline, size)
        outer, inner = outline[0::2], outline[1::2]
        pieces = [inner] + [np.stack([inner[i - 1], outer[i], inner[i]]) for i in range(5)]
    elif shape == "moon":
        outline, pieces = _moon(size)
    elif shape == "banana":
        outline, pieces = _banana(NOVEL_FOOTPRINTS[shape])
    else:
        raise ConfigError(f"unknown shape {shape!r}; valid shapes: {', '.join([*FOOTPRINTS, *NOVEL_FOOTPRINTS])}")
    centre = _area_centroid(pieces)
    pieces = [p - centre for p in pieces]
    outline = outline - centre
    radius = float(np.linalg.norm(outline, axis=1).max())
    return BlockGeometry(tuple(np.ascontiguousarray(p) for p in pieces), np.ascontiguousarray(outline), radius)


def _moon(size: tuple[float, float], n: int = 5) -> tuple[np.ndarray, list[np.ndarray]]:
    """A crescent: outer arc through the horn tips and the apex, inner arc cut out; n convex quads."""
    w, d = size
    horn = 0.18 * w  # the horn tips are this wide
    thickness = 0.5 * d  # crescent thickness at the middle
    t = np.linspace(-1, 1, n + 1)
    outer = np.stack([t * w / 2, d * (1 - t**2) ** 0.6], 1)
    inner_half = w / 2 - horn
    inner = np.stack([t * inner_half, (d - thickness) * (1 - t**2) ** 0.6], 1)
    # join the horn tips: outer and inner start/end at y=0
    pieces = [np.stack([outer[i], outer[i + 1], inner[i + 1], inner[i]]) for i in range(n)]
    pieces = [p[::-1] if signed_area(p) < 0 else p for p in pieces]
    outline = np.concatenate([outer, inner[::-1]])
    lo, hi = outline.min(0), outline.max(0)
    scale, mid = np.asarray(size) / (hi - lo), (lo + hi) / 2
    return (outline - mid) * scale, [(p - mid) * scale for p in pieces]


def _banana(size: tuple[float, float], n: int = 8) -> tuple[np.ndarray, list[np.ndarray]]:
    """A banana: a curved body, thick in the middle and tapering to blunt tips, with a short stem.

    The centreline is a parabolic arc; each of the n body pieces spans a vertical strip between
    the outer and inner edges (a trapezoid, hence convex) and the stem is one more trapezoid along
    the tangent at the +x tip. The whole outline is then scaled to the footprint ``size``.
    """
    length, sagitta, h_mid, h_tip = 1.0, 0.17, 0.115, 0.03  # relative to the body length
    stem_len, h_stem = 0.09, 0.022
    t = np.linspace(-1, 1, n + 1)
    x = t * length / 2
    centre = sagitta * (1 - t**2)
    half = h_tip + (h_mid - h_tip) * (1 - t**2) ** 0.7
    outer, inner = np.stack([x, centre + half], 1), np.stack([x, centre - half], 1)
    pieces = [np.stack([inner[i], inner[i + 1], outer[i + 1], outer[i]]) for i in range(n)]
    slope = -4 * sagitta / length  # d(centre)/dx at the +x tip
    x0, x1 = length / 2, length / 2 + stem_len
    stem = np.array([[x0, -h_stem], [x1, -h_stem + slope * stem_len], [x1, h_stem + slope * stem_len], [x0, h_stem]])
    pieces.append(stem)
    pieces = [p[::-1] if signed_area(p) < 0 else p for p in pieces]
    outline = np.concatenate([inner, stem, outer[::-1]])
    lo, hi = outline.min(0), outline.max(0)
    scale, mid = np.asarray(size) / (hi - lo), (lo + hi) / 2
    return (outline - mid) * scale, [(p - mid) * scale for p in pieces]


def signed_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum() / 2)


GEOMETRY = {shape: _make_geometry(shape) for shape in (*FOOTPRINTS, *NOVEL_FOOTPRINTS)}


def object_look(name: str) -> tuple[BlockGeometry, tuple[int, int, int]]:
    """Geometry and colour of a '<colour> <shape>' block or of a novel object named by itself."""
    if name in NOVEL_FOOTPRINTS:
        return GEOMETRY[name], NOVEL_COLOURS_RGB[name]
    colour, shape = name.split()
    return GEOMETRY[shape], COLOURS_RGB[colour]
