"""Named experiment grids: many ordinary runs, scheduled on worker processes, summarised together.

An experiment is a TOML file in ``configs/experiments/``: a base preset plus override lists per
axis (data fraction, initialisation, Stage-2 variant, ...) and a list of seeds. Every combination
is a *cell*, an ordinary run (:func:`selfimprove.pipeline.run_pipeline`) in
``runs/experiments/<name>/<cell>/``. Cells that differ only in Stage-2 settings train their SFT
checkpoint once (in ``_stage1/``) and each start Stage 2 from a copy of it. Every
Self-Improvement cell runs beside its controls: the SFT policy evaluated at lower temperatures, and
constant-reward REINFORCE from the same SFT checkpoint. Finished cells are skipped on ``resume``;
a failed cell is logged and reported without stopping the others.

The modules, each importing only those before it: ``spec`` (the experiment file), ``plan`` (the
grid expanded into runs and shared Stage-1 groups), ``tasks`` (what one task does on a worker),
``schedule`` (the tasks on worker processes, resume, ``status.json``), ``summary``
(``summary.json``: per cell, aggregates over seeds), ``plots`` and ``report`` (``report.md`` with
its figures), ``run`` (``run_experiment``).
"""

from selfimprove.experiment.plan import ExperimentPlan, plan_experiment
from selfimprove.experiment.run import run_experiment
from selfimprove.experiment.spec import ExperimentSpec, available_experiments, load_experiment

__all__ = ["ExperimentPlan", "ExperimentSpec", "available_experiments", "load_experiment", "plan_experiment",
           "run_experiment"]
