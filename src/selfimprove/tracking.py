"""TensorBoard scalars mirrored from ``metrics.jsonl``, so ``tensorboard --logdir runs/`` shows every run.

``metrics.jsonl`` stays the source of truth; the event files under ``runs/<name>/tensorboard/`` are
derived from it. Each record becomes scalars tagged ``"<stage>/<metric>"`` at the record's
``step`` (SFT) or ``iteration`` (Self-Improvement). When a stage restarts and drops records from
``metrics.jsonl`` (``MetricsLog.keep``), the event files are rebuilt from what is kept, so the
curves never show work that was thrown away.

Events are written synchronously with tensorboard's record writer (no background thread, no
torch.utils.tensorboard): each append opens, writes and closes this process's event file, so a
live run is always readable and a killed run leaves a valid file.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from selfimprove.errors import ConfigError

log = logging.getLogger(__name__)

STEP_KEYS = ("step", "iteration")  # the x-axis of a record, in this order of preference
NOT_SCALARS = {"stage", *STEP_KEYS}
_files: dict[Path, Path] = {}  # tensorboard dir -> the event file this process appends to
_counter = 0


def tensorboard_available() -> bool:
    """Whether the optional ``tensorboard`` package is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def resolve_tensorboard(requested: bool | None) -> bool:
    """``None``: on when tensorboard is installed; ``True``: required; ``False``: off."""
    if requested is None:
        return tensorboard_available()
    if requested and not tensorboard_available():
        raise ConfigError("tensorboard = true but the tensorboard package is not installed: "
                          "pip install 'selfimprove[tensorboard]' (or set tensorboard = false)")
    return bool(requested)


def record_step(record: dict[str, Any]) -> int | None:
    """The TensorBoard step of a metrics record: its ``step`` or ``iteration``."""
    for key in STEP_KEYS:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return None


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics record, tagged ``"<stage>/<metric>"``.

    Numbers and booleans become one scalar each; lists of numbers (e.g. ``eval_ci95``) one
    scalar per entry, ``<metric>_0``, ``<metric>_1``, ...; strings and non-finite numbers are left out.
    """
    stage = str(record.get("stage", "run"))
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[f"{stage}/{name}"] = float(value)

    for key, value in record.items():
        if key in NOT_SCALARS:
            continue
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                put(f"{key}_{i}", item)
        else:
            put(key, value)
    return out


class TensorBoardWriter:
    """Appends metrics records to an event file in ``logdir`` (one file per process and folder)."""

    def __init__(self, logdir: str | Path) -> None:
        if not tensorboard_available():
            raise ConfigError("writing TensorBoard events needs the tensorboard package: "
                              "pip install 'selfimprove[tensorboard]'")
        self.logdir = Path(logdir)

    def _file(self) -> Path:
        global _counter
        key = self.logdir.resolve()
        path = _files.get(key)
        if path is None or not path.exists():
            from tensorboard.compat.proto import event_pb2

            self.logdir.mkdir(parents=True, exist_ok=True)
            _counter += 1
            # names sort by creation time, the order in which TensorBoard reads a folder's files
            path = key / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{_counter}"
            self._write(path, [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")])
            _files[key] = path
        return path

    @staticmethod
    def _write(path: Path, events: list) -> None:
        from tensorboard.summary.writer.record_writer import RecordWriter

        with path.open("ab") as fh:
            writer = RecordWriter(fh)
            for event in events:
                writer.write(event.SerializeToString())
            writer.flush()

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Write the scalars of ``records``; records without a step are skipped."""
        from tensorboard.compat.proto import event_pb2, summary_pb2

        events = []
        for record in records:
            step = record_step(record)
            scalars = record_scalars(record)
            if step is None or not scalars:
                continue
            values = [summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
            events.append(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)))
        if events:
            self._write(self._file(), events)

    def rebuild(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace every event file in ``logdir`` by one holding ``records``."""
        _files.pop(self.logdir.resolve(), None)
        if self.logdir.exists():
            shutil.rmtree(self.logdir)
        self.append(list(records))


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``logdir`` as ``{tag: [(step, value), ...]}``, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
