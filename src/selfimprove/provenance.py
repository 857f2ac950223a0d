"""Which code made a result: the library version, the git commit (and whether the tree differed from it),
torch's version and the precision path of the gradient steps.

Every checkpoint (``config.json``), run folder (``provenance.json``) and summary records
:func:`provenance`, so a number can be traced to the code that made it and rerun. Outside a git checkout
(an installed wheel) the commit and the dirty flag are None, never an error.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

#: the source checkout this module lives in (``<root>/src/selfimprove/provenance.py``), if it is one
_CHECKOUT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_CHECKOUT), *args], capture_output=True, text=True, timeout=10,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return None
    return done.stdout if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the library runs from; (None, None) when it is not one."""
    if not ((_CHECKOUT / ".git").exists() and (_CHECKOUT / "pyproject.toml").is_file()):
        return None, None
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git("status", "--porcelain")
    return commit.strip(), (bool(status.strip()) if status is not None else None)


def native_bf16_cpu() -> bool:
    """True when this CPU has bfloat16 matrix units (AMX) or instructions (AVX512-BF16)."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def precision_path(precision: str) -> str:
    """What ``precision`` (the config's setting) means on this machine: ``"float32"`` or ``"bfloat16 autocast"``
    (``train.precision.autocast`` runs the gradient steps so)."""
    if precision == "auto":
        precision = "bfloat16" if native_bf16_cpu() else "float32"
    return "bfloat16 autocast" if precision == "bfloat16" else precision


def provenance(precision: str | None = None) -> dict[str, Any]:
    """The record of the code and numerics: version, commit, dirty, torch, python, and with ``precision``
    (the config's setting) the path the gradient steps take (acting and evaluation are always float32)."""
    import torch

    commit, dirty = git_state()
    out: dict[str, Any] = {"selfimprove": __version__, "commit": commit, "dirty": dirty, "torch": torch.__version__,
                           "python": platform.python_version()}
    if precision is not None:
        out["precision"] = {"setting": precision, "gradient_steps": precision_path(precision)}
    return out
