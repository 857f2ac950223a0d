"""Checkpoints: safetensors weights + a JSON config, versioned and validated on load.

A checkpoint is a folder ``<name>/`` with ``model.safetensors`` and ``config.json``. Nothing is ever
unpickled, so a checkpoint from elsewhere cannot run code. Training state (optimizer moments, RNG
state) lives in a separate ``train_state.safetensors`` + ``train_state.json`` beside it when needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selfimprove.errors import CheckpointError
from selfimprove.model.policy import EmbodiedModel, ModelSpec
from selfimprove.provenance import provenance
from selfimprove.runlog import dumps_json

FORMAT = "selfimprove-checkpoint"
VERSION = 1


def _write_dir_atomically(path: Path, write) -> None:
    """Write into ``.<name>.tmp`` then swap it in, so a crash never leaves a half checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(path: str | Path) -> bool:
    """Finish a swap that a crash interrupted; returns whether a checkpoint now exists at ``path``."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        old.rename(path)
    return path.exists()


def save_checkpoint(model: EmbodiedModel, path: str | Path, meta: dict[str, Any] | None = None,
                    train_state: dict[str, torch.Tensor] | None = None,
                    train_meta: dict[str, Any] | None = None, precision: str | None = None) -> Path:
    """Save ``model`` (and optionally training state) to the folder ``path``; its ``config.json`` records the
    code that made it (``selfimprove.provenance``, with the precision setting of the gradient steps)."""
    path = Path(path)

    def write(tmp: Path) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        config = {"format": FORMAT, "version": VERSION, "spec": model.spec.to_dict(), "meta": meta or {},
                  "provenance": provenance(precision)}
        (tmp / "config.json").write_text(dumps_json(config, indent=2) + "\n")
        if train_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in train_state.items()},
                      str(tmp / "train_state.safetensors"))
            (tmp / "train_state.json").write_text(dumps_json(train_meta or {}, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    _write_dir_atomically(path, write)
    return path


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config_path = path / "config.json"
    if not recover_checkpoint(path):
        raise CheckpointError(f"no checkpoint at {path}: run the stage that makes it (e.g. `selfimprove sft`) "
                              "or pass the right path")
    if not config_path.exists():
        raise CheckpointError(f"{path} is not a checkpoint: {config_path} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is corrupt ({exc}); re-create the checkpoint") from exc
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a selfimprove checkpoint (format {config.get('format')!r})")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {config.get('version')!r}; this selfimprove "
                              f"reads version {VERSION}")
    return config


def load_checkpoint(path: str | Path, expect_domain: str | None = None,
                    expect_spec: ModelSpec | None = None) -> tuple[EmbodiedModel, dict[str, Any]]:
    """Load a model, checking format, version, domain and every tensor's name and shape."""
    path = Path(path)
    config = read_checkpoint_config(path)
    try:
        spec = ModelSpec(**config["spec"])
    except TypeError as exc:
        raise CheckpointError(f"{path}/config.json has an invalid model spec: {exc}") from exc
    if expect_domain is not None and spec.domain != expect_domain:
        raise CheckpointError(f"{path} is a checkpoint of the {spec.domain!r} domain, but this run is "
                              f"{expect_domain!r}; use a checkpoint made for {expect_domain!r}")
    if expect_spec is not None:
        mine, theirs = expect_spec.to_dict(), spec.to_dict()
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if k != "extra" and theirs.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"{path} does not match the configured model ({lines}); "
                                  "change the config to match or retrain")
    try:
        model = EmbodiedModel(spec)
    except ValueError as exc:  # an unknown encoder or action decoder, or one that cannot fit the actions
        raise CheckpointError(f"{path}/config.json describes a model this selfimprove cannot build: {exc}") from exc
    tensors = _load_tensors(path / "model.safetensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            ", ".join(f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5]),
        ]))
        raise CheckpointError(f"{path}/model.safetensors does not match its config.json ({detail})")
    model.load_state_dict(tensors)
    return model, config.get("meta", {})


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, re-create it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); re-create the checkpoint") from exc


def load_train_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    tensors = _load_tensors(path / "train_state.safetensors")
    try:
        meta = json.loads((path / "train_state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/train_state.json is missing or corrupt ({exc})") from exc
    return tensors, meta


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer's state into tensors + JSON (safetensors holds only tensors)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            key = f"opt.{pid}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
