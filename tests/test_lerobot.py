"""LeRobot v3 interoperability: import, SFT on the import, export, re-import, info, errors, layout."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from selfimprove.cli import main
from selfimprove.config import load_config
from selfimprove.data.collect import collect_demos
from selfimprove.data.lerobot import LEROBOT_PRESETS, LeRobotMapping, dataset_info, load_mapping
from selfimprove.data.lerobot_export import export_lerobot
from selfimprove.data.lerobot_import import check_lerobot, import_lerobot
from selfimprove.data.store import EpisodeStore
from selfimprove.errors import ConfigError, DatasetError
from selfimprove.model.checkpoint import load_checkpoint
from selfimprove.train.sft import sft

TINY = Path(__file__).parent / "data" / "lerobot_v3_tiny"  # written by LeRobot's own writer (see its README)


# -- a LeRobot v3 folder written the way LeRobot writes it (independent of selfimprove's exporter) --------

def _png(frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


def _column(values: np.ndarray, dtype: str) -> pa.Array:
    if dtype == "image":
        return pa.StructArray.from_arrays([pa.array([_png(f) for f in values], pa.binary()),
                                           pa.nulls(len(values), pa.string())], names=["bytes", "path"])
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def write_lerobot(root: Path, episodes: list[dict[str, np.ndarray]], tasks: list[str], task_of: list[int],
                  fps: int = 10, split_every: int = 2) -> None:
    """LeRobot v3 layout: features from the arrays, several data files, pandas-indexed tasks."""
    first = episodes[0]
    features = {k: {"dtype": "image" if v.dtype == np.uint8 else str(v.dtype), "shape": list(v.shape[1:]),
                    "names": None} for k, v in first.items()}
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        features[key] = {"dtype": "float32" if key == "timestamp" else "int64", "shape": [1], "names": None}
    rows, index = [], 0
    for number, start in enumerate(range(0, len(episodes), split_every)):
        columns: dict[str, list] = {}
        for e in range(start, min(start + split_every, len(episodes))):
            n = len(next(iter(episodes[e].values())))
            for key, value in episodes[e].items():
                columns.setdefault(key, []).append(value)
            columns.setdefault("timestamp", []).append((np.arange(n) / fps).astype(np.float32))
            columns.setdefault("frame_index", []).append(np.arange(n))
            columns.setdefault("episode_index", []).append(np.full(n, e))
            columns.setdefault("index", []).append(np.arange(index, index + n))
            columns.setdefault("task_index", []).append(np.full(n, task_of[e]))
            rows.append({"episode_index": e, "tasks": [tasks[task_of[e]]], "length": n, "data/chunk_index": 0,
                         "data/file_index": number, "dataset_from_index": index, "dataset_to_index": index + n,
                         "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            index += n
        table = pa.table({k: _column(np.concatenate(v), features[k]["dtype"]) for k, v in columns.items()})
        path = root / f"data/chunk-000/file-{number:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pandas = {"index_columns": ["__index_level_0__"], "columns": [
        {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
         "metadata": None}]}
    pq.write_table(pa.table({"task_index": list(range(len(tasks))), "__index_level_0__": tasks})
                   .replace_schema_metadata({b"pandas": json.dumps(pandas).encode()}), root / "meta/tasks.parquet")
    info = {"codebase_version": "v3.0", "robot_type": "sim", "total_episodes": len(episodes), "total_frames": index,
            "total_tasks": len(tasks), "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200, "fps": fps, "splits": {"train": f"0:{len(episodes)}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet", "video_path": None,
            "features": features}
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "meta/stats.json").write_text("{}")


def lerobot_from_store(store: Path, root: Path, layout: str) -> list:
    """Our collected demos as a LeRobot dataset; the last frame carries a (non-zero) action, as on a robot."""
    demos = EpisodeStore(store).episodes()
    episodes = []
    for ep in demos:
        action = np.concatenate([ep.actions, ep.actions[-1:]]).astype(np.float32)
        if layout == "pointmass":
            episodes.append({"action": action, "observation.state": ep.observations["state"]})
        else:
            state = np.concatenate([ep.observations["effector"], ep.observations["effector_target"]], axis=1)
            episodes.append({"action": action, "observation.state": state,
                             "observation.images.top": ep.observations["image"]})
    tasks = sorted({ep.instruction for ep in demos})
    write_lerobot(root, episodes, tasks, [tasks.index(ep.instruction) for ep in demos])
    return demos


def assert_same_episodes(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x.observations) == sorted(y.observations)
        for key in x.observations:
            assert x.observations[key].dtype == y.observations[key].dtype
            assert np.array_equal(x.observations[key], y.observations[key]), key
        assert np.array_equal(x.actions, y.actions) and x.instruction == y.instruction


@pytest.fixture(scope="module")
def pointmass_lerobot(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pm")
    config = load_config("pointmass-quick", [f"runs_dir={tmp}"])
    collect_demos(config, out=tmp / "demos", episodes=10, progress=False)
    demos = lerobot_from_store(tmp / "demos", tmp / "lerobot", "pointmass")
    return tmp / "lerobot", demos


@pytest.fixture(scope="module")
def tabletop_lerobot(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tt")
    config = load_config("language-table-quick", [f"runs_dir={tmp}"])
    collect_demos(config, out=tmp / "demos", episodes=4, progress=False)
    demos = lerobot_from_store(tmp / "demos", tmp / "lerobot", "tabletop")
    return tmp / "lerobot", demos


# -- round trips with training in between ------------------------------------------------------------------

@pytest.mark.parametrize("domain", ["pointmass", "language-table"])
def test_import_sft_export_reimport_keeps_every_frame(domain, pointmass_lerobot, tabletop_lerobot, tmp_path):
    path, demos = pointmass_lerobot if domain == "pointmass" else tabletop_lerobot
    store = import_lerobot(path, tmp_path / "imported", progress=False)  # auto-detects the domain's mapping
    imported = EpisodeStore(store).episodes()
    assert_same_episodes(demos, imported)  # N LeRobot frames -> N observations, N - 1 actions
    assert imported[0].meta["source"] == "lerobot" and imported[0].true_success is None

    config = load_config(f"{domain}-quick", [f"runs_dir={tmp_path}", "name=lr", f"data.path={store}",
                                             "sft.steps=2", "sft.eval_every=2", "sft.checkpoint_every=2",
                                             "sft.batch_size=16"])
    model, meta = load_checkpoint(sft(config, progress=False), expect_domain=config.domain)
    assert sorted(model.spec.obs_shapes) == sorted(imported[0].observations)  # trained on the imported keys
    assert meta["dataset"] == str(store)
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("stage") == "sft"] == [2]
    assert all(np.isfinite(r["val_bc"]) for r in records if r.get("stage") == "sft")

    exported = export_lerobot(store, tmp_path / "exported", progress=False)
    assert check_lerobot(exported) == []
    info = json.loads((exported / "meta/info.json").read_text())
    expected = {"pointmass": {"observation.state"},
                "language-table": {"observation.state", "observation.images.top"}}[domain]
    assert {k for k in info["features"] if k.startswith("observation.")} == expected
    table = pq.read_table(exported / "data/chunk-000/file-000.parquet")
    last = np.flatnonzero(table.column("episode_index").to_numpy() == 0)[-1]
    assert table.column("action")[int(last)].as_py() == [0.0, 0.0]  # our terminal frame has no action

    again = import_lerobot(exported, tmp_path / "again", mapping=domain, progress=False)
    assert_same_episodes(imported, EpisodeStore(again).episodes())


def test_reads_a_dataset_written_by_lerobot_itself(tmp_path):
    summary = dataset_info(TINY)
    assert (summary["episodes"], summary["frames"], summary["fps"]) == (3, 12, 10)
    assert summary["features"]["observation.images.wrist"] == {"dtype": "video", "shape": [16, 16, 3]}
    assert summary["tasks"] == ["push the red block", "push the blue block"]
    assert check_lerobot(TINY) == []

    pytest.importorskip("av")
    store = import_lerobot(TINY, tmp_path / "tiny", overrides=["observation.images.top=image"], progress=False)
    episodes = EpisodeStore(store).episodes()
    assert [e.length for e in episodes] == [4, 2, 3]
    assert [e.instruction for e in episodes] == ["push the red block", "push the blue block", "push the red block"]
    rng = np.random.default_rng(0)  # the recipe in tests/data/lerobot_v3_tiny/README.md
    for e, episode in enumerate(episodes):
        n = episode.length + 1
        state, action = np.empty((n, 4), np.float32), np.empty((n, 2), np.float32)
        for t in range(n):
            state[t], action[t] = rng.normal(size=4), rng.uniform(-1, 1, 2)
        image = np.zeros((n, 16, 16, 3), np.uint8)
        image[..., 0] = (20 * np.arange(n) + 10)[:, None, None]
        image[..., 1] = 40 * e
        for t in range(n):
            image[t, t:t + 4, 2:6, 2] = 250
        assert np.array_equal(episode.observations["state"], state)
        assert np.array_equal(episode.actions, action[:-1])
        assert np.array_equal(episode.observations["image"], image)  # PNG: lossless
        wrist = episode.observations["wrist"].astype(float)  # H.264: lossy, but the right frames
        assert np.abs(wrist - image[:, ::-1]).mean() < 8
        assert np.allclose(wrist[..., 0].mean((1, 2)), image[..., 0].mean((1, 2)), atol=5)


# -- info and the CLI ------------------------------------------------------------------------------------

def test_info_and_cli_commands(pointmass_lerobot, tmp_path, capsys):
    path, demos = pointmass_lerobot
    summary = dataset_info(path)
    assert summary["episodes"] == len(demos) and summary["frames"] == sum(d.length + 1 for d in demos)
    assert summary["fps"] == 10 and summary["tasks"] == [demos[0].instruction]
    assert summary["features"]["observation.state"] == {"dtype": "float32", "shape": [6]}
    assert summary["suggested_mapping"]["name"] == "pointmass"

    assert main(["dataset", "info", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    for text in (f"episodes    {len(demos)}", "fps         10", "observation.state", "float32", "[6]",
                 demos[0].instruction, "LeRobot v3 ok"):
        assert text in out
    assert main(["dataset", "import", str(path), "--out", str(tmp_path / "s"), "--preset", "pointmass",
                 "--no-progress"]) == 0
    assert f"imported {len(demos)} episodes" in capsys.readouterr().out
    assert main(["dataset", "export", str(tmp_path / "s"), "--out", str(tmp_path / "x"), "--robot-type", "arm",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "x/meta/info.json").read_text())["robot_type"] == "arm"
    assert main(["dataset", "info", str(tmp_path / "x"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["episodes"] == len(demos)
    assert main(["dataset", "info", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- bad input -------------------------------------------------------------------------------------------

def test_mapping_that_does_not_fit_lists_the_actual_features(pointmass_lerobot, tmp_path):
    path, _ = pointmass_lerobot
    with pytest.raises(DatasetError) as info:
        import_lerobot(path, tmp_path / "a", mapping="language-table", progress=False)
    message = str(info.value)
    assert "'observation.images.top', which the dataset does not have" in message
    assert "observation.state (float32, shape [6])" in message and "action (float32, shape [2])" in message
    with pytest.raises(DatasetError, match=r"reads \[4:8\] of 'observation.state', which has 6 values"):
        import_lerobot(path, tmp_path / "b", overrides=["observation.state[4:8]=goal"], mapping="pointmass",
                       progress=False)
    with pytest.raises(DatasetError, match="actions read 'observation.nope'.*features: action"):
        import_lerobot(path, tmp_path / "c", mapping="pointmass", overrides=["observation.nope=actions"],
                       progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


def test_missing_info_and_corrupt_files_raise_and_leave_nothing_behind(pointmass_lerobot, tmp_path):
    import shutil

    path, _ = pointmass_lerobot
    with pytest.raises(DatasetError, match="meta/info.json is missing"):
        import_lerobot(tmp_path, tmp_path / "out", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "data/chunk-000/file-001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match=r"file-001.parquet is corrupt"):
        import_lerobot(broken, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no store, no partial folder
    (broken / "meta/info.json").write_text("{not json")
    with pytest.raises(DatasetError, match="info.json is corrupt"):
        dataset_info(broken)
    (broken / "meta/info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": 10}))
    with pytest.raises(DatasetError, match="v2.1.*convert"):
        import_lerobot(broken, tmp_path / "out", progress=False)


def test_existing_output_is_never_overwritten(pointmass_lerobot, tmp_path):
    path, _ = pointmass_lerobot
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/file.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="already holds file.txt"):
        import_lerobot(path, tmp_path / "taken", progress=False)
    store = import_lerobot(path, tmp_path / "store", progress=False)
    with pytest.raises(DatasetError, match="already holds file.txt"):
        export_lerobot(store, tmp_path / "taken", progress=False)
    assert (tmp_path / "taken/file.txt").read_text() == "keep me"


# -- the exported layout ---------------------------------------------------------------------------------

def test_exported_layout_matches_lerobot_v3(tabletop_lerobot, tmp_path):
    path, demos = tabletop_lerobot
    store = import_lerobot(path, tmp_path / "store", progress=False)
    out = export_lerobot(store, tmp_path / "lr", progress=False)
    info = json.loads((out / "meta/info.json").read_text())
    assert set(info) >= {"codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks",
                         "chunks_size", "fps", "splits", "data_path", "video_path", "features"}
    assert info["codebase_version"] == "v3.0"
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] is None and info["splits"] == {"train": f"0:{len(demos)}"}
    assert info["features"]["observation.images.top"] == {"dtype": "image", "shape": [32, 32, 3],
                                                          "names": ["height", "width", "channels"]}
    assert info["features"]["observation.state"]["shape"] == [4]
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert info["features"][key]["shape"] == [1]

    tasks = pq.read_table(out / "meta/tasks.parquet")  # pandas-indexed by the task text, as LeRobot reads it
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["__index_level_0__"]
    assert tasks.column("task_index").to_pylist() == list(range(info["total_tasks"]))

    episodes = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    data = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert data.num_rows == info["total_frames"] == sum(e["length"] for e in episodes)
    assert pa.types.is_struct(data.schema.field("observation.images.top").type)
    index, episode_index = data.column("index").to_numpy(), data.column("episode_index").to_numpy()
    assert np.array_equal(index, np.arange(data.num_rows))
    for row, demo in zip(episodes, demos):
        rows = np.flatnonzero(episode_index == row["episode_index"])
        assert rows.tolist() == list(range(row["dataset_from_index"], row["dataset_to_index"]))
        assert row["length"] == demo.length + 1 and row["tasks"] == [demo.instruction]
        assert (row["data/chunk_index"], row["data/file_index"]) == (0, 0)
        assert row["stats/observation.images.top/mean"] is not None and row["stats/action/count"] == [row["length"]]
    stats = json.loads((out / "meta/stats.json").read_text())
    assert np.asarray(stats["observation.images.top"]["mean"]).shape == (3, 1, 1)
    assert set(stats["action"]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    frame = Image.open(io.BytesIO(data.column("observation.images.top")[0].as_py()["bytes"]))
    assert frame.format == "PNG" and np.array_equal(np.asarray(frame), demos[0].observations["image"][0])

    episodes_path = out / "meta/episodes/chunk-000/file-000.parquet"  # the check notices broken metadata
    table = pq.read_table(episodes_path)
    shifted = [v + 1 for v in table.column("dataset_to_index").to_pylist()]
    pq.write_table(table.set_column(table.schema.get_field_index("dataset_to_index"), "dataset_to_index",
                                    pa.array(shifted)), episodes_path)
    assert any("rows [" in p for p in check_lerobot(out))


# -- the mapping -----------------------------------------------------------------------------------------

def test_mapping_overrides_files_and_bad_specs(tmp_path):
    mapping = load_mapping("language-table",
                           ["observation.images.front=image", "observation.state[0:2]=", "act=actions"])
    assert mapping.observations == {"image": "observation.images.front", "effector_target": "observation.state[2:4]"}
    assert mapping.actions == "act" and mapping.instruction == "task"
    assert load_mapping("auto", auto=LEROBOT_PRESETS["pointmass"]).name == "pointmass"
    assert load_mapping(None, ["observation.state=state"]).observations == {"state": "observation.state"}
    toml = tmp_path / "arm.toml"
    toml.write_text('actions = "action"\n[observations]\nstate = "observation.state[0:6]"\n'
                    'image = "observation.images.wrist"\n')
    assert load_mapping(toml).observations == {"state": "observation.state[0:6]", "image": "observation.images.wrist"}
    toml.write_text('actoins = "action"\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load_mapping(toml)
    with pytest.raises(ConfigError, match="LEROBOT_FEATURE=OUR_KEY"):
        load_mapping("pointmass", ["observation.state"])
    with pytest.raises(ConfigError, match="unknown LeRobot mapping preset"):
        load_mapping("so100")
    assert load_mapping("aloha").observations == {"image": "observation.images.top", "joints": "observation.state"}
    with pytest.raises(ConfigError, match="instruction must be 'task'"):
        LeRobotMapping(instruction="language").validate()
    assert set(LEROBOT_PRESETS) == {"pointmass", "language-table", "aloha"}
