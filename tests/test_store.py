import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from selfimprove.data.episode import Episode
from selfimprove.data.store import EpisodeStore, EpisodeWriter, split_episodes, truncate_store
from selfimprove.errors import DatasetError


def make_episode(length: int, seed: int, instruction: str = "reach") -> Episode:
    rng = np.random.default_rng(seed)
    flags = np.zeros(length + 1, dtype=bool)
    flags[-1] = True
    return Episode(observations={"state": rng.normal(size=(length + 1, 6)).astype(np.float32)},
                   actions=rng.uniform(-1, 1, size=(length, 2)).astype(np.float32),
                   instruction=instruction, true_success=True, meta={"seed": seed},
                   info={"is_success": flags})


def test_round_trip_preserves_every_frame_and_lerobot_layout(tmp_path):
    episodes = [make_episode(n, i, "a" if i % 2 else "b") for i, n in enumerate([3, 7, 1, 12])]
    with EpisodeWriter(tmp_path / "store", flush_every=2) as writer:
        writer.extend(episodes)
    info = json.loads((tmp_path / "store/meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 4
    assert info["total_frames"] == sum(e.length + 1 for e in episodes) and info["total_tasks"] == 2
    assert (tmp_path / "store/data/chunk-000/file-001.parquet").exists()
    assert (tmp_path / "store/meta/episodes/chunk-000/file-000.parquet").exists()
    back = EpisodeStore(tmp_path / "store").episodes()
    for a, b in zip(episodes, back):
        assert np.array_equal(a.observations["state"], b.observations["state"])
        assert np.array_equal(a.actions, b.actions)
        assert a.instruction == b.instruction and b.meta == {"seed": a.meta["seed"]}
        assert np.array_equal(a.info["is_success"], b.info["is_success"])


def test_steps_to_go_labels_derive_from_length_minus_frame_index(tmp_path):
    with EpisodeWriter(tmp_path / "s") as writer:
        writer.extend([make_episode(3, 0), make_episode(2, 1)])
    frames = EpisodeStore(tmp_path / "s").frames()
    assert frames.steps_to_go.tolist() == [3, 2, 1, 0, 2, 1, 0]
    assert frames.is_terminal.tolist() == [False, False, False, True, False, False, True]


def test_fraction_subsets_are_deterministic_nested_and_disjoint_from_validation():
    tr10, val = split_episodes(1000, 0.05, 0.1)
    tr20, val2 = split_episodes(1000, 0.05, 0.2)
    tr80, _ = split_episodes(1000, 0.05, 0.8)
    assert np.array_equal(val, val2) and len(val) == 50
    assert set(tr10) < set(tr20) < set(tr80) and not set(tr80) & set(val)
    assert len(tr10) == 95 and np.array_equal(tr10, split_episodes(1000, 0.05, 0.1)[0])


def test_missing_store_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"no dataset at .*selfimprove collect"):
        EpisodeStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="info.json is missing"):
        EpisodeStore(tmp_path / "empty")


def test_corrupt_files_raise_dataset_error_naming_the_file(tmp_path):
    with EpisodeWriter(tmp_path / "s") as writer:
        writer.extend([make_episode(3, 0)])
    data = tmp_path / "s/data/chunk-000/file-000.parquet"
    data.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="file-000.parquet is corrupt"):
        EpisodeStore(tmp_path / "s").frames()
    (tmp_path / "s/meta/info.json").write_text("{broken")
    with pytest.raises(DatasetError, match="info.json is corrupt"):
        EpisodeStore(tmp_path / "s")


def test_nan_in_a_dataset_is_reported_with_file_and_column(tmp_path):
    bad = make_episode(4, 0)
    bad.observations["state"][2, 1] = np.nan
    with EpisodeWriter(tmp_path / "s") as writer:
        writer.extend([make_episode(3, 1), bad])
    with pytest.raises(DatasetError, match=r"file-000.parquet: column 'observation.state' holds NaN.*row 6"):
        EpisodeStore(tmp_path / "s").frames()


def test_appending_keeps_earlier_files_and_truncate_forgets_unfinished_ones(tmp_path):
    root = tmp_path / "s"
    for i in range(3):
        with EpisodeWriter(root) as writer:
            writer.extend([make_episode(2, i)])
    assert EpisodeStore(root).num_episodes == 3
    truncate_store(root, 2)
    store = EpisodeStore(root)
    assert store.num_episodes == 2 and store.info["total_frames"] == 6
    assert not (root / "data/chunk-000/file-002.parquet").exists()
    assert pq.read_table(root / "meta/tasks.parquet").num_rows == 1


def test_images_are_stored_as_png_and_come_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(5, 16, 12, 3), dtype=np.uint8)
    ep = Episode(observations={"image": frames, "effector": rng.normal(size=(5, 2)).astype(np.float32)},
                 actions=rng.normal(size=(4, 2)).astype(np.float32), instruction="push the red moon")
    with EpisodeWriter(tmp_path / "s") as writer:
        writer.add(ep)
    info = json.loads((tmp_path / "s/meta/info.json").read_text())
    assert info["features"]["observation.image"] == {"dtype": "image", "shape": [16, 12, 3],
                                                     "names": ["height", "width", "channel"]}
    table = pq.read_table(tmp_path / "s/data/chunk-000/file-000.parquet")
    assert table.schema.field("observation.image").type.names == ["bytes", "path"]
    back = EpisodeStore(tmp_path / "s").episodes()[0]
    assert np.array_equal(back.observations["image"], frames)
