"""The pretrained model's frozen image stem: the plain MobileNetV2 module against the folded fast path.

The tabletop ``pretrained`` model runs a frozen, truncated (stride 8) ImageNet MobileNetV2 on both
camera frames of every sample; it is most of that model's cost. ``ImageEncoder`` runs it with
BatchNorm folded into the convs on channels-last input (``frozen_mobilenet_forward``). This times
both on one SFT batch (64 samples x 2 frames, 64x64) with one torch thread, in float32 and under
bfloat16 autocast, checks that they agree, and ends with one JSON line of the figures.
Usage: ``python bench/frozen_stem.py [--batch 64] [--size 64] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from selfimprove.model.vision import ImageEncoder, frozen_mobilenet_forward


def _ms(fn, repeats: int) -> float:
    """Best-of-3 mean milliseconds per call (the minimum damps noise from other processes)."""
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    enc = ImageEncoder(init="pretrained", trunk="mobilenet_v2", output_stride=8, freeze=True, frames=2)
    frames = torch.randint(0, 256, (args.batch * 2, 3, args.size, args.size), generator=torch.Generator().manual_seed(0))
    x = (frames.float() / 255.0 - enc.mean) / enc.std
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        diff = (enc.trunk(x) - frozen_mobilenet_forward(enc.trunk, x_cl)).abs().max().item()
    rows, figures = [], {"images": int(x.shape[0]), "size": args.size, "max_abs_diff": diff}
    for precision in ("float32", "bfloat16"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            plain = _ms(lambda: enc.trunk(x), args.repeats)
            folded = _ms(lambda: frozen_mobilenet_forward(enc.trunk, x_cl), args.repeats)
        rows.append((precision, plain, folded))
        figures[f"{precision}_plain_ms"] = round(plain, 2)
        figures[f"{precision}_folded_ms"] = round(folded, 2)
        figures[f"{precision}_speedup"] = round(plain / folded, 2)
    print(f"frozen MobileNetV2 stem (stride 8), {x.shape[0]} images of {args.size}x{args.size}, 1 thread")
    print(f"{'precision':10s} {'plain ms':>9s} {'folded ms':>10s} {'speedup':>8s} {'images/s folded':>16s}")
    for precision, plain, folded in rows:
        print(f"{precision:10s} {plain:9.1f} {folded:10.1f} {plain / folded:7.2f}x {x.shape[0] / folded * 1000:16.0f}")
    print(f"largest difference between the two: {diff:.2e}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
