"""Mixed precision for gradient steps: bfloat16 autocast where the hardware computes it natively.

On CPUs with AMX or AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later) oneDNN runs
bfloat16 convolutions and matmuls much faster than float32; ``bench/throughput.py`` measures the gain
for a preset. Only the gradient steps (SFT, the Stage-2 learner) run under autocast: weights,
optimiser state and losses stay float32, and acting, evaluation and the frozen reward model always
run in float32, so a policy's behaviour never depends on where it was trained.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from selfimprove.provenance import native_bf16_cpu as _native_bf16_cpu
from selfimprove.config_checks import PRECISIONS

__all__ = ["PRECISIONS", "autocast", "native_bf16_cpu", "resolve_precision"]


def native_bf16_cpu() -> bool:
    """True when this CPU has bfloat16 matrix units (AMX) or instructions (AVX512-BF16)."""
    return _native_bf16_cpu()


def resolve_precision(precision: str) -> str:
    """``"auto"`` -> ``"bfloat16"`` on a CPU with native bfloat16, else ``"float32"``; others unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bf16_cpu() else "float32"
    return precision


@contextlib.contextmanager
def autocast(precision: str) -> Iterator[None]:
    """Run the enclosed forward pass under CPU bfloat16 autocast when ``precision`` resolves to it."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_precision(precision) == "bfloat16"):
        yield
