"""The tabletop world's fast top-down renderer: block outlines and the pusher drawn with PIL."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from selfimprove.envs.tabletop.board import BOARD_RGB, PUSHER_RADIUS, PUSHER_RGB, VIEW_X, VIEW_Y, BlockGeometry


class Renderer:
    """Top-down rasteriser: image rows follow +x (row 0 = 'top', near the robot), columns follow +y."""

    def __init__(self, geoms: list[BlockGeometry], colours: list[tuple[int, int, int]], hw: tuple[int, int]):
        self.h, self.w = hw
        self.colours = colours
        self.sx = self.h / (VIEW_X[1] - VIEW_X[0])
        self.sy = self.w / (VIEW_Y[1] - VIEW_Y[0])
        self.counts = [len(g.outline) for g in geoms]
        ends = np.cumsum(self.counts) * 2
        self.slices = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
        self.verts = np.concatenate([g.outline for g in geoms])
        self.owner = np.repeat(np.arange(len(geoms)), self.counts)
        self.background = Image.new("RGB", (self.w, self.h), BOARD_RGB)
        self.pr_row = PUSHER_RADIUS * self.sx
        self.pr_col = PUSHER_RADIUS * self.sy

    def draw(self, xy: np.ndarray, angles: np.ndarray, pusher: np.ndarray) -> np.ndarray:
        c, s = np.cos(angles)[self.owner], np.sin(angles)[self.owner]
        vx, vy = self.verts[:, 0], self.verts[:, 1]
        wx = c * vx - s * vy + xy[self.owner, 0]
        wy = s * vx + c * vy + xy[self.owner, 1]
        pix = np.empty((len(wx), 2))
        pix[:, 0] = (wy - VIEW_Y[0]) * self.sy - 0.5  # PIL x = column
        pix[:, 1] = (wx - VIEW_X[0]) * self.sx - 0.5  # PIL y = row
        img = self.background.copy()
        draw = ImageDraw.Draw(img)
        flat = pix.ravel().tolist()
        for (a, b), colour in zip(self.slices, self.colours):
            draw.polygon(flat[a:b], fill=colour)
        pr, pc = (pusher[0] - VIEW_X[0]) * self.sx - 0.5, (pusher[1] - VIEW_Y[0]) * self.sy - 0.5
        draw.ellipse((pc - self.pr_col, pr - self.pr_row, pc + self.pr_col, pr + self.pr_row), fill=PUSHER_RGB)
        return np.asarray(img)
