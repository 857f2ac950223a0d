"""The language-table domain's parts (named in ``domain_table.DOMAINS``): how its demos are
collected, the SFT augmentations that keep a sample a valid demonstration (the board's mirror and
top-bottom flip, small scene shifts, colour permutations), and the guard's label-preserving views."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from selfimprove.config import RunConfig
from selfimprove.domains import DomainViews
from selfimprove.envs.experts import Expert


def expert(config: RunConfig) -> Expert:
    """The scripted pushing expert, with the run's noise and detour settings."""
    from selfimprove.envs.tabletop.expert import TabletopExpert

    return TabletopExpert(noise_scale=config.data.expert_noise, detour_prob=config.data.expert_detour_prob)


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


def _mirror_view(obs: dict) -> dict:
    """The board mirrored left-right (image columns, y coordinates, 'left'/'right'), as SFT augments."""
    out = dict(obs)
    out["image"] = obs["image"].flip(-2)
    for key in ("effector", "effector_target"):
        if key in obs:
            v = obs[key].clone()
            v[:, 1] = -v[:, 1]
            out[key] = v
    out["instruction"] = [mirror_instruction(t) for t in obs["instruction"]]
    return out


def _shift_view(seed: int, max_pixels: int = 3) -> Callable[[dict], dict]:
    """The scene translated by a few pixels (image and coordinates together), as SFT augments."""
    def view(obs: dict) -> dict:
        rows = torch.ones(len(obs["instruction"]), dtype=torch.bool)
        dummy = torch.zeros(len(rows), 2, dtype=torch.long)
        return shift_tabletop(obs, dummy, 3, rows, max_pixels, torch.Generator().manual_seed(seed))[0]
    return view


VIEWS = DomainViews(_mirror_view, "the left-right mirror of the board", shift=_shift_view)
