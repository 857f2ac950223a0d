"""Run folders: metrics as JSON lines, config, and small helpers shared by every stage."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from selfimprove.config import RunConfig, save_config

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSONL metrics; each line is flushed so a live run can be read at any time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=_default) + "\n")
            fh.flush()

    def read(self, stage: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping a truncated line in %s", self.path)
                continue
            if stage is None or record.get("stage") == stage:
                out.append(record)
        return out

    def keep(self, predicate: Callable[[dict[str, Any]], bool]) -> None:
        """Drop records for which ``predicate`` is false (used on resume to forget unfinished work)."""
        records = [r for r in self.read() if predicate(r)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, default=_default) + "\n" for r in records))
        tmp.replace(self.path)


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def prepare_run(config: RunConfig) -> Path:
    """Create ``runs/<name>/`` and write ``config.json``; returns the run folder."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.json")
    return run_dir


def seed_everything(seed: int, torch_threads: int) -> None:
    """Seed python/numpy/torch and set the torch thread count (1 is fastest for small models)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(torch_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(torch_threads))


def torch_generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from several integers (e.g. run seed, iteration)."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))
    return torch.Generator().manual_seed(seed)
