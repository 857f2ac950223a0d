"""LeRobot v3 datasets <-> episode stores: import, export, inspect, check.

A LeRobot v3.0 dataset folder (the format of ``lerobot`` >= 0.4) is::

    meta/info.json                                    codebase_version "v3.0", fps, features, path templates
    meta/tasks.parquet                                task text (the pandas index) -> task_index
    meta/episodes/chunk-000/file-000.parquet          one row per episode: length, tasks, row range, file
    meta/stats.json                                   per-feature min/max/mean/std/count/quantiles
    data/chunk-000/file-000.parquet                   one row per frame: action, observation.*, timestamp,
                                                      frame_index, episode_index, index, task_index
    videos/<key>/chunk-000/file-000.mp4               only for "video" features

Frames are mapped onto :class:`~selfimprove.data.episode.Episode` by a :class:`LeRobotMapping`
(LeRobot feature -> our observation key, ``action`` -> actions, task -> instruction). A LeRobot
episode of ``N`` frames becomes ``N`` observations and ``N - 1`` actions: our last frame is the
terminal observation and carries no action, so the action stored on a LeRobot episode's last frame
is not kept, and export writes zeros there.

Library choice: this module reads and writes the format with pyarrow (already a dependency) and
Pillow, not with the ``lerobot`` package. ``lerobot`` 0.4.x, the releases that speak v3.0, require
``torch<2.11`` and cannot be installed beside this project's torch 2.13; ``lerobot`` 0.3.x resolves
but reads only the older v2.1 layout and would downgrade gymnasium to 0.29; the standalone
``lerobot-dataset`` package imports torch and torchvision and pulls about thirty packages (datasets,
huggingface-hub, pandas, opencv, cmake). Video features are decoded with PyAV (``av``, the optional
``lerobot`` extra), which installs from one wheel without touching torch. Export writes camera
frames as ``image`` features (PNG bytes in the Parquet files), which LeRobot's loader reads without
a video decoder.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from selfimprove.data.episode import Episode
from selfimprove.data.store import EpisodeStore, EpisodeWriter
from selfimprove.folders import ensure_empty, publish, staging_folder
from selfimprove.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

CODEBASE_VERSION = "v3.0"
CHUNK_SIZE = 1000  # files per chunk folder
DATA_FILE_SIZE_MB = 100  # LeRobot's defaults for rolling over to a new file
VIDEO_FILE_SIZE_MB = 200
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
TASKS_PATH = "meta/tasks.parquet"
DEFAULT_FEATURES = {  # every LeRobot frame has these, after the dataset's own features
    "timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64", "task_index": "int64",
}
INFO_KEYS = ("codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size",
             "data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits", "data_path", "video_path", "features")
EPISODE_KEYS = ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                "dataset_to_index", "meta/episodes/chunk_index", "meta/episodes/file_index")
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
_STATS_FRAMES = 100  # image stats are computed on at most this many frames per episode
_FLUSH_BYTES = 256 * 2**20  # pending import data written to the store in pieces of about this size


# -- the mapping ------------------------------------------------------------------------------------

_SOURCE = re.compile(r"^(?P<feature>[^\[\]]+?)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


@dataclass(frozen=True)
class _Source:
    """A LeRobot feature, or a slice ``[start:stop]`` of a vector feature."""

    feature: str
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "_Source":
        match = _SOURCE.match(spec.strip())
        if not match:
            raise ConfigError(f"cannot read the LeRobot feature {spec!r}: write a feature name such as "
                              "'observation.state', or a slice of a vector feature such as 'observation.state[0:2]'")
        start, stop = match["start"], match["stop"]
        if start is None and stop is None:
            return cls(match["feature"])
        return cls(match["feature"], int(start) if start else 0, int(stop) if stop else None)

    @property
    def sliced(self) -> bool:
        return self.start is not None


@dataclass
class LeRobotMapping:
    """Which LeRobot feature feeds each part of our episodes; export applies it in reverse.

    ``observations`` maps our observation key to a LeRobot feature, or to a slice of a vector
    feature (``"observation.state[0:2]"``), so one LeRobot state vector can feed several of our keys.
    ``actions`` names the action feature; ``instruction`` is ``"task"``: each episode's instruction
    is the task text of its first frame (``task_index`` -> ``meta/tasks.parquet``).
    """

    observations: dict[str, str] = field(default_factory=dict)
    actions: str = "action"
    instruction: str = "task"
    name: str = "custom"

    def sources(self) -> dict[str, _Source]:
        """Our key -> parsed source, with ``"actions"`` for the action feature."""
        out = {key: _Source.parse(spec) for key, spec in self.observations.items()}
        out["actions"] = _Source.parse(self.actions)
        return out

    def with_overrides(self, items: list[str] | tuple[str, ...]) -> "LeRobotMapping":
        """Apply ``SOURCE=KEY`` overrides: ``KEY`` is ``actions``, ``instruction`` or an observation key.

        ``SOURCE=`` (nothing after ``=``) drops the observations read from ``SOURCE``.
        """
        observations = dict(self.observations)
        actions, instruction = self.actions, self.instruction
        for item in items:
            if "=" not in item:
                raise ConfigError(f"--map {item!r}: write LEROBOT_FEATURE=OUR_KEY, e.g. observation.state=state, "
                                  "action=actions or observation.images.top=image")
            source, key = (s.strip() for s in item.split("=", 1))
            _Source.parse(source)
            if key == "actions":
                actions = source
            elif key == "instruction":
                if source != "task":
                    raise ConfigError(f"--map {item!r}: the instruction can only come from the task "
                                      "(task_index -> meta/tasks.parquet); write task=instruction")
                instruction = source
            else:
                observations = {k: v for k, v in observations.items() if v != source}
                if key:
                    if not re.fullmatch(r"[A-Za-z0-9_]+", key):
                        raise ConfigError(f"--map {item!r}: observation keys are letters, digits and '_'")
                    observations[key] = source
        return replace(self, observations=observations, actions=actions, instruction=instruction,
                       name=f"{self.name}+map" if items else self.name)

    def validate(self) -> "LeRobotMapping":
        if self.instruction != "task":
            raise ConfigError(f"mapping {self.name!r}: instruction must be 'task', got {self.instruction!r}")
        self.sources()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "actions": self.actions, "instruction": self.instruction,
                "observations": dict(self.observations)}


LEROBOT_PRESETS: dict[str, LeRobotMapping] = {
    "language-table": LeRobotMapping(
        name="language-table",
        observations={"image": "observation.images.top", "effector": "observation.state[0:2]",
                      "effector_target": "observation.state[2:4]"}),
    "pointmass": LeRobotMapping(name="pointmass", observations={"state": "observation.state"}),
}


def load_mapping(preset: str | Path | LeRobotMapping | None, overrides: list[str] | tuple[str, ...] = (),
                 auto: LeRobotMapping | None = None) -> LeRobotMapping:
    """A preset name, a TOML file or a mapping, with ``--map`` overrides applied.

    ``None`` or ``"auto"`` starts from ``auto`` (the mapping detected for the data at hand).
    """
    if preset is None or preset == "auto":
        base = auto or LeRobotMapping(name="auto")
    elif isinstance(preset, LeRobotMapping):
        base = preset
    elif str(preset) in LEROBOT_PRESETS:
        base = LEROBOT_PRESETS[str(preset)]
    elif str(preset).endswith(".toml"):
        base = _mapping_from_toml(Path(preset))
    else:
        raise ConfigError(f"unknown LeRobot mapping preset {preset!r}: use one of {sorted(LEROBOT_PRESETS)}, "
                          "'auto', or a .toml file with an [observations] table")
    return base.with_overrides(overrides).validate()


def _mapping_from_toml(path: Path) -> LeRobotMapping:
    if not path.exists():
        raise ConfigError(f"mapping file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"mapping file {path} is not valid TOML: {exc}") from exc
    data = data.get("lerobot", data)
    known = {"observations", "actions", "instruction", "name"}
    if set(data) - known:
        raise ConfigError(f"mapping file {path}: unknown keys {sorted(set(data) - known)}; known keys: {sorted(known)}")
    observations = data.get("observations", {})
    if not isinstance(observations, dict) or not all(isinstance(v, str) for v in observations.values()):
        raise ConfigError(f"mapping file {path}: [observations] must map our keys to LeRobot feature names")
    return LeRobotMapping(observations=dict(observations), actions=str(data.get("actions", "action")),
                          instruction=str(data.get("instruction", "task")), name=str(data.get("name", path.stem)))


def _generic_import_mapping(features: dict[str, dict]) -> LeRobotMapping:
    """Every ``observation.*`` feature under its own name (one camera becomes ``image``)."""
    cameras = [k for k, f in features.items() if k.startswith("observation.") and f.get("dtype") in ("image", "video")]
    observations = {}
    for key, feature in features.items():
        if not key.startswith("observation."):
            continue
        if key in cameras:
            ours = "image" if len(cameras) == 1 else key.removeprefix("observation.").removeprefix("images.")
        else:
            ours = key.removeprefix("observation.")
        observations[re.sub(r"[^A-Za-z0-9_]", "_", ours)] = key
    return LeRobotMapping(name="generic", observations=observations)


def _mapped_features(mapping: LeRobotMapping) -> set[str]:
    return {s.feature for s in mapping.sources().values()}


def detect_import_mapping(features: dict[str, dict]) -> LeRobotMapping:
    """The first preset that reads every observation feature of a dataset, else the generic mapping."""
    observed = {k for k in features if k.startswith("observation.")}
    for mapping in LEROBOT_PRESETS.values():
        used = _mapped_features(mapping)
        if used <= set(features) and observed <= used and not _mapping_problems(mapping, features):
            return mapping
    return _generic_import_mapping(features)


# -- reading a LeRobot dataset -------------------------------------------------------------------------

def _describe(features: dict[str, dict]) -> str:
    return ", ".join(f"{k} ({f.get('dtype')}, shape {list(f.get('shape', []))})" for k, f in features.items())


def _read_table(path: Path, columns: list[str] | None = None, what: str = "file") -> pa.Table:
    if not path.exists():
        raise DatasetError(f"{path} is missing: the dataset is incomplete ({what}); copy it again")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path} is corrupt or unreadable ({exc}); copy the dataset again") from exc


def read_lerobot_info(root: str | Path) -> dict[str, Any]:
    """``meta/info.json`` of a LeRobot v3 dataset, checked for the keys a reader needs."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"no dataset at {root}: the folder does not exist")
    path = root / "meta" / "info.json"
    if not path.exists():
        raise DatasetError(f"{root} is not a LeRobot dataset: meta/info.json is missing (a LeRobot v3 folder "
                           "holds meta/info.json, meta/tasks.parquet, meta/episodes/ and data/)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is corrupt ({exc}); copy the dataset again") from exc
    if not isinstance(info, dict):
        raise DatasetError(f"{path} does not hold a JSON object; copy the dataset again")
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise DatasetError(f"{root} has codebase_version {version or None!r}; this reader supports LeRobot v3.0. "
                           "Convert older datasets with LeRobot's v2.1 -> v3.0 converter "
                           "(lerobot.datasets.v30.convert_dataset_v21_to_v30) first")
    missing = [k for k in ("fps", "features", "data_path") if k not in info]
    if not isinstance(info.get("features"), dict):
        missing.append("features (an object)")
    if any(f.get("dtype") == "video" for f in (info.get("features") or {}).values()) and not info.get("video_path"):
        missing.append("video_path")
    if missing:
        raise DatasetError(f"{path} lacks {', '.join(missing)}; it is not a complete LeRobot v3 info.json")
    return info


def read_tasks(root: str | Path) -> dict[int, str]:
    """task_index -> task text, from LeRobot's pandas-indexed table or our plain ``task`` column."""
    path = Path(root) / TASKS_PATH
    table = _read_table(path, what="task table")
    names = table.column_names
    text_column = None
    pandas_meta = (table.schema.metadata or {}).get(b"pandas")
    if pandas_meta:
        index_columns = json.loads(pandas_meta).get("index_columns", [])
        text_column = next((c for c in index_columns if isinstance(c, str) and c in names), None)
    if text_column is None:
        text_column = next((c for c in ("task", "__index_level_0__") if c in names), None)
    if "task_index" not in names or text_column is None:
        raise DatasetError(f"{path} has columns {names}; expected task_index and the task text")
    indices = table.column("task_index").to_pylist()
    texts = table.column(text_column).to_pylist()
    return {int(i): str(t) for i, t in zip(indices, texts)}


def _column_numpy(column: pa.ChunkedArray | pa.Array, rows: int, shape: list[int], where: str) -> np.ndarray:
    """A numeric (possibly nested-list) column -> ``[rows, *shape]``."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array.type, pa.ExtensionType):
        array = array.storage
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    if array.null_count:
        raise DatasetError(f"{where} holds missing (null) values; fill or drop those frames first")
    values = array.to_numpy(zero_copy_only=False)
    size = rows * int(np.prod(shape))
    if values.size != size:
        raise DatasetError(f"{where} holds {values.size} values for {rows} frames; info.json says shape {shape}")
    return values.reshape(rows, *shape)


def _decode_image(blob: bytes | None, path: str | None, root: Path, where: str) -> np.ndarray:
    try:
        if blob is not None:
            image = Image.open(io.BytesIO(blob))
        elif path:
            image = Image.open(root / path)
        else:
            raise DatasetError(f"{where}: an image has neither bytes nor a path")
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        frame = np.asarray(image)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{where}: an image cannot be decoded ({exc}); the dataset is corrupt") from exc
    return frame[:, :, None] if frame.ndim == 2 else frame


def _image_column(column: pa.ChunkedArray, root: Path, where: str) -> np.ndarray:
    array = column.combine_chunks()
    if not pa.types.is_struct(array.type) or array.type.get_field_index("bytes") < 0:
        raise DatasetError(f"{where} is not an image column (expected a struct of bytes and path, got {array.type})")
    blobs = array.field("bytes").to_pylist()
    paths = (array.field("path").to_pylist() if array.type.get_field_index("path") >= 0 else [None] * len(blobs))
    frames = [_decode_image(b, p, root, where) for b, p in zip(blobs, paths)]
    if len({f.shape for f in frames}) > 1:
        raise DatasetError(f"{where} holds images of different sizes ({sorted({f.shape for f in frames})})")
    return np.stack(frames)


def _av():
    try:
        import av
    except ImportError as exc:
        raise DatasetError("this dataset stores cameras as video; decoding them needs PyAV: "
                           "pip install 'selfimprove[lerobot]' (av==18.1.0)") from exc
    return av


def _decode_video(path: Path, targets: np.ndarray, fps: float, where: str) -> np.ndarray:
    """The frames of ``path`` nearest to ``targets`` (seconds), each within half a frame."""
    av = _av()
    if not path.exists():
        raise DatasetError(f"{path} is missing ({where}); the dataset is incomplete")
    tolerance = 0.5 / fps + 1e-4
    start, stop = float(targets.min()) - tolerance, float(targets.max()) + tolerance
    times, frames = [], []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if start > 0 and stream.time_base is not None:
                container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if frame.time > stop:
                    break
                if frame.time >= start:
                    times.append(frame.time)
                    frames.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        raise DatasetError(f"{path} cannot be decoded ({exc}); the video is corrupt") from exc
    if not frames:
        raise DatasetError(f"{path} holds no frames between {start:.3f} s and {stop:.3f} s ({where})")
    times_arr = np.asarray(times)
    nearest = np.abs(times_arr[None, :] - targets[:, None]).argmin(1)
    error = np.abs(times_arr[nearest] - targets)
    if error.max() > tolerance:
        raise DatasetError(f"{path}: no video frame within {tolerance:.4f} s of timestamp "
                           f"{targets[int(error.argmax())]:.4f} s ({where}); the timestamps and the video disagree")
    return np.stack([frames[i] for i in nearest])


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
        folder = self.root / "meta" / "episodes"
        paths = sorted(folder.glob("chunk-*/file-*.parquet"))
        if not paths:
            raise DatasetError(f"{folder} holds no chunk-XXX/file-XXX.parquet files; the dataset is incomplete")
        tables = []
        for path in paths:
            try:
                columns = [c for c in pq.read_schema(path).names if not c.startswith("stats/")]
            except (pa.ArrowException, OSError) as exc:
                raise DatasetError(f"{path} is corrupt or unreadable ({exc}); copy the dataset again") from exc
            tables.append(_read_table(path, columns, "episode table"))
        try:
            table = pa.concat_tables(tables, promote_options="default")
        except pa.ArrowException as exc:
            raise DatasetError(f"the files in {folder} disagree on their columns ({exc})") from exc
        needed = ["episode_index", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                  "dataset_to_index"]
        for key in self.video_keys:
            needed += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise DatasetError(f"the episode table in {folder} lacks columns {missing}")
        table = table.sort_by("episode_index")
        return {name: table.column(name).to_pylist() for name in table.column_names}

    def _row(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.episodes.items()}

    def read(self, mapping: LeRobotMapping, progress: bool = False) -> Iterator[Episode]:
        """Episodes in ``episode_index`` order, mapped onto our keys."""
        problems = _mapping_problems(mapping, self.features)
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
                available = set(_schema_names(path))
                absent = [c for c in columns if c not in available]
                if absent:
                    raise DatasetError(f"{path} lacks the columns {absent} that info.json declares")
                table = _read_table(path, columns, "data file")
                episode_column = table.column("episode_index").to_numpy()
                for i in positions:
                    yield self._episode(i, table, episode_column, sources, path)
                    bar.update(1)
        finally:
            bar.close()

    def _episode(self, i: int, table: pa.Table, episode_column: np.ndarray, sources: dict[str, _Source],
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
            return _image_column(part.column(feature), self.root, f"{where}, {feature}")
        if dtype == "video":
            chunk, file = meta[f"videos/{feature}/chunk_index"], meta[f"videos/{feature}/file_index"]
            video = self.root / self.info["video_path"].format(video_key=feature, chunk_index=chunk, file_index=file)
            targets = float(meta[f"videos/{feature}/from_timestamp"]) + part.column("timestamp").to_numpy()
            return _decode_video(video, targets.astype(np.float64), float(self.fps), f"{where}, {feature}")
        shape = [int(s) for s in spec["shape"]]
        values = _column_numpy(part.column(feature), part.num_rows, shape, f"{where}, {feature}")
        if dtype not in ("string",) and values.dtype.kind not in "biuf":
            raise DatasetError(f"{where}, {feature} is not numeric ({values.dtype})")
        return values


def _schema_names(path: Path) -> list[str]:
    if not path.exists():
        raise DatasetError(f"{path} is missing: the dataset is incomplete (data file); copy it again")
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path} is corrupt or unreadable ({exc}); copy the dataset again") from exc


def _mapping_problems(mapping: LeRobotMapping, features: dict[str, dict]) -> list[str]:
    problems = []
    for key, source in mapping.sources().items():
        what = "actions" if key == "actions" else f"observation {key!r}"
        feature = features.get(source.feature)
        if feature is None:
            verb = "read" if key == "actions" else "reads"
            problems.append(f"{what} {verb} {source.feature!r}, which the dataset does not have")
            continue
        camera = feature["dtype"] in ("image", "video")
        if key == "actions" and (camera or len(feature["shape"]) != 1):
            problems.append(f"actions read {source.feature!r}, which is not a vector")
        if source.sliced:
            size = int(feature["shape"][0]) if len(feature["shape"]) == 1 else -1
            stop = size if source.stop is None else source.stop
            if camera or size < 0:
                problems.append(f"{what} slices {source.feature!r}, which is not a vector")
            elif not 0 <= source.start < stop <= size:
                problems.append(f"{what} reads [{source.start}:{source.stop}] of {source.feature!r}, "
                                f"which has {size} values")
    return problems


def mapping_error(root: Path, mapping: LeRobotMapping, problems: list[str], features: dict[str, dict]
                  ) -> DatasetError:
    return DatasetError(
        f"{root} does not match the LeRobot mapping {mapping.name!r}: {'; '.join(problems)}. "
        f"The dataset's features: {_describe(features)}. Choose a preset ({', '.join(LEROBOT_PRESETS)}) that fits, "
        "or map features with --map LEROBOT_FEATURE=OUR_KEY (e.g. --map observation.state=state)")


# -- import -------------------------------------------------------------------------------------------

def _claim_output(out: Path) -> Path:
    """An empty staging folder beside ``out``; ``out`` itself must not hold anything yet."""
    ensure_empty(out, "a dataset", "Choose another --out or move its files away first", DatasetError)
    tmp = staging_folder(out)
    tmp.mkdir()
    return tmp


def import_lerobot(path: str | Path, out: str | Path, mapping: str | Path | LeRobotMapping | None = None,
                   overrides: list[str] | tuple[str, ...] = (), progress: bool = True) -> Path:
    """Convert a LeRobot v3 dataset into an episode store at ``out`` (written whole or not at all).

    ``mapping`` is a preset name (``pointmass``, ``language-table``), a TOML file, a
    :class:`LeRobotMapping` or ``None``/``"auto"`` (the preset that reads every observation feature,
    else every ``observation.*`` feature under its own name); ``overrides`` are ``SOURCE=KEY`` items.
    """
    source = LeRobotSource(path)
    chosen = load_mapping(mapping, overrides, auto=detect_import_mapping(source.features))
    problems = _mapping_problems(chosen, source.features)
    if not chosen.observations:
        problems.append("it maps no observations (add some with --map LEROBOT_FEATURE=OUR_KEY)")
    if problems:
        raise mapping_error(source.root, chosen, problems, source.features)
    ignored = sorted(set(source.features) - _mapped_features(chosen) - set(DEFAULT_FEATURES))
    log.info("importing %s with mapping %s: %s; not imported: %s", source.root, chosen.name,
             chosen.observations, ignored or "nothing")
    out = Path(out)
    tmp = _claim_output(out)
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


# -- export -------------------------------------------------------------------------------------------

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
        sources[key] = _Source(default)
    if action.sliced:
        raise DatasetError(f"mapping {mapping.name!r} reads actions from a slice ({mapping.actions}); "
                           "export needs a whole feature, e.g. --map action=actions")
    grouped: dict[str, list[tuple[str, _Source]]] = {}
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


def _png(frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame).save(out, format="PNG")
    return out.getvalue()


def _arrow_column(values: np.ndarray, dtype: str, shape: list[int]) -> pa.Array:
    if dtype == "image":
        blobs = pa.array([_png(f) for f in values], type=pa.binary())
        return pa.StructArray.from_arrays([blobs, pa.nulls(len(values), pa.string())], names=["bytes", "path"])
    if shape == [1]:
        return pa.array(values.reshape(-1))
    flat = np.ascontiguousarray(values).reshape(len(values), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def _feature_stats(values: np.ndarray, image: bool) -> dict[str, np.ndarray]:
    """LeRobot's per-episode statistics: per-channel in [0, 1] (shape [C, 1, 1]) for images."""
    if image:
        if len(values) > _STATS_FRAMES:
            values = values[np.linspace(0, len(values) - 1, _STATS_FRAMES).round().astype(int)]
        count = len(values)
        data = values.reshape(-1, values.shape[-1]).astype(np.float64) / 255.0
        reshape = (values.shape[-1], 1, 1)
    else:
        count = len(values)
        data = values.reshape(len(values), -1).astype(np.float64)
        reshape = (data.shape[1],)
    stats = {"min": data.min(0), "max": data.max(0), "mean": data.mean(0), "std": data.std(0)}
    for q, value in zip(QUANTILES, np.quantile(data, QUANTILES, axis=0)):
        stats[f"q{int(round(q * 100)):02d}"] = value
    out = {k: v.reshape(reshape) for k, v in stats.items()}
    out["count"] = np.array([count])
    return out


def _aggregate_stats(per_episode: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Dataset statistics from per-episode ones, as LeRobot aggregates them (count-weighted)."""
    counts = np.stack([s["count"] for s in per_episode]).astype(np.float64)
    total = counts.sum(0)
    means = np.stack([s["mean"] for s in per_episode])
    weights = counts.reshape(-1, *([1] * (means.ndim - 1)))
    mean = (means * weights).sum(0) / total
    variance = ((np.stack([s["std"] for s in per_episode]) ** 2 + (means - mean) ** 2) * weights).sum(0) / total
    out = {"min": np.min(np.stack([s["min"] for s in per_episode]), 0),
           "max": np.max(np.stack([s["max"] for s in per_episode]), 0),
           "mean": mean, "std": np.sqrt(variance), "count": total.astype(np.int64)}
    for key in per_episode[0]:
        if re.fullmatch(r"q\d\d", key):
            out[key] = (np.stack([s[key] for s in per_episode]) * weights).sum(0) / total
    return out


def _tasks_table(tasks: list[str]) -> pa.Table:
    """``meta/tasks.parquet`` as LeRobot writes it: a pandas frame indexed by the task text."""
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "__index_level_0__": pa.array(tasks, pa.string())})
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


class _RollingParquet:
    """Writes row groups to ``template`` files, moving to the next file past ``limit_mb``."""

    def __init__(self, root: Path, template: str, limit_mb: float) -> None:
        self.root, self.template, self.limit = root, template, limit_mb * 2**20
        self.number, self.size, self.writer = 0, 0, None

    @property
    def indices(self) -> tuple[int, int]:
        return divmod(self.number, CHUNK_SIZE)

    def write(self, table: pa.Table) -> tuple[int, int]:
        """Write one row group; returns the (chunk_index, file_index) it went to."""
        if self.writer is not None and self.size + table.nbytes > self.limit:
            self.close()
            self.number += 1
        if self.writer is None:
            chunk, file = self.indices
            path = self.root / self.template.format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(path, table.schema, compression="snappy", use_dictionary=True)
            self.size = 0
        self.writer.write_table(table)
        self.size += table.nbytes
        return self.indices

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


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
    tmp = _claim_output(out)
    data = _RollingParquet(tmp, DATA_PATH, DATA_FILE_SIZE_MB)
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
                    arrays[name] = _arrow_column(values, dtype, shape)
                    episode_stats[name] = _feature_stats(values, dtype == "image")
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
        _write_episode_tables(tmp, episode_rows)
        pq.write_table(_tasks_table(tasks or []), tmp / TASKS_PATH, compression="snappy")
        total_stats = {name: {k: v.tolist() for k, v in _aggregate_stats(s).items()} for name, s in stats.items()}
        (tmp / "meta" / "stats.json").write_text(json.dumps(total_stats, indent=4) + "\n")
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
        (tmp / "meta" / "info.json").write_text(json.dumps(info, indent=4) + "\n")
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


def _write_episode_tables(root: Path, rows: list[dict[str, Any]]) -> None:
    """``meta/episodes`` files, each up to LeRobot's file size (the row sizes are known up front)."""
    if not rows:
        raise DatasetError("the store holds no episodes to export")
    per_row = pa.Table.from_pylist(rows[:1]).nbytes
    per_file = max(1, int(DATA_FILE_SIZE_MB * 2**20 // max(1, per_row)))
    for start in range(0, len(rows), per_file):
        chunk, file = divmod(start // per_file, CHUNK_SIZE)
        part = [{**r, "meta/episodes/chunk_index": chunk, "meta/episodes/file_index": file}
                for r in rows[start:start + per_file]]
        path = root / EPISODES_PATH.format(chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part), path, compression="snappy")


# -- inspect and check --------------------------------------------------------------------------------

def _footer_rows(path: Path, fix: str) -> int:
    """Rows of a Parquet file from its footer alone (no data is read); DatasetError when it is unreadable."""
    try:
        return int(pq.read_metadata(path).num_rows)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path} is truncated or corrupt ({exc}); {fix}") from exc


def _check_counts(root: Path, info: dict[str, Any], ours: bool) -> None:
    """Open every data and episode Parquet file's footer and check the row counts against meta/info.json.

    Cheap (footers only), so ``dataset info`` never calls a store with a truncated or missing file healthy.
    """
    fix = ("the store is damaged: re-collect it (`selfimprove collect`) or restore it from a copy" if ours
           else "the dataset is damaged: copy it again")
    pattern = re.sub(r"\{[^}]*\}", "*", str(info["data_path"]))
    for what, paths, key in (
            ("frames", sorted(root.glob(pattern)), "total_frames"),
            ("episodes", sorted(root.glob("meta/episodes/chunk-*/file-*.parquet")), "total_episodes")):
        rows = sum(_footer_rows(p, fix) for p in paths)
        expected = info.get(key)
        if expected is not None and rows != int(expected):
            where = "data files" if what == "frames" else "meta/episodes files"
            raise DatasetError(f"{root}: its {len(paths)} {where} hold {rows} {what} but meta/info.json says "
                               f"{key} = {expected} (a file is missing, truncated or extra); {fix}")


def dataset_info(path: str | Path) -> dict[str, Any]:
    """Episodes, frames, fps, features (dtype, shape) and tasks of a LeRobot dataset or an episode store.

    Raises DatasetError when a data or episode Parquet file is unreadable (e.g. truncated) or the files'
    row counts disagree with meta/info.json (only the files' footers are read).
    """
    root = Path(path)
    info = read_lerobot_info(root)
    tasks = read_tasks(root)
    ours = "selfimprove_schema_version" in info
    _check_counts(root, info, ours)
    return {
        "path": str(root),
        "format": "selfimprove episode store (LeRobot v3 layout)" if ours else f"LeRobot {info['codebase_version']}",
        "robot_type": info.get("robot_type"),
        "episodes": int(info.get("total_episodes", 0)),
        "frames": int(info.get("total_frames", 0)),
        "fps": info["fps"],
        "features": {k: {"dtype": f.get("dtype"), "shape": list(f.get("shape", []))}
                     for k, f in info["features"].items()},
        "tasks": [tasks[i] for i in sorted(tasks)],
        "suggested_mapping": None if ours else detect_import_mapping(info["features"]).to_dict(),
    }


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
    if not (root / "meta" / "stats.json").exists():
        problems.append("meta/stats.json is missing")
    return problems


def format_info(summary: dict[str, Any], max_tasks: int = 20) -> str:
    """``dataset_info`` as the text ``selfimprove dataset info`` prints."""
    lines = [f"{summary['path']}: {summary['format']}",
             f"  robot type  {summary['robot_type']}",
             f"  episodes    {summary['episodes']}",
             f"  frames      {summary['frames']}",
             f"  fps         {summary['fps']}",
             "  features"]
    width = max((len(k) for k in summary["features"]), default=0)
    for key, feature in summary["features"].items():
        lines.append(f"    {key:<{width}}  {feature['dtype']:<8} {feature['shape']}")
    tasks = summary["tasks"]
    lines.append(f"  tasks ({len(tasks)})")
    lines += [f"    {i:>4}  {t}" for i, t in enumerate(tasks[:max_tasks])]
    if len(tasks) > max_tasks:
        lines.append(f"    ... and {len(tasks) - max_tasks} more")
    mapping = summary.get("suggested_mapping")
    if mapping:
        pairs = ", ".join(f"{v} -> {k}" for k, v in mapping["observations"].items())
        lines.append(f"  import mapping (auto: {mapping['name']}): {mapping['actions']} -> actions, {pairs}, "
                     "task -> instruction")
    return "\n".join(lines)


__all__ = ["LEROBOT_PRESETS", "LeRobotMapping", "LeRobotSource", "check_lerobot", "dataset_info",
           "detect_import_mapping", "export_lerobot", "format_info", "import_lerobot", "load_mapping",
           "read_lerobot_info", "read_tasks"]
