"""The layout of a run folder, ``runs/<name>/``, in one place.

Every stage reads and writes its files through :class:`RunDir` instead of spelling paths out, so the
layout is defined once and a newcomer finds every file of a run here::

    runs/<name>/
      config.json  provenance.json  metrics.jsonl  timing.json  summary.json  report.md  .lock
      detector.json  detector_rollouts.json  fleet.json
      eval_sft.json  eval_sft_t<T>.json  eval_improve.json  eval_best.json
      checkpoints/{sft, sft_state, sft_best, improve, best, improve_eval}
      demos/  improve_episodes/            (episode stores, LeRobot v3 layout)
      diagnostics/  videos/  tensorboard/

Writers go through ``runlog.write_json`` (strict JSON, atomic): a reader never sees half a file.
"""

from __future__ import annotations

from pathlib import Path


class RunDir:
    """The paths of one run folder (nothing is created until a stage writes)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # records of the run
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def provenance(self) -> Path:
        """Which code worked on the run: one entry per process (``selfimprove.provenance``)."""
        return self.root / "provenance.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def timing(self) -> Path:
        return self.root / "timing.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def detector(self) -> Path:
        return self.root / "detector.json"

    @property
    def detector_rollouts(self) -> Path:
        return self.root / "detector_rollouts.json"

    @property
    def fleet(self) -> Path:
        return self.root / "fleet.json"

    def eval(self, stage: str, temperature: float | None = None) -> Path:
        """The evaluation of ``stage`` ("sft", "improve", "best"), at a control ``temperature`` if given."""
        return self.root / (f"eval_{stage}.json" if temperature is None else f"eval_{stage}_t{temperature:g}.json")

    # checkpoints
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def sft_checkpoint(self) -> Path:
        return self.checkpoints / "sft"

    @property
    def improve_checkpoint(self) -> Path:
        return self.checkpoints / "improve"

    @property
    def sft_state(self) -> Path:
        """SFT's resumable training state (optimizer, step, data order) between checkpoints."""
        return self.checkpoints / "sft_state"

    @property
    def sft_best(self) -> Path:
        """SFT's lowest held-out loss so far (``sft.keep_best``)."""
        return self.checkpoints / "sft_best"

    @property
    def best_checkpoint(self) -> Path:
        """The guard's pick (train/guard.py)."""
        return self.checkpoints / "best"

    @property
    def improve_eval_checkpoint(self) -> Path:
        """Scratch copy of the policy at a learning-curve eval point (removed when Stage 2 ends)."""
        return self.checkpoints / "improve_eval"

    # episode stores and folders of files
    @property
    def demos(self) -> Path:
        """The run's own demos, when ``data.path`` names no other store."""
        return self.root / "demos"

    @property
    def improve_episodes(self) -> Path:
        return self.root / "improve_episodes"

    @property
    def diagnostics(self) -> Path:
        return self.root / "diagnostics"

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

