"""selfimprove: post-train an embodied foundation model in two stages.

Stage 1 (``sft``) fine-tunes on demonstrations with behaviour cloning and steps-to-go prediction;
stage 2 (``improve``) lets a fleet of robots practise with on-policy REINFORCE on the reward
``d(o_t, g) - d(o_{t+1}, g)`` of a frozen copy of the stage-1 model.

The public names below are imported lazily (PEP 562), so ``import selfimprove`` and the CLI's
``--help`` do not pay for torch and matplotlib until a name that needs them is used.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from selfimprove.provenance import __version__  # the one place it is set

# public name -> submodule that defines it
_LAZY = {
    "RunConfig": "selfimprove.config",
    "load_config": "selfimprove.config",
    "collect_demos": "selfimprove.data.collect",
    "check_lerobot": "selfimprove.data.lerobot_import",
    "dataset_info": "selfimprove.data.lerobot",
    "export_lerobot": "selfimprove.data.lerobot_export",
    "import_lerobot": "selfimprove.data.lerobot_import",
    "diagnose": "selfimprove.diagnose",
    "evaluate": "selfimprove.evaluate",
    "run_experiment": "selfimprove.experiment.run",
    "run_pipeline": "selfimprove.pipeline",
    "write_report": "selfimprove.report",
    "improve": "selfimprove.train.improve",
    "sft": "selfimprove.train.sft",
}

__all__ = ["RunConfig", "check_lerobot", "collect_demos", "dataset_info", "export_lerobot", "import_lerobot",
           "diagnose", "evaluate", "improve", "load_config", "run_pipeline", "sft",
           "run_experiment", "write_report"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from selfimprove.config import RunConfig, load_config
    from selfimprove.data.collect import collect_demos
    from selfimprove.data.lerobot import dataset_info
    from selfimprove.data.lerobot_export import export_lerobot
    from selfimprove.data.lerobot_import import check_lerobot, import_lerobot
    from selfimprove.diagnose import diagnose
    from selfimprove.evaluate import evaluate
    from selfimprove.experiment.run import run_experiment
    from selfimprove.pipeline import run_pipeline
    from selfimprove.report import write_report
    from selfimprove.train.improve import improve
    from selfimprove.train.sft import sft


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``selfimprove.diagnose`` / ``selfimprove.evaluate`` the functions, as the eager imports made them.

    Importing a submodule sets it as an attribute of its package; the submodules ``diagnose`` and ``evaluate``
    share their names with the functions they define, and would otherwise shadow them.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
