"""bfloat16 gradient steps: the same training code path, float32 weights, and the choice made visibly."""

import json

import pytest
import torch

from selfimprove.config import load_config
from selfimprove.data.collect import collect_demos
from selfimprove.errors import ConfigError
from selfimprove.model.checkpoint import load_checkpoint
from selfimprove.train import precision
from selfimprove.train.sft import sft


def test_auto_picks_bfloat16_only_on_native_hardware(monkeypatch):
    assert precision.resolve_precision("float32") == "float32"
    assert precision.resolve_precision("bfloat16") == "bfloat16"
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    assert precision.resolve_precision("auto") == "float32"
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)
    assert precision.resolve_precision("auto") == "bfloat16"
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("fp8")


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_config("pointmass-quick", ["precision=half"])


def test_autocast_runs_matmuls_in_bfloat16_only_when_asked():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with precision.autocast("bfloat16"):
        assert (x @ w).dtype == torch.bfloat16
    with precision.autocast("float32"):
        assert (x @ w).dtype == torch.float32


def test_bfloat16_sft_learns_and_keeps_float32_weights(tmp_path, caplog):
    caplog.set_level("INFO")
    config = load_config("language-table-quick", [f"runs_dir={tmp_path}", "precision=bfloat16", "sft.steps=60",
                                                  "sft.eval_every=20", "sft.checkpoint_every=20"])
    collect_demos(config, progress=False)
    path = sft(config, progress=False)
    assert "bfloat16 gradient steps" in caplog.text
    model, _ = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    val = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert val[-1]["val_bc"] < val[0]["val_bc"]  # held-out loss falls: the bf16 steps do train the model
    # every held-out record carries the constant guess the steps-to-go MAE is read against
    assert len({r["val_stg_mae_constant"] for r in val}) == 1 and val[0]["val_stg_mae_constant"] > 0

