"""Instruction families of the LanguageTable-style world and their success tests.

Instruction strings, thresholds and the 9 absolute locations follow the original LanguageTable
simulator (see docs/tabletop.md), so that policies and datasets are comparable in spirit.
Task objects are small frozen dataclasses; their success tests take block positions only, so the
same test runs on the simulator's state and in unit tests.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import numpy as np

from selfimprove.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Vocabulary (exact strings of the original)
# ---------------------------------------------------------------------------------------------
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow")
SHAPES: tuple[str, ...] = ("moon", "cube", "star", "pentagon")

#: novel objects are named by themselves, not '<colour> <shape>'; no demo ever shows one.
BANANA = "banana"
NOVEL_OBJECTS: tuple[str, ...] = (BANANA,)

BLOCK_MODES: dict[str, tuple[str, ...]] = {
    "BLOCK_4": ("red moon", "blue cube", "green star", "yellow pentagon"),
    "BLOCK_8": (
        "red moon", "red pentagon", "blue moon", "blue cube",
        "green cube", "green star", "yellow star", "yellow pentagon",
    ),
    "BANANA": (BANANA,),  # BananaTable: every block replaced by one banana
}

PUSH_VERBS: tuple[str, ...] = ("push the", "move the", "slide the", "put the")
PREPOSITIONS: tuple[str, ...] = ("to the", "towards the", "close to the", "next to the")

#: block2block succeeds when the two block centres are closer than this (m).
BLOCK2BLOCK_SUCCESS_DISTANCE = 0.05
#: block2block pairs closer than this at task start are rejected (m).
BLOCK2BLOCK_MIN_START_DISTANCE = 0.06

# Absolute locations: the original shifts x by a 0.025 m buffer.
_X_BUFFER = 0.025
WORKSPACE_X = (0.15, 0.60)
WORKSPACE_Y = (-0.3048, 0.3048)
_LX_MIN, _LX_MAX = WORKSPACE_X[0] - _X_BUFFER, WORKSPACE_X[1] - _X_BUFFER
_LY_MIN, _LY_MAX = WORKSPACE_Y
_LCX, _LCY = (_LX_MIN + _LX_MAX) / 2.0, (_LY_MIN + _LY_MAX) / 2.0

LOCATIONS: dict[str, tuple[float, float]] = {
    "top": (_LX_MIN, _LCY),
    "top_left": (_LX_MIN, _LY_MIN),
    "top_right": (_LX_MIN, _LY_MAX),
    "center": (_LCX, _LCY),
    "center_left": (_LCX, _LY_MIN),
    "center_right": (_LCX, _LY_MAX),
    "bottom": (_LX_MAX, _LCY),
    "bottom_left": (_LX_MAX, _LY_MIN),
    "bottom_right": (_LX_MAX, _LY_MAX),
}
LOCATION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "top": ("top side", "top", "towards your base"),
    "top_left": ("top left of the board", "top left", "upper left corner", "top left corner"),
    "top_right": ("top right of the board", "top right", "upper right corner", "top right corner"),
    "center": ("middle of the board", "center of the board", "center", "middle"),
    "center_left": ("left side of the board", "center left", "left side"),
    "center_right": ("right side of the board", "center right", "right side"),
    "bottom": ("bottom side", "bottom"),
    "bottom_left": ("bottom left of the board", "bottom left", "lower left corner", "bottom left corner"),
    "bottom_right": ("bottom right of the board", "bottom right", "lower right corner",
                     "bottom right corner"),
}
LOCATION_VERBS: tuple[str, ...] = ("move the", "push the", "slide the")
LOCATION_SUCCESS_DISTANCE = 0.115
LOCATION_CENTER_SUCCESS_DISTANCE = 0.1

SEPARATE_TEMPLATES: tuple[str, ...] = (
    "pull the {block} apart from the {avoid}",
    "move the {block} away from the {avoid}",
    "separate the {block} from the {avoid}",
)
SEPARATE_GROUP_SYNONYMS: tuple[str, ...] = ("group", "clump", "group of blocks")
SEPARATE_REST = "rest of the blocks"
#: blocks closer than this count as "joined" and need separating (m).
SEPARATE_JOINED_DISTANCE = 0.08
#: the invisible target lies this far from the avoided blocks' centroid (m).
SEPARATE_MAGNITUDE = 0.1
SEPARATE_SUCCESS_DISTANCE = 0.025

TASK_FAMILIES: tuple[str, ...] = ("block2block", "block2location", "separate_blocks", "banana2location")
#: families whose goal is one of the 9 absolute locations (same success radii).
LOCATION_FAMILIES: tuple[str, ...] = ("block2location", "banana2location")
#: the object set a family is played with when the env is given no block_mode.
DEFAULT_BLOCK_MODES: dict[str, str] = {"block2block": "BLOCK_8", "block2location": "BLOCK_8",
                                       "separate_blocks": "BLOCK_8", "banana2location": "BANANA"}

Positions = Mapping[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Task objects
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block2BlockTask:
    """Push block `moved` next to block `target` (centres closer than 0.05 m)."""

    moved: str
    target: str
    verb: str = "push the"
    preposition: str = "to the"
    family: str = field(default="block2block", init=False)

    @property
    def instruction(self) -> str:
        return f"{self.verb} {self.moved} {self.preposition} {self.target}"

    def distance(self, positions: Positions) -> float:
        """Centre distance between the two named blocks (m)."""
        return float(np.linalg.norm(np.asarray(positions[self.moved]) - np.asarray(positions[self.target])))

    def goal_point(self, positions: Positions) -> np.ndarray:
        """Where the moved block should go: the target block's centre."""
        return np.asarray(positions[self.target], dtype=np.float64)

    def is_success(self, positions: Positions, start_positions: Positions | None = None) -> bool:
        """True when the two named blocks' centres are within 0.05 m, as in the original LanguageTable.

        Success is symmetric: which of the two blocks moved is not checked (``start_positions`` is
        accepted for a common signature and ignored). An earlier version also required the moved
        block to have moved most; no frame pair can show that, so a steps-to-go model that sees
        the last frames could not learn it and its detector fired on the role-swapped instruction
        at about half of the goal frames (docs/tabletop.md).
        """
        return self.distance(positions) < BLOCK2BLOCK_SUCCESS_DISTANCE


@dataclass(frozen=True)
class Block2LocationTask:
    """Push `block` to one of 9 absolute board locations."""

    block: str
    location: str
    location_text: str = ""
    verb: str = "push the"
    family: str = field(default="block2location", init=False)

    @property
    def instruction(self) -> str:
        text = self.location_text or LOCATION_SYNONYMS[self.location][0]
        return f"{self.verb} {self.block} to the {text}"

    @property
    def threshold(self) -> float:
        return LOCATION_CENTER_SUCCESS_DISTANCE if self.location == "center" else LOCATION_SUCCESS_DISTANCE

    def goal_point(self, positions: Positions | None = None) -> np.ndarray:
        return np.asarray(LOCATIONS[self.location], dtype=np.float64)

    def distance(self, positions: Positions) -> float:
        return float(np.linalg.norm(np.asarray(positions[self.block]) - self.goal_point()))

    def is_success(self, positions: Positions, start_positions: Positions | None = None) -> bool:
        """True when the block centre is within 0.115 m (0.1 m for the centre) of the location."""
        return self.distance(positions) < self.threshold


@dataclass(frozen=True)
class SeparateBlocksTask:
    """Push `block` away from the blocks in `avoid` (0.1 m from their centroid, within 0.025 m)."""

    block: str
    avoid: tuple[str, ...]
    template: str = SEPARATE_TEMPLATES[0]
    avoid_text: str = ""
    family: str = field(default="separate_blocks", init=False)

    @property
    def instruction(self) -> str:
        return self.template.format(block=self.block, avoid=self.avoid_text or _avoid_text(self.avoid, 8, 0))

    def goal_point(self, positions: Positions) -> np.ndarray:
        """The invisible target, recomputed from the current poses as in the original."""
        centroid = np.mean([np.asarray(positions[b]) for b in self.avoid], axis=0)
        away = np.asarray(positions[self.block]) - centroid
        away = away / max(float(np.linalg.norm(away)), 1e-9)
        return centroid + SEPARATE_MAGNITUDE * away

    def distance(self, positions: Positions) -> float:
        return float(np.linalg.norm(np.asarray(positions[self.block]) - self.goal_point(positions)))

    def is_success(self, positions: Positions, start_positions: Positions | None = None) -> bool:
        return self.distance(positions) < SEPARATE_SUCCESS_DISTANCE


@dataclass(frozen=True)
class Banana2LocationTask(Block2LocationTask):
    """BananaTable: push the banana (the only object on the board) to one of the 9 locations.

    Wording, locations and success radii are block2location's, so a block2block/block2location
    policy meets a familiar instruction about an object it has never seen.
    """

    family: str = field(default="banana2location", init=False)


Task = Block2BlockTask | Block2LocationTask | SeparateBlocksTask | Banana2LocationTask


#: words no template above uses: the instruction of ``phrasing = "paraphrase"`` (an evaluation of how a model
#: trained on the templates reads other words for the same task)
PARAPHRASE_VERBS: tuple[str, ...] = ("get the", "bring the", "nudge the", "shove the")
PARAPHRASE_PREPOSITIONS: tuple[str, ...] = ("close to the", "near the", "up against the", "right by the")
PHRASINGS = ("template", "paraphrase")


def paraphrase(task: Task) -> str:
    """``task`` in words outside the task grammar ("get the yellow star close to the yellow pentagon").

    The wording is picked from the template's text alone (no random draw), so a seed keeps its board and task.
    """
    text = task.instruction
    pick = zlib.crc32(text.encode())
    verb = PARAPHRASE_VERBS[pick % len(PARAPHRASE_VERBS)]
    if isinstance(task, Block2BlockTask):
        return f"{verb} {task.moved} {PARAPHRASE_PREPOSITIONS[pick // 7 % len(PARAPHRASE_PREPOSITIONS)]} {task.target}"
    if isinstance(task, Block2LocationTask):
        return f"{verb} {task.block} over to the {task.location_text or LOCATION_SYNONYMS[task.location][0]}"
    return f"please {text}"


def check_block_mode(family: str, block_mode: str) -> None:
    """Raise ConfigError when ``family`` cannot be played with the objects of ``block_mode``."""
    if block_mode not in BLOCK_MODES:
        raise ConfigError(f"unknown block_mode {block_mode!r}; valid: {', '.join(BLOCK_MODES)}")
    if (family == "banana2location") != (block_mode == "BANANA"):
        raise ConfigError(f"task {family!r} cannot be played with block_mode {block_mode!r}; use "
                          f"{DEFAULT_BLOCK_MODES.get(family, 'BLOCK_8')!r} (or leave block_mode unset)")


def _avoid_text(avoid: Sequence[str], n_blocks: int, group_choice: int) -> str:
    """Names the avoided blocks the way the original does (list, 'group' or 'rest of the blocks')."""
    if len(avoid) == n_blocks - 1 and n_blocks > 2:
        return SEPARATE_REST
    if len(avoid) == 1:
        return avoid[0]
    if len(avoid) == 2:
        return f"{avoid[0]} and {avoid[1]}"
    if len(avoid) == 3 and group_choice < 0:
        return f"{avoid[0]}, {avoid[1]}, and {avoid[2]}"
    return SEPARATE_GROUP_SYNONYMS[max(group_choice, 0) % len(SEPARATE_GROUP_SYNONYMS)]


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def sample_block2block(positions: Positions, rng: np.random.Generator) -> Block2BlockTask | None:
    """Draws a (moved, target) pair at least 0.06 m apart and random wording; None if none exists."""
    names = list(positions)
    pairs = [(a, b) for a, b in itertools.permutations(names, 2)
             if np.linalg.norm(np.asarray(positions[a]) - np.asarray(positions[b])) >= BLOCK2BLOCK_MIN_START_DISTANCE]
    if not pairs:
        return None
    moved, target = pairs[int(rng.integers(len(pairs)))]
    verb = PUSH_VERBS[int(rng.integers(len(PUSH_VERBS)))]
    prep = PREPOSITIONS[int(rng.integers(len(PREPOSITIONS)))]
    return Block2BlockTask(moved, target, verb, prep)


def sample_block2location(positions: Positions, rng: np.random.Generator) -> Block2LocationTask | None:
    """Draws a block and a location it is not already at; None if every choice is already solved."""
    names = list(positions)
    options = [(b, loc) for b in names for loc in LOCATIONS
               if not Block2LocationTask(b, loc).is_success(positions)]
    if not options:
        return None
    block, loc = options[int(rng.integers(len(options)))]
    syns = LOCATION_SYNONYMS[loc]
    text = syns[int(rng.integers(len(syns)))]
    verb = LOCATION_VERBS[int(rng.integers(len(LOCATION_VERBS)))]
    return Block2LocationTask(block, loc, text, verb)


def _in_workspace(p: np.ndarray) -> bool:
    return WORKSPACE_X[0] <= p[0] <= WORKSPACE_X[1] and WORKSPACE_Y[0] <= p[1] <= WORKSPACE_Y[1]


def sample_separate_blocks(positions: Positions, rng: np.random.Generator) -> SeparateBlocksTask | None:
    """Picks the block closest to the most others (mean distance of those within 0.08 m).

    Returns None when no block has a neighbour within 0.08 m or the target leaves the workspace.
    """
    names = list(positions)
    best: tuple[float, str, tuple[str, ...]] | None = None
    for name in names:
        p = np.asarray(positions[name])
        near = sorted((float(np.linalg.norm(p - np.asarray(positions[o]))), o) for o in names if o != name)
        near = [(d, o) for d, o in near if d < SEPARATE_JOINED_DISTANCE]
        if not near:
            continue
        avg = float(np.mean([d for d, _ in near]))
        if best is None or avg < best[0]:
            best = (avg, name, tuple(o for _, o in near))
    if best is None:
        return None
    _, block, avoid = best
    group_choice = int(rng.integers(-1, len(SEPARATE_GROUP_SYNONYMS)))
    template = SEPARATE_TEMPLATES[int(rng.integers(len(SEPARATE_TEMPLATES)))]
    task = SeparateBlocksTask(block, avoid, template, _avoid_text(avoid, len(names), group_choice))
    if not _in_workspace(task.goal_point(positions)) or task.is_success(positions):
        return None
    return task


def sample_banana2location(positions: Positions, rng: np.random.Generator) -> Banana2LocationTask | None:
    """Draws a location the banana is not already at, worded like block2location; None if none."""
    if BANANA not in positions:
        raise ConfigError(f"banana2location needs a banana on the board, got {sorted(positions)}; "
                          "use block_mode 'BANANA'")
    task = sample_block2location({BANANA: positions[BANANA]}, rng)
    return None if task is None else Banana2LocationTask(task.block, task.location, task.location_text, task.verb)


SAMPLERS = {
    "block2block": sample_block2block,
    "block2location": sample_block2location,
    "separate_blocks": sample_separate_blocks,
    "banana2location": sample_banana2location,
}


def sample_task(family: str, positions: Positions, rng: np.random.Generator) -> Task | None:
    """Draws a valid task of `family` for the board `positions` (block name -> xy), or None."""
    if family not in SAMPLERS:
        raise ConfigError(f"unknown task family {family!r}; valid families: {', '.join(TASK_FAMILIES)}")
    return SAMPLERS[family](positions, rng)


# ---------------------------------------------------------------------------------------------
# Enumeration and parsing
# ---------------------------------------------------------------------------------------------
def all_block2block_instructions(block_mode: str = "BLOCK_8") -> list[str]:
    """All 896 block2block instructions of BLOCK_8 (8*7 ordered pairs x 4 verbs x 4 prepositions)."""
    blocks = _blocks_of(block_mode)
    return [f"{v} {a} {p} {b}" for a, b in itertools.permutations(blocks, 2)
            for v in PUSH_VERBS for p in PREPOSITIONS]


def all_block2location_instructions(block_mode: str = "BLOCK_8") -> list[str]:
    return [f"{v} {b} to the {s}" for b in _blocks_of(block_mode) for loc in LOCATIONS
            for s in LOCATION_SYNONYMS[loc] for v in LOCATION_VERBS]


def all_banana2location_instructions() -> list[str]:
    """All 93 BananaTable instructions (3 verbs x 31 location phrases)."""
    return [f"{v} {BANANA} to the {s}" for loc in LOCATIONS for s in LOCATION_SYNONYMS[loc] for v in LOCATION_VERBS]


def _blocks_of(block_mode: str) -> tuple[str, ...]:
    if block_mode not in BLOCK_MODES:
        raise ConfigError(f"unknown block_mode {block_mode!r}; valid: {', '.join(BLOCK_MODES)}")
    return BLOCK_MODES[block_mode]


_ALL_BLOCKS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


def _parse_block(text: str, instruction: str) -> str:
    """Validates a '<colour> <shape>' name, saying which word is wrong."""
    if text in NOVEL_OBJECTS:
        raise ConfigError(f"the {text} in {instruction!r} can only be pushed to a location, e.g. "
                          f"'push the {text} to the top left corner' (locations: {sorted(_LOCATION_BY_TEXT)})")
    words = text.split()
    if len(words) != 2:
        raise ConfigError(f"cannot read a block name from {text!r} in {instruction!r}; "
                          f"expected '<colour> <shape>' with colour in {list(COLOURS)} and shape in {list(SHAPES)}")
    colour, shape = words
    if colour not in COLOURS:
        raise ConfigError(f"unknown colour {colour!r} in {instruction!r}; valid colours: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r} in {instruction!r}; valid shapes: {', '.join(SHAPES)}")
    return text


def _strip_prefix(text: str, prefixes: Sequence[str]) -> tuple[str, str] | None:
    for p in sorted(prefixes, key=len, reverse=True):
        if text.startswith(p + " "):
            return p, text[len(p) + 1:]
    return None


_LOCATION_BY_TEXT = {s: loc for loc, syns in LOCATION_SYNONYMS.items() for s in syns}


def parse_instruction(text: str) -> Task:
    """Turns an instruction string back into a task object; raises ConfigError naming what is wrong.

    Round-trips every instruction this module generates (block2block, block2location, banana2location,
    separate_blocks with explicitly named blocks; group words cannot be resolved without a board).
    """
    instruction = " ".join(text.strip().lower().split())
    sep = _parse_separate(instruction)
    if sep is not None:
        return sep
    head = _strip_prefix(instruction, PUSH_VERBS)
    if head is None:
        raise ConfigError(f"unknown task in {text!r}: it starts with none of the verbs {list(PUSH_VERBS)} "
                          f"or separate templates; valid task families: {', '.join(TASK_FAMILIES)}")
    verb, rest = head
    if " to the " in rest:
        block_text, loc_text = rest.split(" to the ", 1)
        if loc_text in _LOCATION_BY_TEXT and block_text in NOVEL_OBJECTS:
            return Banana2LocationTask(block_text, _LOCATION_BY_TEXT[loc_text], loc_text, verb)
        if loc_text in _LOCATION_BY_TEXT and len(block_text.split()) == 2:
            return Block2LocationTask(_parse_block(block_text, text), _LOCATION_BY_TEXT[loc_text], loc_text, verb)
    words = rest.split()
    name_words = 1 if words and words[0] in NOVEL_OBJECTS else 2
    if len(words) < name_words + 3:
        raise ConfigError(f"cannot parse {text!r}: expected '<verb> <block> <preposition> <block>' with "
                          f"prepositions {list(PREPOSITIONS)} or a location in {sorted(_LOCATION_BY_TEXT)}")
    moved = words[0] if name_words == 1 else _parse_block(" ".join(words[:2]), text)
    remainder = " ".join(words[name_words:])
    prep = _strip_prefix(remainder, PREPOSITIONS)
    if prep is None:
        raise ConfigError(f"unknown preposition in {text!r}; valid prepositions: {', '.join(PREPOSITIONS)}")
    preposition, target_text = prep
    if target_text in _LOCATION_BY_TEXT:
        kind = Banana2LocationTask if moved in NOVEL_OBJECTS else Block2LocationTask
        return kind(moved, _LOCATION_BY_TEXT[target_text], target_text, verb)
    _parse_block(moved, text)  # a novel object has no block2block task: say so
    target = _parse_block(target_text, text)
    if target == moved:
        raise ConfigError(f"{text!r} names the same block twice; block2block needs two distinct blocks")
    return Block2BlockTask(moved, target, verb, preposition)


def _parse_separate(instruction: str) -> SeparateBlocksTask | None:
    for template in SEPARATE_TEMPLATES:
        pre, mid = template.split("{block}")[0], template.split("{block}")[1].split("{avoid}")[0]
        if not instruction.startswith(pre) or mid not in instruction:
            continue
        block_text, avoid_text = instruction[len(pre):].split(mid, 1)
        block = _parse_block(block_text, instruction)
        if avoid_text in SEPARATE_GROUP_SYNONYMS or avoid_text == SEPARATE_REST:
            avoid: tuple[str, ...] = ()
        else:
            parts = [p.strip() for p in avoid_text.replace(", and ", ", ").replace(" and ", ", ").split(",")]
            avoid = tuple(_parse_block(p, instruction) for p in parts if p)
        return SeparateBlocksTask(block, avoid, template, avoid_text)
    return None


def goal_key(text: str) -> Hashable:
    """What an instruction asks for, with its wording removed: two instructions with the same key
    are met by the same boards (paraphrases; a block2block instruction and its role swap, since
    success is symmetric). Stage 1's mismatched-instruction negatives must not be such a pair.
    Text that does not parse is its own key."""
    try:
        task = parse_instruction(text)
    except ConfigError:
        return " ".join(text.lower().split())
    if isinstance(task, Block2BlockTask):
        return ("block2block", frozenset((task.moved, task.target)))
    if isinstance(task, Block2LocationTask):  # Banana2LocationTask too
        return (task.family, task.block, task.location)
    if isinstance(task, SeparateBlocksTask):
        return ("separate", task.block, frozenset(task.avoid))
    return " ".join(text.lower().split())
