"""Writing LeRobot v3 datasets: ``export_lerobot`` (an episode store -> a LeRobot v3.0 folder)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from selfimprove.data.lerobot import LEROBOT_PRESETS, FeatureSource, LeRobotMapping, claim_output, load_mapping
from selfimprove.data.lerobot_import import check_lerobot
from selfimprove.data.store import EpisodeStore
from selfimprove.data.v3 import (CHUNK_SIZE, CODEBASE_VERSION, DATA_FILE_SIZE_MB, DATA_PATH, DEFAULT_FEATURES,
                                 INFO_PATH, STATS_PATH, TASKS_PATH, VIDEO_FILE_SIZE_MB, RollingParquet,
                                 aggregate_stats, feature_stats, frame_column, tasks_table, write_episodes,
                                 write_meta_json, write_parquet)
from selfimprove.errors import DatasetError
from selfimprove.folders import publish

log = logging.getLogger(__name__)


@dataclass
class _Target:
    """One exported LeRobot feature and the parts of our episodes it is assembled from."""

    feature: str
    dtype: str
    shape: list[int]
    parts: list[tuple[str, int, int]]  # (our key, start, stop); start/stop -1 for a whole array
    names: list[str] | None


def _export_plan(store: EpisodeStore, mapping: LeRobotMapping) -> dict[str, _Target]:
    """The exported features (actions first, cameras last) and how each is assembled from a store."""
    features = store.info["features"]
    ours = {k.removeprefix("observation."): f for k, f in features.items() if k.startswith("observation.")}
    sources = mapping.sources()
    action = sources.pop("actions")
    missing = sorted(set(sources) - set(ours))
    if missing:
        raise DatasetError(f"the store at {store.root} has no observations {missing} that the mapping "
                           f"{mapping.name!r} exports; it has {sorted(ours)}. Pass --preset/--map to match them")
    for key in sorted(set(ours) - set(sources)):
        default = f"observation.images.{key}" if ours[key]["dtype"] == "image" else f"observation.{key}"
        log.info("observation %r is not in mapping %s; exporting it as %s", key, mapping.name, default)
        sources[key] = FeatureSource(default)
    if action.sliced:
        raise DatasetError(f"mapping {mapping.name!r} reads actions from a slice ({mapping.actions}); "
                           "export needs a whole feature, e.g. --map action=actions")
    grouped: dict[str, list[tuple[str, FeatureSource]]] = {}
    for key, source in sources.items():
        grouped.setdefault(source.feature, []).append((key, source))
    if action.feature in grouped:
        raise DatasetError(f"mapping {mapping.name!r} exports both actions and observations to {action.feature!r}")
    action_shape = [int(s) for s in features["action"]["shape"]]
    targets = {action.feature: _Target(action.feature, "float32", action_shape, [("actions", -1, -1)],
                                       [f"action_{i}" for i in range(action_shape[0])])}
    for feature, entries in grouped.items():
        if len(entries) == 1 and not entries[0][1].sliced:
            key = entries[0][0]
            spec = ours[key]
            if spec["dtype"] == "image":
                targets[feature] = _Target(feature, "image", [int(s) for s in spec["shape"]], [(key, -1, -1)],
                                           ["height", "width", "channels"])
                continue
            shape = [int(s) for s in spec["shape"]]
            if len(shape) != 1:
                raise DatasetError(f"observation {key!r} has shape {shape}; LeRobot vector features are 1-D")
            targets[feature] = _Target(feature, _vector_dtype(spec["dtype"]), shape, [(key, -1, -1)],
                                       spec.get("names") or [f"{key}_{i}" for i in range(shape[0])])
            continue
        parts, names, position = [], [], 0
        for key, source in sorted(entries, key=lambda e: e[1].start if e[1].sliced else -1):
            spec = ours[key]
            if not source.sliced or spec["dtype"] == "image" or len(spec["shape"]) != 1:
                raise DatasetError(f"mapping {mapping.name!r} exports several observations to {feature!r}; "
                                   "each must be a vector slice such as observation.state[0:2]")
            size = int(spec["shape"][0])
            stop = source.start + size if source.stop is None else source.stop
            if source.start != position or stop - source.start != size:
                raise DatasetError(f"mapping {mapping.name!r}: the slices of {feature!r} must tile it in order "
                                   f"without gaps; {key!r} (size {size}) is mapped to [{source.start}:{source.stop}]")
            parts.append((key, source.start, stop))
            names += [f"{key}_{i}" for i in range(size)]
            position = stop
        dtypes = {_vector_dtype(ours[k]["dtype"]) for k, _, _ in parts}
        targets[feature] = _Target(feature, "float32" if len(dtypes) > 1 else dtypes.pop(), [position], parts, names)
    order = [action.feature] + sorted((f for f in targets if f != action.feature),
                                      key=lambda f: (targets[f].dtype == "image", f))
    return {f: targets[f] for f in order}


def _vector_dtype(dtype: str) -> str:
    return "float32" if dtype.startswith("float") else dtype


def _assemble(target: _Target, observations: dict[str, np.ndarray], actions: np.ndarray) -> np.ndarray:
    if target.parts[0][0] == "actions":
        return actions.astype(np.float32, copy=False)
    if target.parts[0][1] < 0:
        value = observations[target.parts[0][0]]
        return value if target.dtype == "image" else value.astype(target.dtype, copy=False)
    return np.concatenate([observations[k] for k, _, _ in target.parts], axis=1).astype(target.dtype, copy=False)



def export_lerobot(store: str | Path, out: str | Path, mapping: str | Path | LeRobotMapping | None = None,
                   overrides: list[str] | tuple[str, ...] = (), robot_type: str | None = None,
                   progress: bool = True) -> Path:
    """Write an episode store as a LeRobot v3.0 dataset at ``out`` (written whole or not at all).

    Cameras become ``image`` features (PNG bytes); ``mapping`` (default: the preset whose keys are
    the store's, else ``observation.<key>`` / ``observation.images.<key>``) names the features.
    Each episode's ``T + 1`` frames are exported as ``T + 1`` LeRobot frames; the last one's action
    is zero. Success flags, episode meta and diagnostics are not exported.
    """
    source = EpisodeStore(store)
    keys = {k.removeprefix("observation.") for k in source.info["features"] if k.startswith("observation.")}
    auto = next((m for m in LEROBOT_PRESETS.values() if set(m.observations) == keys),
                LeRobotMapping(name="generic", observations={"state": "observation.state"} if "state" in keys else {}))
    targets = _export_plan(source, load_mapping(mapping, overrides, auto=auto))
    out = Path(out)
    tmp = claim_output(out)
    data = RollingParquet(tmp, DATA_PATH, DATA_FILE_SIZE_MB)
    try:
        episode_rows: list[dict[str, Any]] = []
        stats: dict[str, list[dict[str, np.ndarray]]] = {}
        fps = float(source.fps)
        frame_bytes = sum(int(np.prod(t.shape)) * (1 if t.dtype == "image" else 4) for t in targets.values())
        batch = max(1, int(64 * 2**20 // max(1, frame_bytes * (int(source.episode_lengths.mean()) + 1))))
        tasks: list[str] | None = None
        first = 0
        bar = tqdm(total=source.num_episodes, desc=f"export {out.name}", unit="ep", disable=not progress)
        for start in range(0, source.num_episodes, batch):
            frames = source.frames(range(start, min(start + batch, source.num_episodes)))
            tasks = frames.instructions
            for offset, (row, length) in enumerate(zip(frames.episode_start, frames.episode_lengths)):
                episode_index = start + offset
                n = int(length) + 1
                sl = slice(int(row), int(row) + n)
                observations = {k: v[sl] for k, v in frames.observations.items()}
                columns: dict[str, np.ndarray] = {f: _assemble(t, observations, frames.actions[sl])
                                                  for f, t in targets.items()}
                columns["timestamp"] = (np.arange(n) / fps).astype(np.float32)
                columns["frame_index"] = np.arange(n, dtype=np.int64)
                columns["episode_index"] = np.full(n, episode_index, dtype=np.int64)
                columns["index"] = np.arange(first, first + n, dtype=np.int64)
                columns["task_index"] = frames.task_index[sl].astype(np.int64)
                arrays = {}
                episode_stats = {}
                for name, values in columns.items():
                    target = targets.get(name)
                    dtype = target.dtype if target else DEFAULT_FEATURES[name]
                    shape = target.shape if target else [1]
                    arrays[name] = frame_column(values.reshape(-1) if shape == [1] else values, image=dtype == "image")
                    episode_stats[name] = feature_stats(values, dtype == "image")
                    stats.setdefault(name, []).append(episode_stats[name])
                chunk, file = data.write(pa.table(arrays))
                task_ids = sorted(set(columns["task_index"].tolist()))
                episode_rows.append({
                    "episode_index": episode_index, "tasks": [tasks[t] for t in task_ids], "length": n,
                    "data/chunk_index": chunk, "data/file_index": file,
                    "dataset_from_index": first, "dataset_to_index": first + n,
                    **{f"stats/{name}/{k}": v.tolist() for name, s in episode_stats.items() for k, v in s.items()},
                    "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                })
                first += n
                bar.update(1)
        bar.close()
        data.close()
        if not episode_rows:
            raise DatasetError("the store holds no episodes to export")
        write_episodes(tmp, episode_rows)
        write_parquet(tasks_table(tasks or []), tmp / TASKS_PATH, compression="snappy")
        total_stats = {name: {k: v.tolist() for k, v in aggregate_stats(s).items()} for name, s in stats.items()}
        write_meta_json(tmp / STATS_PATH, total_stats, indent=4)
        features = {f: {"dtype": t.dtype, "shape": t.shape, "names": t.names} for f, t in targets.items()}
        features.update({k: {"dtype": d, "shape": [1], "names": None} for k, d in DEFAULT_FEATURES.items()})
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": robot_type or source.info.get("robot_type"),
            "total_episodes": len(episode_rows), "total_frames": first, "total_tasks": len(tasks or []),
            "chunks_size": CHUNK_SIZE, "data_files_size_in_mb": DATA_FILE_SIZE_MB,
            "video_files_size_in_mb": VIDEO_FILE_SIZE_MB,
            "fps": int(fps) if fps.is_integer() else fps,
            "splits": {"train": f"0:{len(episode_rows)}"},
            "data_path": DATA_PATH, "video_path": None, "features": features,
        }
        write_meta_json(tmp / INFO_PATH, info, indent=4)
        problems = check_lerobot(tmp)
        if problems:
            raise DatasetError(f"the exported dataset fails the v3 layout check: {'; '.join(problems)}")
        publish(tmp, out)
    except BaseException:
        data.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d episodes (%d frames) to %s", len(episode_rows), first, out)
    return out
