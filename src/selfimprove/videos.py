"""Rollout videos: a few evaluation episodes as small captioned GIFs for the run report.

Seeing what the policy does tells more than a success rate: videos of the first ``eval.videos``
eval seeds are written after SFT and after Self-Improvement, so the two are compared on the same
boards. Tabletop videos are the camera frames the model sees, upscaled; the point mass has no
camera, so its frames are drawn top-down from the state. GIFs are written with Pillow (already a
dependency): they embed in markdown everywhere, and at these sizes they stay small.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from selfimprove.config import RunConfig
from selfimprove.data.episode import Episode
from selfimprove.domains import states_drawing
from selfimprove.rundir import RunDir
from selfimprove.runlog import write_json

log = logging.getLogger(__name__)

INDEX = "videos.json"
STAGE_LABELS = {"sft": "SFT (stage 1)", "improve": "after Self-Improvement (stage 2)"}
MIN_WIDTH = 256  # frames are upscaled (nearest neighbour) to at least this width
FPS = 10  # the envs' control rate
HOLD_LAST_MS = 1500  # the last frame stays up a moment so the outcome can be read

_BG, _TEXT, _GREEN, _RED = (24, 24, 28), (230, 230, 230), (80, 200, 90), (230, 80, 70)


def video_dir(run_dir: str | Path) -> Path:
    return RunDir(run_dir).videos


def read_index(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``videos/videos.json``: per stage, the recorded episodes (file, seed, instruction, success, length)."""
    path = video_dir(run_dir) / INDEX
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:  # being written by a live run
        return {}


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def caption(frame: np.ndarray, top: str, bottom: str, colour: tuple[int, int, int] = _TEXT) -> np.ndarray:
    """``frame`` with ``top`` (wrapped) above it and ``bottom`` below it in ``colour``."""
    font = _font()
    h, w = frame.shape[:2]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, top, font, w - 8) or [""]
    line_h = 15
    head, foot = 4 + line_h * len(lines), 4 + line_h
    img = Image.new("RGB", (w, head + h + foot), _BG)
    img.paste(Image.fromarray(frame), (0, head))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * line_h), line, fill=_TEXT, font=font)
    draw.text((4, head + h + 2), bottom, fill=colour, font=font)
    return np.asarray(img)


def episode_frames(episode: Episode, config: RunConfig, label: str = "") -> list[np.ndarray]:
    """Captioned RGB frames of ``episode``: the instruction on top, step and outcome below.

    Returns an empty list when the observations hold nothing to draw (no camera, unknown state).
    """
    obs = episode.observations
    steps = len(next(iter(obs.values())))
    if "image" in obs:
        images = np.asarray(obs["image"], dtype=np.uint8)
        scale = max(1, math.ceil(MIN_WIDTH / images.shape[2]))
        raw = [np.repeat(np.repeat(im, scale, axis=0), scale, axis=1) for im in images]
    else:
        draw_states = states_drawing(config.domain)
        raw = draw_states(obs, config, MIN_WIDTH) if draw_states is not None else []
    if not raw:
        return []
    success = np.asarray(episode.info.get("is_success", np.zeros(steps, bool)), dtype=bool)
    outcome = "success" if episode.true_success else "failure"
    frames = []
    for t, frame in enumerate(raw):
        reached = bool(success[: t + 1].any())
        last = t == steps - 1
        text = f"{label}  step {t}/{steps - 1}".strip()
        if last:
            text += f"  {outcome.upper()}"
        colour = _GREEN if reached else (_RED if last else _TEXT)
        frames.append(caption(frame, episode.instruction, text, colour))
    return frames


def write_gif(frames: list[np.ndarray], path: str | Path, fps: int = FPS) -> Path:
    """An animated GIF that loops, the last frame held for a moment; written atomically."""
    if not frames:
        raise ValueError("no frames to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE, colors=64) for f in frames]
    durations = [int(1000 / fps)] * (len(images) - 1) + [HOLD_LAST_MS]
    tmp = path.with_name(path.name + ".tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    tmp.replace(path)
    return path


def record_videos(config: RunConfig, checkpoint: str | Path, stage: str, resume: bool = True
                  ) -> list[dict[str, Any]]:
    """Roll out ``checkpoint`` on the first ``eval.videos`` eval seeds and write one GIF per episode.

    The episodes use the eval protocol (same seeds and temperature as ``evaluate``). With ``resume``
    a stage whose videos all exist is not recorded again. Returns the stage's entries of
    ``videos/videos.json``.
    """
    from selfimprove.evaluate import evaluate

    n = int(config.eval.videos)
    out = video_dir(config.run_dir)
    index = read_index(config.run_dir)
    done = index.get(stage, [])
    if n <= 0:
        return []
    if resume and len(done) == n and all((out / e["file"]).exists() for e in done):
        return done
    result = evaluate(config, checkpoint, episodes=n, return_episodes=True)
    label = STAGE_LABELS.get(stage, stage).split(" (")[0]
    entries = []
    for i, episode in enumerate(result["episodes"]):
        frames = episode_frames(episode, config, label)
        if not frames:
            log.info("no frames to draw for %s episodes (no camera image); no videos written", config.env.id)
            return []
        name = f"{stage}_{i}_seed{episode.meta['seed']}.gif"
        write_gif(frames, out / name)
        entries.append({"file": name, "seed": int(episode.meta["seed"]), "instruction": episode.instruction,
                        "success": bool(episode.true_success), "length": episode.length,
                        "checkpoint": str(checkpoint)})
    for old in done:  # a smaller eval.videos than last time: drop the extra files
        if old["file"] not in {e["file"] for e in entries}:
            (out / old["file"]).unlink(missing_ok=True)
    index = read_index(config.run_dir)
    index[stage] = entries
    write_json(out / INDEX, index)
    log.info("wrote %d %s rollout videos to %s", len(entries), stage, out)
    return entries


def report_lines(run_dir: str | Path) -> list[str]:
    """The report's "Rollouts" section: the recorded GIFs in a table, one row per stage."""
    index = read_index(run_dir)
    if not any(index.values()):
        return []
    lines = ["## Rollouts", "",
             "Eval episodes on the first eval seeds (the same boards for both stages), with the simulator's "
             "success.", ""]
    for stage, entries in index.items():
        if not entries:
            continue
        heads = [f"seed {e['seed']}: {'success' if e['success'] else 'failure'} ({e['length']} steps)"
                 for e in entries]
        cells = [f"![{stage} seed {e['seed']}]({RunDir('').videos.name}/{e['file']})" for e in entries]
        lines += [f"**{STAGE_LABELS.get(stage, stage)}**", "", "| " + " | ".join(heads) + " |",
                  "|" + "---|" * len(entries), "| " + " | ".join(cells) + " |", ""]
    return lines
