"""LeRobot v3 datasets <-> episode stores: the feature mapping, and what ``selfimprove dataset info`` shows.

Frames are mapped onto :class:`~selfimprove.data.episode.Episode` by a :class:`LeRobotMapping`
(LeRobot feature -> our observation key, ``action`` -> actions, task -> instruction). A LeRobot
episode of ``N`` frames becomes ``N`` observations and ``N - 1`` actions: our last frame is the
terminal observation and carries no action, so the action stored on a LeRobot episode's last frame
is not kept, and export writes zeros there.

The format itself (files, tables, columns, frames, stats) is read and written by ``data/v3.py``;
``data/lerobot_import.py`` reads datasets (``LeRobotSource``, ``import_lerobot``, ``check_lerobot``)
and ``data/lerobot_export.py`` writes them (``export_lerobot``).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from selfimprove.data.v3 import check_counts, read_lerobot_info, read_tasks
from selfimprove.errors import ConfigError, DatasetError
from selfimprove.folders import ensure_empty, staging_folder


# -- the mapping ------------------------------------------------------------------------------------

_SOURCE = re.compile(r"^(?P<feature>[^\[\]]+?)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


@dataclass(frozen=True)
class FeatureSource:
    """A LeRobot feature, or a slice ``[start:stop]`` of a vector feature."""

    feature: str
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "FeatureSource":
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

    def sources(self) -> dict[str, FeatureSource]:
        """Our key -> parsed source, with ``"actions"`` for the action feature."""
        out = {key: FeatureSource.parse(spec) for key, spec in self.observations.items()}
        out["actions"] = FeatureSource.parse(self.actions)
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
            FeatureSource.parse(source)
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
    # LeRobot's own Aloha feature names: the top camera and the 14 joint readings
    "aloha": LeRobotMapping(name="aloha", observations={"image": "observation.images.top",
                                                         "joints": "observation.state"}),
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


def mapped_features(mapping: LeRobotMapping) -> set[str]:
    """The LeRobot features a mapping reads."""
    return {s.feature for s in mapping.sources().values()}


def detect_import_mapping(features: dict[str, dict]) -> LeRobotMapping:
    """The first preset that reads every observation feature of a dataset, else the generic mapping."""
    observed = {k for k in features if k.startswith("observation.")}
    for mapping in LEROBOT_PRESETS.values():
        used = mapped_features(mapping)
        if used <= set(features) and observed <= used and not mapping_problems(mapping, features):
            return mapping
    return _generic_import_mapping(features)


def _describe(features: dict[str, dict]) -> str:
    return ", ".join(f"{k} ({f.get('dtype')}, shape {list(f.get('shape', []))})" for k, f in features.items())


def mapping_problems(mapping: LeRobotMapping, features: dict[str, dict]) -> list[str]:
    """Why ``mapping`` cannot read a dataset with these features (an empty list when it can)."""
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


# -- output folders and inspection ------------------------------------------------------------------

def claim_output(out: Path) -> Path:
    """An empty staging folder beside ``out``; ``out`` itself must not hold anything yet."""
    ensure_empty(out, "a dataset", "Choose another --out or move its files away first", DatasetError)
    tmp = staging_folder(out)
    tmp.mkdir()
    return tmp


def dataset_info(path: str | Path) -> dict[str, Any]:
    """Episodes, frames, fps, features (dtype, shape) and tasks of a LeRobot dataset or an episode store.

    Raises DatasetError when a data or episode Parquet file is unreadable (e.g. truncated) or the files'
    row counts disagree with meta/info.json (only the files' footers are read).
    """
    root = Path(path)
    info = read_lerobot_info(root)
    tasks = read_tasks(root)
    ours = "selfimprove_schema_version" in info
    check_counts(root, info, ours)
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


__all__ = ["LEROBOT_PRESETS", "LeRobotMapping", "dataset_info", "detect_import_mapping", "format_info", "load_mapping"]
