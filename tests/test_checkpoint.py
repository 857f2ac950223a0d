import json

import pytest
import torch

from selfimprove.errors import CheckpointError
from selfimprove.model.checkpoint import load_checkpoint, save_checkpoint
from selfimprove.model.policy import EmbodiedModel, ModelSpec


def spec(**kw) -> ModelSpec:
    base = dict(domain="pointmass", obs_shapes={"state": [6]}, action_low=[-1, -1], action_high=[1, 1],
                action_bins=11, max_steps=20, hidden=32, layers=2)
    return ModelSpec(**{**base, **kw})


def test_round_trip_gives_identical_outputs(tmp_path):
    model = EmbodiedModel(spec())
    save_checkpoint(model, tmp_path / "ck", meta={"stage": "sft"})
    loaded, meta = load_checkpoint(tmp_path / "ck", expect_domain="pointmass")
    obs = {"state": torch.randn(5, 6)}
    for a, b in zip(model(obs), loaded(obs)):
        assert torch.equal(a, b)
    assert meta == {"stage": "sft"} and loaded.spec == model.spec
    assert not any(p.name.endswith((".pt", ".pkl", ".bin")) for p in (tmp_path / "ck").iterdir())


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_checkpoint(EmbodiedModel(spec()), tmp_path / "ck")
    config = json.loads((tmp_path / "ck/config.json").read_text())
    config["spec"]["hidden"] = 64
    (tmp_path / "ck/config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not match its config.json.*file \(32"):
        load_checkpoint(tmp_path / "ck")


def test_spec_domain_and_version_mismatch_are_clear(tmp_path):
    save_checkpoint(EmbodiedModel(spec()), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="'pointmass' domain, but this run is 'language-table'"):
        load_checkpoint(tmp_path / "ck", expect_domain="language-table")
    with pytest.raises(CheckpointError, match="action_bins: checkpoint 11 vs config 21"):
        load_checkpoint(tmp_path / "ck", expect_spec=spec(action_bins=21))
    config = json.loads((tmp_path / "ck/config.json").read_text())
    config["version"] = 99
    (tmp_path / "ck/config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "ck")


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(EmbodiedModel(spec()), tmp_path / "ck")
    (tmp_path / "ck/model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(tmp_path / "ck")


def test_overwrite_is_atomic_and_keeps_the_old_one_until_done(tmp_path):
    a, b = EmbodiedModel(spec()), EmbodiedModel(spec())
    save_checkpoint(a, tmp_path / "ck")
    save_checkpoint(b, tmp_path / "ck")
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.action_head.weight, b.action_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
