"""Episodes on disk in the LeRobot v3 folder layout (Parquet + JSON), readable by the ecosystem.

```
root/meta/info.json                              schema version, features, fps, counts, paths
root/meta/tasks.parquet                          task_index <-> instruction
root/meta/episodes/chunk-000/file-000.parquet    one row per episode: length, task, file, index range
root/data/chunk-000/file-000.parquet             one row per frame
```
Each episode stores its ``T + 1`` observations as ``T + 1`` frames; the last frame is the terminal
observation (``is_terminal``), whose ``action`` is zero padding. Steps-to-go labels are derived
(``length - frame_index``), never stored. Every file is written to a temporary name and renamed, so a
crash mid-write never leaves a half-written file where a reader looks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from selfimprove.data.episode import Episode
from selfimprove.data.v3 import (CHUNK_SIZE, CODEBASE_VERSION, DATA_PATH, EPISODES_PATH, INFO_PATH, RECOLLECT,
                                 TASKS_PATH, decode_images, frame_column, load_info, numeric_column, read_episodes,
                                 read_parquet, read_schema, read_tasks, tasks_table, write_meta_json, write_parquet)
from selfimprove.errors import DatasetError

log = logging.getLogger(__name__)

#: the data-file columns every frame read needs, besides the observations meta/info.json lists
FRAME_COLUMNS = ("index", "episode_index", "frame_index", "task_index", "is_terminal", "action")
#: the episode-table columns the store reads
EPISODE_COLUMNS = ("episode_index", "data/chunk_index", "data/file_index", "dataset_from_index", "dataset_to_index",
                   "length", "meta")
SCHEMA_VERSION = 1  # ``selfimprove_schema_version`` in meta/info.json: the columns of our own the store holds
PNG_COMPRESS_LEVEL = 1  # fast PNG for collection and practice (exports use Pillow's default, smaller files)


def _feature(values: np.ndarray, names: list[str] | None = None) -> dict[str, Any]:
    if is_image(values):
        return {"dtype": "image", "shape": list(values.shape[1:]), "names": ["height", "width", "channel"]}
    return {"dtype": str(values.dtype), "shape": list(values.shape[1:]) or [1], "names": names}


def is_image(values: np.ndarray) -> bool:
    """[N, H, W, 3] uint8 arrays are stored as PNG images (LeRobot's ``image`` feature type)."""
    return values.dtype == np.uint8 and values.ndim == 4 and values.shape[-1] in (1, 3)


@dataclass
class Frames:
    """All frames of a store as numpy arrays (one row per frame), plus per-episode offsets."""

    observations: dict[str, np.ndarray]
    actions: np.ndarray
    episode_index: np.ndarray
    frame_index: np.ndarray
    is_terminal: np.ndarray
    task_index: np.ndarray
    episode_lengths: np.ndarray  # T per episode (actions), in store order
    episode_ids: np.ndarray  # episode_index of each episode, in store order
    episode_start: np.ndarray  # first row of each episode
    instructions: list[str]  # by task_index
    extras: dict[str, np.ndarray]  # ``info.*`` diagnostics and ``stg``, when stored
    hold_steps: int = 0  # each episode goes on this many steps past reaching its goal (store-wide)

    @property
    def steps_to_go(self) -> np.ndarray:
        """Label of each frame: ``T - hold - frame_index``, at least 0 (0 from the goal frame on)."""
        lengths = np.repeat(self.episode_lengths - self.hold_steps, self.episode_lengths + 1)
        return np.maximum(lengths - self.frame_index, 0).astype(np.int64)

    @property
    def goal_reached(self) -> np.ndarray:
        """Frames at or past the demo's goal (the last ``hold_steps + 1`` of each episode)."""
        return self.steps_to_go == 0


class EpisodeWriter:
    """Appends episodes to a store; each ``flush`` writes one new data file and one episodes file."""

    def __init__(self, root: str | Path, fps: int = 10, robot_type: str = "sim",
                 flush_every: int = 10_000, hold_steps: int = 0, expert_labels: str = "executed") -> None:
        self.root = Path(root)
        self.fps = fps
        self.robot_type = robot_type
        self.flush_every = flush_every
        self.hold_steps = hold_steps  # demos only: steps each episode goes on past its goal (meta/info.json)
        self.expert_labels = expert_labels  # demos only: "intended" when the action column is not what was sent
        self._pending: list[Episode] = []
        self._info = self._load_or_new_info()
        self._tasks = self._load_tasks()

    def _load_or_new_info(self) -> dict[str, Any]:
        if (self.root / INFO_PATH).exists():
            return read_info(self.root)
        return {
            "codebase_version": CODEBASE_VERSION,
            "selfimprove_schema_version": SCHEMA_VERSION,
            "robot_type": self.robot_type,
            "fps": self.fps,
            "total_episodes": 0,
            "total_frames": 0,
            "total_tasks": 0,
            "chunks_size": CHUNK_SIZE,
            "data_path": DATA_PATH,
            "video_path": None,
            "splits": {},
            "features": {},
            "files_written": 0,
            "frame_layout": "T+1 frames per episode; the last is terminal (is_terminal) with a zero action",
            **({"hold_steps": int(self.hold_steps)} if self.hold_steps else {}),
            **({"expert_labels": self.expert_labels} if self.expert_labels != "executed" else {}),
        }

    def _load_tasks(self) -> dict[str, int]:
        if not (self.root / TASKS_PATH).exists():
            return {}
        return {task: index for index, task in read_tasks(self.root, ours=True).items()}

    @property
    def total_episodes(self) -> int:
        return int(self._info["total_episodes"]) + len(self._pending)

    def add(self, episode: Episode) -> None:
        episode.validate()
        self._pending.append(episode)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def extend(self, episodes: Iterable[Episode]) -> None:
        for episode in episodes:
            self.add(episode)

    def flush(self) -> None:
        """Write pending episodes as one new data file + episodes file, then update info.json."""
        if not self._pending:
            return
        info = self._info
        file_number = int(info["files_written"])
        chunk_index, file_index = divmod(file_number, CHUNK_SIZE)
        first_episode = int(info["total_episodes"])
        first_frame = int(info["total_frames"])

        columns: dict[str, list[np.ndarray]] = {}
        episode_rows: dict[str, list[Any]] = {k: [] for k in (
            "episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
            "dataset_from_index", "dataset_to_index", "true_success", "meta")}
        frame = first_frame
        for offset, ep in enumerate(self._pending):
            n = ep.length + 1
            idx = first_episode + offset
            task = self._tasks.setdefault(ep.instruction, len(self._tasks))
            for key, value in ep.observations.items():
                columns.setdefault(f"observation.{key}", []).append(np.asarray(value))
            action = np.zeros((n, ep.actions.shape[1]), dtype=np.float32)
            action[:-1] = ep.actions
            columns.setdefault("action", []).append(action)
            columns.setdefault("timestamp", []).append(np.arange(n, dtype=np.float32) / self.fps)
            columns.setdefault("frame_index", []).append(np.arange(n, dtype=np.int64))
            columns.setdefault("episode_index", []).append(np.full(n, idx, dtype=np.int64))
            columns.setdefault("index", []).append(np.arange(frame, frame + n, dtype=np.int64))
            columns.setdefault("task_index", []).append(np.full(n, task, dtype=np.int64))
            terminal = np.zeros(n, dtype=bool)
            terminal[-1] = True
            columns.setdefault("is_terminal", []).append(terminal)
            for key, value in ep.info.items():
                columns.setdefault(f"info.{key}", []).append(np.asarray(value))
            if ep.stg is not None:
                columns.setdefault("stg", []).append(np.asarray(ep.stg, dtype=np.float32))
            episode_rows["episode_index"].append(idx)
            episode_rows["tasks"].append([ep.instruction])
            episode_rows["length"].append(n)
            episode_rows["data/chunk_index"].append(chunk_index)
            episode_rows["data/file_index"].append(file_index)
            episode_rows["dataset_from_index"].append(frame)
            episode_rows["dataset_to_index"].append(frame + n)
            episode_rows["true_success"].append(ep.true_success)
            episode_rows["meta"].append(json.dumps(ep.meta, default=_json_default))
            frame += n

        lengths = {key: sum(len(v) for v in values) for key, values in columns.items()}
        expected = frame - first_frame
        for key, count in lengths.items():
            if count != expected:
                raise DatasetError(f"column {key!r} is missing in some episodes of this batch; "
                                   "every episode of a store must have the same observation/info keys")
        arrays: dict[str, pa.Array] = {}
        features = dict(info["features"])
        for key, values in columns.items():
            stacked = np.concatenate(values)
            arrays[key] = frame_column(stacked, image=is_image(stacked), compress_level=PNG_COMPRESS_LEVEL)
            feature = _feature(stacked)
            if key in features and features[key]["shape"] != feature["shape"]:
                raise DatasetError(f"feature {key!r} has shape {feature['shape']} but the store at {self.root} "
                                   f"holds {features[key]['shape']}; write to a new folder")
            features[key] = feature

        data_path = self.root / DATA_PATH.format(chunk_index=chunk_index, file_index=file_index)
        write_parquet(pa.table(arrays), data_path)
        episodes_path = self.root / EPISODES_PATH.format(chunk_index=chunk_index, file_index=file_index)
        write_parquet(pa.table(episode_rows), episodes_path)
        tasks = [task for task, _ in sorted(self._tasks.items(), key=lambda kv: kv[1])]
        write_parquet(tasks_table(tasks, pandas_index=False), self.root / TASKS_PATH)
        info.update(
            total_episodes=first_episode + len(self._pending),
            total_frames=frame,
            total_tasks=len(self._tasks),
            features=features,
            files_written=file_number + 1,
        )
        info["splits"] = {"train": f"0:{info['total_episodes']}"}
        write_meta_json(self.root / INFO_PATH, info)  # last: readers trust info.json
        self._pending = []

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "EpisodeWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in episode meta")


def has_store(root: str | Path) -> bool:
    """Whether ``root`` holds an episode store (its ``meta/info.json``), finished or being written."""
    return (Path(root) / INFO_PATH).exists()


def stored_episodes(root: str | Path) -> int | None:
    """Episodes in the store at ``root`` by its ``meta/info.json`` (None when there is no readable store)."""
    try:
        return json.loads((Path(root) / INFO_PATH).read_text()).get("total_episodes")
    except (OSError, ValueError, AttributeError):
        return None


def read_info(root: str | Path) -> dict[str, Any]:
    """Read and check ``meta/info.json``; a missing or corrupt store raises DatasetError."""
    path = Path(root) / INFO_PATH
    info = load_info(root, ours=True)
    version = info.get("selfimprove_schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(f"{path} has schema version {version!r}; this selfimprove reads version "
                           f"{SCHEMA_VERSION}. Re-collect the dataset or import it with `selfimprove dataset import`")
    return info


def _column_to_numpy(table: pa.Table, key: str, feature: dict[str, Any], where: Path) -> np.ndarray:
    """A stored column: images decoded, vectors ``[N, *shape]`` in the feature's dtype, scalars ``[N]``."""
    column = table.column(key)
    if feature["dtype"] == "image":
        return decode_images(column, where, shape=feature["shape"], ours=True)
    values = numeric_column(column, feature["shape"], where, flat_scalars=True)
    return values if values.ndim == 1 else values.astype(feature["dtype"], copy=False)


class EpisodeStore:
    """Read access to an episode store; validates everything it loads."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.info = read_info(self.root)
        self._episodes = self._read_episode_tables()

    @property
    def num_episodes(self) -> int:
        return len(self._episodes["episode_index"])

    @property
    def fps(self) -> int:
        return int(self.info["fps"])

    def _read_episode_tables(self) -> dict[str, np.ndarray | list]:
        episodes = read_episodes(self.root, EPISODE_COLUMNS, ours=True)
        if not episodes and self.info.get("total_episodes", 0):
            raise DatasetError(f"{self.root}/meta/episodes holds no files; re-collect the dataset")
        return episodes or {"episode_index": np.zeros(0, dtype=np.int64)}

    def episode_meta(self, i: int) -> dict[str, Any]:
        return json.loads(self._episodes["meta"][i])

    @property
    def episode_lengths(self) -> np.ndarray:
        """Steps (actions) of each episode, from the metadata alone (no frames are read)."""
        return np.asarray(self._episodes.get("length", []), dtype=np.int64) - 1

    @property
    def observation_shapes(self) -> dict[str, list[int]]:
        """Per-frame shape of each observation, from meta/info.json alone (no frames are read)."""
        return {k.removeprefix("observation."): list(f["shape"]) for k, f in self.info["features"].items()
                if k.startswith("observation.")}

    @property
    def instructions(self) -> list[str]:
        """Every instruction of the store, by task index (meta/tasks.parquet)."""
        tasks = read_tasks(self.root, ours=True)
        return [tasks[i] for i in sorted(tasks)]

    @property
    def true_success(self) -> list[bool | None]:
        return list(self._episodes.get("true_success", []))

    def frames(self, episodes: Iterable[int] | None = None) -> Frames:
        """Load frames (of the given store positions, or all) as numpy arrays, checking for NaN."""
        files: dict[tuple[int, int], list[int]] = {}
        wanted = range(self.num_episodes) if episodes is None else sorted(set(int(e) for e in episodes))
        for i in wanted:
            if not 0 <= i < self.num_episodes:
                raise DatasetError(f"episode {i} is not in {self.root} ({self.num_episodes} episodes)")
            key = (self._episodes["data/chunk_index"][i], self._episodes["data/file_index"][i])
            files.setdefault(key, []).append(i)
        features = self.info["features"]
        parts: dict[str, list[np.ndarray]] = {}
        lengths, ids = [], []
        for (chunk, file), eps in sorted(files.items()):
            path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=file)
            table = read_parquet(path, ours=True)
            self._check_columns(path, table.column_names)
            first = int(table.column("index")[0].as_py()) if table.num_rows else 0
            rows = np.concatenate([np.arange(self._episodes["dataset_from_index"][i] - first,
                                             self._episodes["dataset_to_index"][i] - first) for i in eps])
            if rows.size and (rows.max() >= table.num_rows or rows.min() < 0):
                raise DatasetError(f"{path} has fewer rows than meta/episodes says; the store is corrupt, re-collect it")
            table = table.take(pa.array(rows))
            for key in table.column_names:
                if key not in features:
                    continue
                array = _column_to_numpy(table, key, features[key], path)
                if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                    bad = int(np.argmax(~np.isfinite(array.reshape(len(array), -1)).all(axis=1)))
                    raise DatasetError(
                        f"{path}: column {key!r} holds NaN/inf (first at frame row {rows[bad]}). "
                        f"Remove the episode or re-collect the dataset")
                parts.setdefault(key, []).append(array)
            lengths.extend(self._episodes["length"][i] - 1 for i in eps)
            ids.extend(self._episodes["episode_index"][i] for i in eps)
        data = {k: np.concatenate(v) for k, v in parts.items()}
        if not data:
            raise DatasetError(f"{self.root} holds no frames for the requested episodes")
        lengths_arr = np.asarray(lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths_arr + 1)[:-1]]).astype(np.int64)
        instructions = self.instructions
        return Frames(
            observations={k.removeprefix("observation."): v for k, v in data.items() if k.startswith("observation.")},
            actions=data["action"].astype(np.float32),
            episode_index=data["episode_index"],
            frame_index=data["frame_index"],
            is_terminal=data["is_terminal"],
            task_index=data["task_index"],
            episode_lengths=lengths_arr,
            episode_ids=np.asarray(ids, dtype=np.int64),
            episode_start=starts,
            instructions=instructions,
            extras={k: v for k, v in data.items() if k.startswith("info.") or k == "stg"},
            hold_steps=int(self.info.get("hold_steps", 0)),
        )

    def _check_columns(self, path: Path, names: list[str]) -> None:
        """DatasetError naming the columns a data file lacks (the fixed ones and the observations of meta/info.json)."""
        wanted = [*FRAME_COLUMNS, *(k for k in self.info["features"] if k.startswith("observation."))]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DatasetError(f"{path} has no column {', '.join(map(repr, missing))} (it has {', '.join(names)}); "
                               f"the store is damaged or was not written by selfimprove: {RECOLLECT}, or import "
                               "a LeRobot dataset with `selfimprove dataset import`")

    def check_columns(self) -> None:
        """Check every data file's columns from its Parquet footer alone (before any frame is read)."""
        for path in sorted(self.root.glob("data/chunk-*/file-*.parquet")):
            self._check_columns(path, read_schema(path, ours=True))

    def episodes(self, episodes: Iterable[int] | None = None) -> list[Episode]:
        """Rebuild Episode objects (for diagnostics, export and tests)."""
        frames = self.frames(episodes)
        wanted = list(range(self.num_episodes) if episodes is None else sorted(set(int(e) for e in episodes)))
        out = []
        for i, start, length in zip(wanted, frames.episode_start, frames.episode_lengths):
            stop = start + length + 1
            stg = frames.extras.get("stg")
            out.append(Episode(
                observations={key: v[start:stop] for key, v in frames.observations.items()},
                actions=frames.actions[start:stop - 1],
                instruction=frames.instructions[int(frames.task_index[start])],
                true_success=self._episodes["true_success"][i],
                meta=self.episode_meta(i),
                info={k.removeprefix("info."): v[start:stop] for k, v in frames.extras.items() if k != "stg"},
                stg=None if stg is None else stg[start:stop],
            ))
        return out


def split_episodes(num_episodes: int, val_fraction: float, fraction: float = 1.0, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) store positions.

    One fixed permutation (seeded by ``seed``, not the run seed) decides everything, so subsets are
    nested: the 10% training subset is inside the 20% one, and validation never changes with
    ``fraction``.
    """
    if not 0 < fraction <= 1:
        raise DatasetError(f"fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(num_episodes)
    n_val = max(1, int(round(val_fraction * num_episodes)))
    if n_val >= num_episodes:
        raise DatasetError(f"a store of {num_episodes} episodes is too small for a validation split")
    val, train = order[num_episodes - n_val:], order[: num_episodes - n_val]
    n_train = max(1, int(round(fraction * len(train))))
    return np.sort(train[:n_train]), np.sort(val)


def truncate_store(root: str | Path, files: int) -> None:
    """Keep only the first ``files`` data/episodes files of a store (drops work a crash left unfinished)."""
    root = Path(root)
    info_path = root / INFO_PATH
    if not info_path.exists():
        return
    info = read_info(root)
    if int(info["files_written"]) <= files:
        return
    total_episodes = total_frames = 0
    for number in range(int(info["files_written"])):
        chunk_index, file_index = divmod(number, CHUNK_SIZE)
        data = root / DATA_PATH.format(chunk_index=chunk_index, file_index=file_index)
        episodes = root / EPISODES_PATH.format(chunk_index=chunk_index, file_index=file_index)
        if number < files:
            table = read_parquet(episodes, ours=True)
            total_episodes += table.num_rows
            total_frames += sum(table.column("length").to_pylist())
        else:
            data.unlink(missing_ok=True)
            episodes.unlink(missing_ok=True)
    info.update(files_written=files, total_episodes=total_episodes, total_frames=total_frames)
    info["splits"] = {"train": f"0:{total_episodes}"}
    write_meta_json(info_path, info)
    log.info("store %s truncated to %d files (%d episodes)", root, files, total_episodes)
