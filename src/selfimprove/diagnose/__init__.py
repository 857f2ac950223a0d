"""Reward-model diagnostics: how good is a frozen SFT checkpoint's ``d(o, g)`` as a value and a detector?

Stage 2 trusts the frozen model twice: its steps-to-go ``d`` is the reward (so ``d`` must fall as the
robot gets closer to the goal) and ``d <= s`` ends episodes (so it must fire on successes and not
before). This package measures both, before any robot practises, on

* the **held-out demos** (the store's validation split, never trained on), where the true
  steps-to-go of every frame is known (``T - t``);
* **policy rollouts**: ``diagnose.rollouts`` episodes of the checkpoint's own policy on the fixed eval
  seeds. They do not end on the simulator's success nor on the detector: they run to the time limit,
  so "the first frame where ``d <= s``" replays what Stage 2 would do at every ``s`` at once. The
  simulator's success is recorded per step for these diagnostics only; a true steps-to-go exists only
  for frames up to the first true success of a successful episode.

The recommended ``s`` comes from :func:`selfimprove.reward.recommend_threshold`, the same function
Stage 2 calls, on held-out demo goal frames only (what a real robot has); the rollout numbers check it.
Outputs: ``diagnostics.json`` (every table, ``recommended_s``, the rule), ``report.md`` and PNG plots.

The modules, each importing only those before it: ``checks`` (the numbers: MAE, calibration, error
by horizon, Spearman of ``d`` in time, the detector per frame and per episode), ``audit`` (the
detector replayed as Stage 2 uses it, its gate, the reward signal), ``plots`` (the PNGs),
``report`` (``report.md``, the run report's section, the headline numbers, the terminal lines),
``run`` (``diagnose`` and ``run_diagnostics``: config, held-out demos, rollouts, the files).
"""

from selfimprove.diagnose.checks import FrameSet, episode_table, frame_curve
from selfimprove.diagnose.report import headline, print_summary, report_lines
from selfimprove.diagnose.run import default_out_dir, diagnose, resolve_config, run_diagnostics

__all__ = ["FrameSet", "default_out_dir", "diagnose", "episode_table", "frame_curve", "headline", "print_summary",
           "report_lines", "resolve_config", "run_diagnostics"]
