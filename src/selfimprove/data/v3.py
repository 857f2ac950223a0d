"""The LeRobot v3.0 dataset format: the one reader and writer of its files (our stores and LeRobot's datasets).

A LeRobot v3.0 folder (the format of ``lerobot`` >= 0.4)::

    meta/info.json                                    codebase_version "v3.0", fps, features, path templates
    meta/tasks.parquet                                task text (the pandas index, or a ``task`` column) -> task_index
    meta/episodes/chunk-000/file-000.parquet          one row per episode: length, tasks, row range, file
    meta/stats.json                                   per-feature min/max/mean/std/count/quantiles
    data/chunk-000/file-000.parquet                   one row per frame: action, observation.*, timestamp,
                                                      frame_index, episode_index, index, task_index
    videos/<key>/chunk-000/file-000.mp4               only for "video" features

Our episode stores (``data/store.py``) are such folders with a few columns of our own; readers take
``ours=True`` for them, which changes only what their errors tell the user to do (re-collect a store,
copy a LeRobot dataset again).

Library choice: the format is read and written with pyarrow (already a dependency) and Pillow, not
with the ``lerobot`` package. ``lerobot`` 0.4.x, the releases that speak v3.0, require ``torch<2.11``
and cannot be installed beside this project's torch 2.13; ``lerobot`` 0.3.x resolves but reads only
the older v2.1 layout and would downgrade gymnasium to 0.29; the standalone ``lerobot-dataset``
package imports torch and torchvision and pulls about thirty packages (datasets, huggingface-hub,
pandas, opencv, cmake). Video features are decoded with PyAV (``av``, the optional ``lerobot``
extra), which installs from one wheel without touching torch. Camera frames are written as
``image`` features (PNG bytes in the Parquet files), which LeRobot's loader reads without a video
decoder.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from selfimprove.errors import DatasetError
from selfimprove.folders import atomic_write

CODEBASE_VERSION = "v3.0"
CHUNK_SIZE = 1000  # files per chunk folder, as LeRobot
DATA_FILE_SIZE_MB = 100  # LeRobot's defaults for rolling over to a new file
VIDEO_FILE_SIZE_MB = 200
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_GLOB = "meta/episodes/chunk-*/file-*.parquet"
DEFAULT_FEATURES = {  # every LeRobot frame has these, after the dataset's own features
    "timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64", "task_index": "int64",
}
INFO_KEYS = ("codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size",
             "data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits", "data_path", "video_path", "features")
EPISODE_KEYS = ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                "dataset_to_index", "meta/episodes/chunk_index", "meta/episodes/file_index")
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
STATS_FRAMES = 100  # image stats are computed on at most this many frames per episode
RECOLLECT = "re-collect the dataset with `selfimprove collect`"  # the fix for a damaged store of ours


# -- meta/info.json -----------------------------------------------------------------------------------

def load_info(root: str | Path, ours: bool = False) -> Any:
    """The parsed ``meta/info.json`` of ``root``; DatasetError when the folder or the file is missing or corrupt.

    Only the JSON is checked here: :func:`read_lerobot_info` checks a LeRobot dataset's keys,
    ``store.read_info`` our store's schema version.
    """
    root = Path(root)
    path = root / INFO_PATH
    if ours:
        if not root.exists():
            raise DatasetError(f"no dataset at {root}: make one with `selfimprove collect --out {root}` "
                               "or point data.path at an existing store")
        if not path.exists():
            raise DatasetError(f"{root} is not an episode store: {path} is missing. Re-collect it with "
                               f"`selfimprove collect --out {root}`")
    else:
        if not root.is_dir():
            raise DatasetError(f"no dataset at {root}: the folder does not exist")
        if not path.exists():
            raise DatasetError(f"{root} is not a LeRobot dataset: meta/info.json is missing (a LeRobot v3 folder "
                               "holds meta/info.json, meta/tasks.parquet, meta/episodes/ and data/)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is corrupt ({exc}); {RECOLLECT if ours else 'copy the dataset again'}") from exc


def read_lerobot_info(root: str | Path) -> dict[str, Any]:
    """``meta/info.json`` of a LeRobot v3 dataset, checked for the keys a reader needs."""
    root = Path(root)
    info = load_info(root)
    path = root / INFO_PATH
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


# -- files: atomic writes, Parquet reads with errors that name the file and the fix ---------------------

def write_meta_json(path: Path, data: Any, indent: int = 2) -> None:
    """A ``meta/*.json`` file (our stores indent by 2, LeRobot by 4), written atomically."""
    atomic_write(path, (json.dumps(data, indent=indent) + "\n").encode())


def write_parquet(table: pa.Table, path: Path, compression: str = "zstd") -> None:
    """A Parquet file written to a temporary name and renamed (LeRobot's own files use snappy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression=compression)
    tmp.replace(path)


def _missing(path: Path, what: str, ours: bool) -> DatasetError:
    if ours:
        return DatasetError(f"{path} is missing from the store; {RECOLLECT}")
    return DatasetError(f"{path} is missing: the dataset is incomplete ({what}); copy it again")


def _unreadable(path: Path, exc: Exception, ours: bool) -> DatasetError:
    if ours:
        return DatasetError(f"{path} is corrupt ({exc}); {RECOLLECT}")
    return DatasetError(f"{path} is corrupt or unreadable ({exc}); copy the dataset again")


def read_parquet(path: Path, columns: list[str] | None = None, what: str = "file", ours: bool = False) -> pa.Table:
    """A Parquet file (or some of its columns); DatasetError naming the file and the fix when missing or corrupt."""
    if not path.exists():
        raise _missing(path, what, ours)
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc, ours) from exc


def read_schema(path: Path, what: str = "data file", ours: bool = False) -> list[str]:
    """The column names of a Parquet file, from its footer alone."""
    if not path.exists():
        raise _missing(path, what, ours)
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc, ours) from exc


def footer_rows(path: Path, fix: str) -> int:
    """Rows of a Parquet file from its footer alone (no data is read); DatasetError when it is unreadable."""
    try:
        return int(pq.read_metadata(path).num_rows)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path} is truncated or corrupt ({exc}); {fix}") from exc


def check_counts(root: Path, info: dict[str, Any], ours: bool) -> None:
    """Open every data and episode Parquet file's footer and check the row counts against meta/info.json.

    Cheap (footers only), so ``dataset info`` never calls a store with a truncated or missing file healthy.
    """
    fix = ("the store is damaged: re-collect it (`selfimprove collect`) or restore it from a copy" if ours
           else "the dataset is damaged: copy it again")
    pattern = re.sub(r"\{[^}]*\}", "*", str(info["data_path"]))
    for what, paths, key in (
            ("frames", sorted(root.glob(pattern)), "total_frames"),
            ("episodes", sorted(root.glob(EPISODES_GLOB)), "total_episodes")):
        rows = sum(footer_rows(p, fix) for p in paths)
        expected = info.get(key)
        if expected is not None and rows != int(expected):
            where = "data files" if what == "frames" else "meta/episodes files"
            raise DatasetError(f"{root}: its {len(paths)} {where} hold {rows} {what} but meta/info.json says "
                               f"{key} = {expected} (a file is missing, truncated or extra); {fix}")


class RollingParquet:
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


# -- tasks and episodes tables --------------------------------------------------------------------------

def read_tasks(root: str | Path, ours: bool = False) -> dict[int, str]:
    """task_index -> task text, from LeRobot's pandas-indexed table or our plain ``task`` column."""
    path = Path(root) / TASKS_PATH
    table = read_parquet(path, what="task table", ours=ours)
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


def tasks_table(tasks: list[str], pandas_index: bool = True) -> pa.Table:
    """``meta/tasks.parquet`` for tasks ``0..n-1``: as LeRobot writes it (a pandas frame indexed by the
    task text), or with ``pandas_index=False`` as our stores write it (``task_index`` and ``task`` columns)."""
    if not pandas_index:
        return pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
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


def read_episodes(root: Path, needed: list[str] | tuple[str, ...] = (), ours: bool = False) -> dict[str, list]:
    """``meta/episodes`` as lists by column, in ``episode_index`` order (the ``stats/`` columns are not read).

    A folder without episode files is an incomplete dataset; for our stores (``ours``) it reads as ``{}``.
    """
    folder = root / "meta" / "episodes"
    paths = sorted(root.glob(EPISODES_GLOB))
    if not paths:
        if ours:
            return {}
        raise DatasetError(f"{folder} holds no chunk-XXX/file-XXX.parquet files; the dataset is incomplete")
    tables = []
    for path in paths:
        columns = [c for c in read_schema(path, "episode table", ours) if not c.startswith("stats/")]
        tables.append(read_parquet(path, columns, "episode table", ours))
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as exc:
        raise DatasetError(f"the files in {folder} disagree on their columns ({exc})") from exc
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DatasetError(f"the episode table in {folder} lacks columns {missing}")
    table = table.sort_by("episode_index")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def write_episodes(root: Path, rows: list[dict[str, Any]]) -> None:
    """LeRobot's ``meta/episodes`` files, each up to its file size (the row sizes are known up front)."""
    per_row = pa.Table.from_pylist(rows[:1]).nbytes
    per_file = max(1, int(DATA_FILE_SIZE_MB * 2**20 // max(1, per_row)))
    for start in range(0, len(rows), per_file):
        chunk, file = divmod(start // per_file, CHUNK_SIZE)
        part = [{**r, "meta/episodes/chunk_index": chunk, "meta/episodes/file_index": file}
                for r in rows[start:start + per_file]]
        write_parquet(pa.Table.from_pylist(part), root / EPISODES_PATH.format(chunk_index=chunk, file_index=file),
                      compression="snappy")


# -- columns: vectors, images, videos ---------------------------------------------------------------------

def frame_column(values: np.ndarray, image: bool = False, compress_level: int | None = None) -> pa.Array:
    """``[N, ...]`` per-frame values -> an Arrow column: PNG images (LeRobot's ``image`` feature) when
    ``image``, a plain column for ``[N]``, else a fixed-size list of the flattened per-frame values."""
    if image:
        blobs = pa.array([png(f, compress_level) for f in values], type=pa.binary())
        return pa.StructArray.from_arrays([blobs, pa.nulls(len(values), pa.string())], names=["bytes", "path"])
    if values.ndim == 1:
        return pa.array(values)
    flat = np.ascontiguousarray(values).reshape(values.shape[0], -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def numeric_column(column: pa.ChunkedArray | pa.Array, shape: list[int], where: str | Path,
                   flat_scalars: bool = False) -> np.ndarray:
    """A numeric (possibly nested-list) column -> ``[rows, *shape]``; with ``flat_scalars`` a plain
    (non-list) column stays ``[rows]`` (how our stores read their scalar columns)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array.type, pa.ExtensionType):
        array = array.storage
    rows, nested = len(array), False
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        array, nested = array.flatten(), True
    if array.null_count:
        raise DatasetError(f"{where} holds missing (null) values; fill or drop those frames first")
    values = array.to_numpy(zero_copy_only=False)
    if flat_scalars and not nested:
        shape = []
    size = rows * int(np.prod(shape))
    if values.size != size:
        raise DatasetError(f"{where} holds {values.size} values for {rows} frames; info.json says shape {shape}")
    return values.reshape(rows, *shape)


def png(frame: np.ndarray, compress_level: int | None = None) -> bytes:
    """One ``[H, W, 1|3]`` uint8 frame as PNG (Pillow's default compression unless ``compress_level``)."""
    out = io.BytesIO()
    options = {} if compress_level is None else {"compress_level": compress_level}
    Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame).save(out, format="PNG", **options)
    return out.getvalue()


def _decode_image(blob: bytes | None, path: str | None, root: Path | None, where: str | Path, row: int,
                  ours: bool) -> np.ndarray:
    try:
        if blob is not None:
            image = Image.open(io.BytesIO(blob))
        elif path and root is not None:
            image = Image.open(root / path)
        else:
            raise DatasetError(f"{where}: an image has neither bytes nor a path")
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        frame = np.asarray(image)
    except (OSError, ValueError, TypeError) as exc:
        if ours:
            raise DatasetError(f"{where}: image at row {row} cannot be decoded ({exc}); re-collect the dataset"
                               ) from exc
        raise DatasetError(f"{where}: an image cannot be decoded ({exc}); the dataset is corrupt") from exc
    return frame[:, :, None] if frame.ndim == 2 else frame


def decode_images(column: pa.ChunkedArray | pa.Array, where: str | Path, root: Path | None = None,
                  shape: list[int] | None = None, ours: bool = False) -> np.ndarray:
    """An image column (structs of encoded ``bytes`` and a ``path`` under ``root``) -> ``[N, H, W, C]`` uint8.

    Every image must have one size (``shape``, when the caller knows it from info.json).
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_struct(array.type) or array.type.get_field_index("bytes") < 0:
        raise DatasetError(f"{where} is not an image column (expected a struct of bytes and path, got {array.type})")
    blobs = array.field("bytes").to_pylist()
    paths = (array.field("path").to_pylist() if array.type.get_field_index("path") >= 0 else [None] * len(blobs))
    out = None if shape is None else np.empty((len(blobs), *shape), dtype=np.uint8)
    for row, (blob, path) in enumerate(zip(blobs, paths)):
        frame = _decode_image(blob, path, root, where, row, ours)
        if out is None:
            out = np.empty((len(blobs), *frame.shape), dtype=np.uint8)
        if frame.shape != out.shape[1:]:
            raise DatasetError(f"{where} holds images of different sizes ({sorted({out.shape[1:], frame.shape})})")
        out[row] = frame
    return out if out is not None else np.empty((0, 0, 0, 3), dtype=np.uint8)


def _av():
    try:
        import av
    except ImportError as exc:
        raise DatasetError("this dataset stores cameras as video; decoding them needs PyAV: "
                           "pip install 'selfimprove[lerobot]' (av==18.1.0)") from exc
    return av


def decode_video(path: Path, targets: np.ndarray, fps: float, where: str) -> np.ndarray:
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


# -- per-feature statistics (meta/stats.json and the episodes' stats/ columns) -----------------------------

def feature_stats(values: np.ndarray, image: bool) -> dict[str, np.ndarray]:
    """LeRobot's per-episode statistics: per-channel in [0, 1] (shape [C, 1, 1]) for images."""
    if image:
        if len(values) > STATS_FRAMES:
            values = values[np.linspace(0, len(values) - 1, STATS_FRAMES).round().astype(int)]
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


def aggregate_stats(per_episode: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
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
