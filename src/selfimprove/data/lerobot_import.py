"""Reading LeRobot v3 datasets: ``LeRobotSource`` (their episodes mapped onto ours), ``import_lerobot``
(a dataset -> an episode store) and ``check_lerobot`` (the layout check)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from selfimprove.data.episode import Episode
from selfimprove.data.lerobot import (FeatureSource, LeRobotMapping, claim_output, detect_import_mapping,
                                      load_mapping, mapped_features, mapping_error, mapping_problems)
from selfimprove.data.store import EpisodeWriter
from selfimprove.data.v3 import (DEFAULT_FEATURES, EPISODE_KEYS, INFO_KEYS, STATS_PATH, TASKS_PATH, decode_images,
                                 decode_video, numeric_column, read_episodes, read_lerobot_info, read_parquet,
                                 read_schema, read_tasks)
from selfimprove.errors import DatasetError
from selfimprove.folders import publish

log = logging.getLogger(__name__)

_FLUSH_BYTES = 256 * 2**20  # pending import data written to the store in pieces of about this size


class LeRobotSource:
    """Read access to a LeRobot v3 dataset folder (metadata eagerly, frames per data file)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.info = read_lerobot_info(self.root)
        self.features: dict[str, dict] = self.info["features"]
        for key, feature in self.features.items():
            if not isinstance(feature, dict) or "dtype" not in feature or "shape" not in feature:
                raise DatasetError(f"{self.root}/meta/info.json: feature {key!r} lacks dtype or shape")
        self.tasks = read_tasks(self.root)
        self.episodes = self._read_episodes()

    @property
    def fps(self) -> float:
        return self.info["fps"]

    @property
    def num_episodes(self) -> int:
        return len(self.episodes["episode_index"])

    @property
    def num_frames(self) -> int:
        return int(sum(self.episodes["length"]))

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] == "video"]

    def _read_episodes(self) -> dict[str, list]:
        needed = ["episode_index", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                  "dataset_to_index"]
        for key in self.video_keys:
            needed += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
        return read_episodes(self.root, needed)

    def _row(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.episodes.items()}

    def read(self, mapping: LeRobotMapping, progress: bool = False) -> Iterator[Episode]:
        """Episodes in ``episode_index`` order, mapped onto our keys."""
        problems = mapping_problems(mapping, self.features)
        if problems:
            raise mapping_error(self.root, mapping, problems, self.features)
        sources = mapping.sources()
        columns = sorted({s.feature for s in sources.values() if self.features[s.feature]["dtype"] != "video"}
                         | {"episode_index", "frame_index", "task_index"}
                         | ({"timestamp"} if any(self.features[s.feature]["dtype"] == "video"
                                                 for s in sources.values()) else set()))
        files: dict[tuple[int, int], list[int]] = {}
        for i in range(self.num_episodes):
            files.setdefault((int(self.episodes["data/chunk_index"][i]), int(self.episodes["data/file_index"][i])),
                             []).append(i)
        bar = tqdm(total=self.num_episodes, desc=f"read {self.root.name}", unit="ep", disable=not progress)
        try:
            for (chunk, file), positions in sorted(files.items(), key=lambda kv: kv[1][0]):
                path = self.root / self.info["data_path"].format(chunk_index=chunk, file_index=file)
                available = set(read_schema(path))
                absent = [c for c in columns if c not in available]
                if absent:
                    raise DatasetError(f"{path} lacks the columns {absent} that info.json declares")
                table = read_parquet(path, columns, "data file")
                episode_column = table.column("episode_index").to_numpy()
                for i in positions:
                    yield self._episode(i, table, episode_column, sources, path)
                    bar.update(1)
        finally:
            bar.close()

    def _episode(self, i: int, table: pa.Table, episode_column: np.ndarray, sources: dict[str, FeatureSource],
                 path: Path) -> Episode:
        meta = self._row(i)
        index = int(meta["episode_index"])
        rows = np.flatnonzero(episode_column == index)
        where = f"{path.relative_to(self.root)}, episode {index}"
        if len(rows) != int(meta["length"]):
            raise DatasetError(f"{where}: {len(rows)} frames in the data file but length {meta['length']} in "
                               "meta/episodes; the dataset is corrupt")
        part = table.take(pa.array(rows))
        order = np.argsort(part.column("frame_index").to_numpy(), kind="stable")
        part = part.take(pa.array(order))
        if not np.array_equal(part.column("frame_index").to_numpy(), np.arange(len(rows))):
            raise DatasetError(f"{where}: frame_index is not 0..{len(rows) - 1}; the dataset is corrupt")
        arrays: dict[str, np.ndarray] = {}
        cache: dict[str, np.ndarray] = {}
        for key, source in sources.items():
            if source.feature not in cache:
                cache[source.feature] = self._feature_frames(source.feature, part, meta, where)
            value = cache[source.feature]
            if source.sliced:
                value = value[:, source.start:source.stop]
            if value.dtype.kind == "f":
                value = value.astype(np.float32)
            arrays[key] = np.ascontiguousarray(value)
        task_index = int(part.column("task_index")[0].as_py())
        if task_index not in self.tasks:
            raise DatasetError(f"{where}: task_index {task_index} is not in {TASKS_PATH}")
        if len(set(part.column("task_index").to_pylist())) > 1:
            log.warning("%s has several tasks; its instruction is the first frame's task", where)
        actions = arrays.pop("actions")
        if actions.ndim != 2:
            raise DatasetError(f"{where}: the action feature {sources['actions'].feature!r} is not a vector")
        return Episode(observations=arrays, actions=actions[:-1].astype(np.float32, copy=False),
                       instruction=self.tasks[task_index], true_success=None,
                       meta={"source": "lerobot", "lerobot_episode_index": index,
                             "robot_type": self.info.get("robot_type")})

    def _feature_frames(self, feature: str, part: pa.Table, meta: dict, where: str) -> np.ndarray:
        spec = self.features[feature]
        dtype = spec["dtype"]
        if dtype == "image":
            return decode_images(part.column(feature), f"{where}, {feature}", root=self.root)
        if dtype == "video":
            chunk, file = meta[f"videos/{feature}/chunk_index"], meta[f"videos/{feature}/file_index"]
            video = self.root / self.info["video_path"].format(video_key=feature, chunk_index=chunk, file_index=file)
            targets = float(meta[f"videos/{feature}/from_timestamp"]) + part.column("timestamp").to_numpy()
            return decode_video(video, targets.astype(np.float64), float(self.fps), f"{where}, {feature}")
        shape = [int(s) for s in spec["shape"]]
        values = numeric_column(part.column(feature), shape, f"{where}, {feature}")
        if dtype not in ("string",) and values.dtype.kind not in "biuf":
            raise DatasetError(f"{where}, {feature} is not numeric ({values.dtype})")
        return values



def import_lerobot(path: str | Path, out: str | Path, mapping: str | Path | LeRobotMapping | None = None,
                   overrides: list[str] | tuple[str, ...] = (), progress: bool = True) -> Path:
    """Convert a LeRobot v3 dataset into an episode store at ``out`` (written whole or not at all).

    ``mapping`` is a preset name (``pointmass``, ``language-table``), a TOML file, a
    :class:`LeRobotMapping` or ``None``/``"auto"`` (the preset that reads every observation feature,
    else every ``observation.*`` feature under its own name); ``overrides`` are ``SOURCE=KEY`` items.
    """
    source = LeRobotSource(path)
    chosen = load_mapping(mapping, overrides, auto=detect_import_mapping(source.features))
    problems = mapping_problems(chosen, source.features)
    if not chosen.observations:
        problems.append("it maps no observations (add some with --map LEROBOT_FEATURE=OUR_KEY)")
    if problems:
        raise mapping_error(source.root, chosen, problems, source.features)
    ignored = sorted(set(source.features) - mapped_features(chosen) - set(DEFAULT_FEATURES))
    log.info("importing %s with mapping %s: %s; not imported: %s", source.root, chosen.name,
             chosen.observations, ignored or "nothing")
    out = Path(out)
    tmp = claim_output(out)
    try:
        fps = source.fps if not float(source.fps).is_integer() else int(source.fps)
        writer = EpisodeWriter(tmp, fps=fps, robot_type=str(source.info.get("robot_type") or "unknown"))
        pending, kept, skipped = 0, 0, 0
        for episode in source.read(chosen, progress=progress):
            if episode.length < 1:
                skipped += 1
                continue
            writer.add(episode)
            kept += 1
            pending += sum(v.nbytes for v in episode.observations.values()) + episode.actions.nbytes
            if pending >= _FLUSH_BYTES:
                writer.flush()
                pending = 0
        writer.close()
        if kept == 0:
            raise DatasetError(f"{source.root} holds no episode with at least 2 frames; nothing to import")
        if skipped:
            log.warning("skipped %d episodes of a single frame (no action to learn from)", skipped)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %d episodes into %s", kept, out)
    return out


def check_lerobot(path: str | Path) -> list[str]:
    """Problems with a folder as a LeRobot v3.0 dataset (an empty list when it is sound).

    Checks info.json's keys and path templates, the task table, the episode table's columns, and that
    every episode's ``[dataset_from_index, dataset_to_index)`` range, file and length agree with the
    rows of the data files (``index``, ``episode_index``, ``frame_index``, ``task_index``).
    """
    root = Path(path)
    problems: list[str] = []
    try:
        info = read_lerobot_info(root)
        tasks = read_tasks(root)
        source = LeRobotSource(root)
    except DatasetError as exc:
        return [str(exc)]
    problems += [f"info.json lacks {k!r}" for k in INFO_KEYS if k not in info]
    for key, needed in (("data_path", ("{chunk_index", "{file_index")),
                        ("video_path", ("{video_key}", "{chunk_index", "{file_index"))):
        template = info.get(key)
        if template is not None and not all(n in template for n in needed):
            problems.append(f"info.json {key} {template!r} lacks one of {needed}")
    for key, dtype in DEFAULT_FEATURES.items():
        feature = info["features"].get(key)
        if feature is None or feature.get("dtype") != dtype or list(feature.get("shape", [])) != [1]:
            problems.append(f"feature {key!r} should be {{dtype: {dtype}, shape: [1]}}, got {feature}")
    if sorted(tasks) != list(range(len(tasks))):
        problems.append(f"task indices {sorted(tasks)} are not 0..{len(tasks) - 1}")
    episodes = source.episodes
    missing = [k for k in EPISODE_KEYS if k not in episodes]
    if missing:
        problems.append(f"the episode table lacks {missing}")
    if episodes["episode_index"] != list(range(source.num_episodes)):
        problems.append("episode_index in meta/episodes is not 0..N-1")
    if info.get("total_episodes") != source.num_episodes:
        problems.append(f"info.json total_episodes {info.get('total_episodes')} != {source.num_episodes} episode rows")
    if info.get("total_tasks") != len(tasks):
        problems.append(f"info.json total_tasks {info.get('total_tasks')} != {len(tasks)} tasks")
    expected = 0
    for i in range(source.num_episodes):
        start, stop = episodes["dataset_from_index"][i], episodes["dataset_to_index"][i]
        if start != expected or stop - start != episodes["length"][i]:
            problems.append(f"episode {episodes['episode_index'][i]}: rows [{start}, {stop}) do not follow on "
                            f"from {expected} with length {episodes['length'][i]}")
        expected = stop
    if info.get("total_frames") != expected:
        problems.append(f"info.json total_frames {info.get('total_frames')} != {expected} frames in meta/episodes")
    columns = [k for k, f in info["features"].items() if f.get("dtype") != "video"]
    rows_seen = 0
    data_files = sorted(root.glob("data/chunk-*/file-*.parquet"))
    if not data_files:
        problems.append("no data/chunk-XXX/file-XXX.parquet files")
    for path in data_files:
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as exc:
            problems.append(f"{path.relative_to(root)} is unreadable ({exc})")
            continue
        if sorted(names) != sorted(columns):
            problems.append(f"{path.relative_to(root)} has columns {names}; info.json features say {columns}")
            continue
        table = pq.read_table(path, columns=["index", "episode_index", "frame_index", "task_index"])
        index = table.column("index").to_numpy()
        if not np.array_equal(index, np.arange(rows_seen, rows_seen + len(index))):
            problems.append(f"{path.relative_to(root)}: index does not run on from {rows_seen}")
        episode = table.column("episode_index").to_numpy()
        for e in np.unique(episode):
            i = int(e)
            if not 0 <= i < source.num_episodes:
                problems.append(f"{path.relative_to(root)} holds episode {i}, which meta/episodes does not list")
                continue
            rows = np.flatnonzero(episode == e)
            start = episodes["dataset_from_index"][i]
            chunk_file = info["data_path"].format(chunk_index=episodes["data/chunk_index"][i],
                                                  file_index=episodes["data/file_index"][i])
            if root / chunk_file != path:
                problems.append(f"episode {i} is in {path.relative_to(root)} but meta/episodes says {chunk_file}")
            if not np.array_equal(index[rows], np.arange(start, start + episodes["length"][i])):
                problems.append(f"episode {i}: index values differ from [{start}, "
                                f"{start + episodes['length'][i]}) in meta/episodes")
            if not np.array_equal(table.column("frame_index").to_numpy()[rows], np.arange(len(rows))):
                problems.append(f"episode {i}: frame_index is not 0..{len(rows) - 1}")
        bad_tasks = set(table.column("task_index").to_pylist()) - set(tasks)
        if bad_tasks:
            problems.append(f"{path.relative_to(root)}: task_index {sorted(bad_tasks)} not in {TASKS_PATH}")
        rows_seen += len(index)
    if data_files and rows_seen != expected:
        problems.append(f"the data files hold {rows_seen} rows; meta/episodes says {expected}")
    for key in source.video_keys:
        for i in range(source.num_episodes):
            video = root / info["video_path"].format(video_key=key,
                                                     chunk_index=episodes[f"videos/{key}/chunk_index"][i],
                                                     file_index=episodes[f"videos/{key}/file_index"][i])
            if not video.exists():
                problems.append(f"episode {i}: {video.relative_to(root)} is missing")
                break
    if not (root / STATS_PATH).exists():
        problems.append("meta/stats.json is missing")
    return problems
