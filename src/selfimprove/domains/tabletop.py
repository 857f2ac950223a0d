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

    return TabletopExpert(noise_scale=config.data.expert_noise, detour_prob=config.data.expert_detour_prob,
                          hysteresis=config.data.expert_hysteresis)


_LEFT_RIGHT = {"left": "right", "right": "left"}


@functools.lru_cache(maxsize=65_536)
def mirror_instruction(text: str) -> str:
    """Swap 'left' and 'right' (block names and block2block goals are mirror-invariant)."""
    return " ".join(_LEFT_RIGHT.get(w, w) for w in text.split(" "))


def mirror_tabletop(obs: dict, tokens: torch.Tensor, bins: int, rows: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[dict, torch.Tensor]:
    """Mirror the board left-right for the chosen batch ``rows``: image columns, y coordinates, dy.

    The board is symmetric about y = 0 and image columns run along y, so the mirrored sample is
    as valid a demonstration as the original; action bins are symmetric about 0.
    """
    obs, tokens = _reflect_tabletop(obs, tokens, bins, rows, axis=1)
    if bool(rows.any()):
        obs["instruction"] = [mirror_instruction(t) if r else t for t, r in zip(obs["instruction"], rows.tolist())]
    return obs, tokens


def _with_rows(image: torch.Tensor, sel: list[int], replaced: torch.Tensor) -> torch.Tensor:
    """``image`` [B, ...] with its rows ``sel`` replaced by ``replaced`` [len(sel), ...], in order: one copy
    of whole rows (indexed assignment and torch.where go element by element on uint8 frames, ~5x slower)."""
    position = {row: j for j, row in enumerate(sel)}
    return torch.stack([replaced[position[i]] if i in position else image[i] for i in range(len(image))])


def _reflect_tabletop(obs: dict, tokens: torch.Tensor, bins: int, rows: torch.Tensor,
                      axis: int) -> tuple[dict, torch.Tensor]:
    """Reflect the board about its centre line in ``axis`` (0: x, image rows; 1: y, image columns) for
    the chosen ``rows``: the image, that coordinate of the effector and its target, and that action bin."""
    from selfimprove.envs.tabletop.board import VIEW_X, VIEW_Y

    obs = dict(obs)
    if not bool(rows.any()):
        return obs, tokens
    image = obs["image"]
    sel = rows.nonzero().squeeze(1)
    # [..., H, W, 3]: H is x, W is y
    obs["image"] = _with_rows(image, sel.tolist(), image.index_select(0, sel).flip(-3 + axis))
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
    # Edge padding then a crop at the offset (the same pixels as a gather at clamped indices), on the
    # shifted rows only: copies of whole pixel runs, ~3x faster than one gather over the batch
    shifted = offsets.abs().sum(1).nonzero().squeeze(1)
    if len(shifted):
        part = image.index_select(0, shifted)
        edge = (*part.shape[:-2], k, part.shape[-1])
        part = torch.cat([part[..., :1, :].expand(edge), part, part[..., -1:, :].expand(edge)], dim=-2)
        part = part.index_select(-3, torch.arange(-k, h + k).clamp(0, h - 1))
        starts = (offsets[shifted] + k).tolist()
        crops = torch.stack([part[j, ..., a:a + h, b:b + w, :] for j, (a, b) in enumerate(starts)])
        obs["image"] = _with_rows(image, shifted.tolist(), crops)
    delta = torch.stack([-offsets[:, 0] * metres_per_row, -offsets[:, 1] * metres_per_col], dim=1).float()
    for key in ("effector", "effector_target"):
        if key in obs:
            obs[key] = obs[key] + delta
    return obs, tokens


#: words of absolute-location instructions; the top-bottom flip leaves such rows alone, because the
#: original's locations sit 0.025 m off the board's centre line in x (a flipped goal would be wrong).
_LOCATION_WORDS = frozenset({"top", "bottom", "upper", "lower", "base", "center", "middle", "left", "right",
                             "side", "corner"})


def flip_tabletop(obs: dict, tokens: torch.Tensor, bins: int, rows: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[dict, torch.Tensor]:
    """Flip the board top-bottom for the chosen ``rows``: image rows, x coordinates, dx.

    Walls, spawn region and physics are symmetric about the board's centre line in x, so for a task
    between blocks (block2block) the flipped sample is as valid a demonstration as the original.
    Rows whose instruction names an absolute location are not flipped (see ``_LOCATION_WORDS``).
    """
    rows = rows & torch.tensor([not _names_a_location(t) for t in obs["instruction"]], dtype=torch.bool)
    return _reflect_tabletop(obs, tokens, bins, rows, axis=0)


@functools.lru_cache(maxsize=65_536)
def _names_a_location(text: str) -> bool:
    return bool(_LOCATION_WORDS & set(text.split(" ")))


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
    names, palette, keys = _palette()
    sel = rows.nonzero().squeeze(1)
    # one permutation per batch row (chosen or not), so the random stream does not depend on the rows
    perms = torch.stack([torch.randperm(len(names), generator=generator) for _ in range(len(rows))])[sel]
    image = obs["image"]
    chosen = image.index_select(0, sel)
    flat = chosen.view(-1, 3)  # [b * pixels, 3], our own copy
    key = (flat[:, 0].int() << 16) | (flat[:, 1].int() << 8) | flat[:, 2].int()
    per_row = flat.shape[0] // len(sel)
    hit = key == keys[0]
    for c in keys[1:]:
        hit |= key == c
    pixels = hit.nonzero().squeeze(1)  # the block pixels (a few percent of a frame) take their row's new colours
    colour = (key[pixels, None] == keys).int().argmax(1)
    flat[pixels] = palette[perms[pixels // per_row, colour]]
    obs["image"] = _with_rows(image, sel.tolist(), chosen)
    instructions = list(obs["instruction"])
    for i, p in zip(sel.tolist(), perms.tolist()):
        instructions[i] = _recolour_instruction(instructions[i], tuple(p))
    obs["instruction"] = instructions
    return obs, tokens


@functools.lru_cache(maxsize=65_536)
def _recolour_instruction(text: str, perm: tuple[int, ...]) -> str:
    """``text`` with block colour ``c`` renamed to colour ``perm[c]`` (colours in ``_palette()`` order)."""
    names = _palette()[0]
    words = {names[c]: names[p] for c, p in enumerate(perm)}
    return " ".join(words.get(w, w) for w in text.split(" "))


@functools.lru_cache(maxsize=1)
def _palette() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The block colours' names, RGB [colours, 3] uint8 and packed RGB ``r << 16 | g << 8 | b``.

    The renderer draws without anti-aliasing, so a block pixel is exactly its palette colour; any
    other pixel (board, pusher, a novel object) differs from every block colour in its packed RGB.
    """
    from selfimprove.envs.tabletop.board import COLOURS_RGB

    names = list(COLOURS_RGB)
    palette = torch.tensor([COLOURS_RGB[n] for n in names], dtype=torch.uint8)
    keys = [(r << 16) | (g << 8) | b for r, g, b in (COLOURS_RGB[n] for n in names)]
    return names, palette, torch.tensor(keys, dtype=torch.int32)


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
