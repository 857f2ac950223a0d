"""selfimprove: post-train an embodied foundation model in two stages.

Stage 1 (``sft``) fine-tunes on demonstrations with behaviour cloning and steps-to-go prediction;
stage 2 (``improve``) lets a fleet of robots practise with on-policy REINFORCE on the reward
``d(o_t, g) - d(o_{t+1}, g)`` of a frozen copy of the stage-1 model.
"""

from selfimprove.config import RunConfig, load_config
from selfimprove.data.collect import collect_demos
from selfimprove.data.lerobot import check_lerobot, dataset_info, export_lerobot, import_lerobot
from selfimprove.diagnose import diagnose
from selfimprove.evaluate import evaluate
from selfimprove.experiment import run_experiment
from selfimprove.pipeline import run_pipeline
from selfimprove.report import write_report
from selfimprove.train.improve import improve
from selfimprove.train.sft import sft

__version__ = "0.1.0"

__all__ = ["RunConfig", "check_lerobot", "collect_demos", "dataset_info", "export_lerobot", "import_lerobot",
           "diagnose", "evaluate", "improve", "load_config", "run_pipeline", "sft",
           "run_experiment", "write_report"]
