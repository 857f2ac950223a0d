"""Run folders: metrics as JSON lines, config, and small helpers shared by every stage."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from selfimprove.config import PRESET_DIR, RunConfig
from selfimprove.errors import RunStateError
from selfimprove.folders import atomic_write
from selfimprove.provenance import provenance
from selfimprove.rundir import RunDir

log = logging.getLogger(__name__)


def json_safe(value: Any) -> Any:
    """Strict JSON data: NaN and infinities as ``null``, numpy scalars and arrays as Python numbers and lists.

    Every run record (``metrics.jsonl``, ``summary.json``, ``detector.json``, ``diagnostics.json``, ...) goes
    through this, so the files stay standard JSON that every tool reads (strict parsers reject ``NaN``).
    """
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if np.isfinite(value) else None
    if isinstance(value, np.generic):  # numpy ints and bools
        return value.item()
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_json(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` for run records: :func:`json_safe` first, and ``allow_nan=False`` so a NaN that slips
    through fails loudly instead of writing a file strict readers reject."""
    return json.dumps(json_safe(data), allow_nan=False, default=_default, **kwargs)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (:func:`~selfimprove.folders.atomic_write`)."""
    atomic_write(path, text.encode())


def write_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (:func:`~selfimprove.folders.atomic_write`): a full disk or a
    read-only folder leaves the previous plot, not half of one."""
    import io

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    atomic_write(path, buffer.getvalue())
    return path


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as strict JSON (:func:`dumps_json`) atomically (:func:`write_text`)."""
    write_text(path, dumps_json(data, indent=2) + "\n")


class WallClock:
    """A run's wall time that survives a kill: ``{"wall_time_s": ...}`` is rewritten every ``every`` seconds
    (a background thread), so a resumed run's total counts the time spent before the kill as well (all but
    at most ``every`` seconds after a SIGKILL; a stop signal or Ctrl-C writes the exact total)."""

    def __init__(self, path: str | Path, before: float = 0.0, every: float = 1.0) -> None:
        self.path, self.before, self.every = Path(path), float(before), every
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="wall-clock", daemon=True)
        self._thread.start()

    def total(self) -> float:
        return round(self.before + time.time() - self.t0, 2)

    def _write(self) -> float:
        total = self.total()
        write_json(self.path, {"wall_time_s": total})
        return total

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self._write()
            except OSError:  # the folder went away (a failed fresh run is removed): nothing to record
                return

    def stop(self) -> float:
        """Stop the clock and write the final total (returned)."""
        self._stop.set()
        self._thread.join()
        return self._write() if self.path.parent.exists() else self.total()


def read_json(path: str | Path) -> dict[str, Any]:
    """A run's JSON file, or {} when it is missing or still being written."""
    path = Path(path)
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (json.JSONDecodeError, OSError):
        return {}


class MetricsLog:
    """Append-only JSONL metrics; each line is flushed so a live run can be read at any time.

    With ``tensorboard`` every record is mirrored as scalars to ``<folder>/tensorboard/``.
    """

    def __init__(self, path: str | Path, tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard = None
        if tensorboard:
            from selfimprove.tracking import TensorBoardWriter

            self.tensorboard = TensorBoardWriter(RunDir(self.path.parent).tensorboard)

    @classmethod
    def for_run(cls, config: RunConfig) -> "MetricsLog":
        """The run's ``metrics.jsonl``, mirrored to TensorBoard as ``config.tensorboard`` says."""
        from selfimprove.tracking import resolve_tensorboard

        return cls(RunDir(config.run_dir).metrics, tensorboard=resolve_tensorboard(config.tensorboard))

    def append(self, record: dict[str, Any]) -> None:
        record = json_safe(record)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=_default, allow_nan=False) + "\n")
            fh.flush()
        if self.tensorboard is not None:
            try:
                self.tensorboard.append([json.loads(json.dumps(record, default=_default))])
            except OSError as exc:  # the event files are derived data: never stop training for them
                log.warning("could not write TensorBoard events to %s: %s", self.tensorboard.logdir, exc)

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
        tmp.write_text("".join(dumps_json(r) + "\n" for r in records))
        tmp.replace(self.path)
        if self.tensorboard is not None:
            try:
                self.tensorboard.rebuild(records)
            except OSError as exc:
                log.warning("could not rebuild TensorBoard events in %s: %s", self.tensorboard.logdir, exc)


def write_tensorboard(run_dir: str | Path) -> Path:
    """(Re)build ``<run_dir>/tensorboard/`` from ``metrics.jsonl`` (e.g. for a run made with it off)."""
    from selfimprove.tracking import TensorBoardWriter

    run = RunDir(run_dir)
    TensorBoardWriter(run.tensorboard).rebuild(MetricsLog(run.metrics).read())
    logdir = run.tensorboard
    return logdir


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def resolve_run_dir(run: str | Path, runs_dir: str | Path = "runs") -> Path:
    """A run folder given as a path or as a run name under ``runs_dir``."""
    candidates = (Path(run), Path(runs_dir) / str(run))
    for candidate in candidates:
        if RunDir(candidate).config.exists() or RunDir(candidate).metrics.exists():
            return candidate
    for candidate in candidates:
        if candidate.is_dir():
            raise RunStateError(f"{candidate} is not a run folder (it has no config.json or metrics.jsonl)")
    root = Path(runs_dir)
    known = sorted(p.name for p in root.iterdir() if RunDir(p).config.exists()) if root.is_dir() else []
    raise RunStateError(f"no run {str(run)!r}: neither {Path(run)} nor {root / str(run)} is a folder. "
                        f"Runs in {root}/: {', '.join(known) or 'none'} (or pass --runs-dir)")


#: fields ``--resume`` may change: how the work is spread over the machine, never what is computed
RESUME_MAY_CHANGE = ("runs_dir", "torch_threads", "tensorboard", "data.collect_workers", "fleet.address",
                     "fleet.bind_host", "fleet.timeout_s", "fleet.max_restarts")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "kwargs":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], config: RunConfig) -> list[str]:
    """``field: saved -> new`` for every saved field a resumed run would change (beyond
    :data:`RESUME_MAY_CHANGE`); fields newer than the saved config are not compared."""
    old, new = _flatten(saved), _flatten(json.loads(json.dumps(config.to_dict())))
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in sorted(old)
            if old.get(k) != new.get(k) and k not in RESUME_MAY_CHANGE]


def check_resume(config: RunConfig, must_exist: bool = True) -> None:
    """Refuse to resume a run that is not there (``must_exist``) or with a config that differs from its own."""
    path = RunDir(config.run_dir).config
    if not path.exists():
        if must_exist:
            raise RunStateError(f"nothing to resume: {config.run_dir} holds no run (no config.json). Drop --resume "
                                "to start it, or check --name and --runs-dir")
        return
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise RunStateError(f"{path} is unreadable ({exc}); restore it, or start a new run under another --name") from exc
    changes = config_changes(saved, config)
    if changes:
        raise RunStateError(f"--resume would continue {config.run_dir} with a config that differs from the one it "
                            f"was started with: {'; '.join(changes)}. Resume with the same preset, --seed and --set "
                            "values, or start a new run under another --name (nothing was changed)")


def prepare_run(config: RunConfig) -> Path:
    """Create ``runs/<name>/`` and write ``config.json`` and ``provenance.json``; returns the run folder.

    ``provenance.json`` holds one entry per process that worked on the run (a resume with other code adds
    one): the library version, git commit and dirty flag, torch's version and the precision path.
    """
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    files = RunDir(run_dir)
    write_json(files.config, config.to_dict())
    entries = read_json(files.provenance).get("processes", [])
    mine = {**provenance(config.precision), "pid": os.getpid()}
    if not entries or {k: v for k, v in entries[-1].items() if k != "started"} != mine:
        write_json(files.provenance, {"processes": [*entries, {**mine, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]})
    return run_dir


def portable_path(path: str | Path) -> str:
    """``path`` as a summary records it, never absolute: relative to the project (the checkout that holds
    ``configs/``) when it lies inside it, else to the current folder; so a committed summary stays true on
    another machine."""
    path = Path(path).resolve()
    project = PRESET_DIR.parent.resolve()
    return os.path.relpath(path, project if path.is_relative_to(project) else Path.cwd())


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
