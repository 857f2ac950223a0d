"""Measures tabletop env throughput on one core: steps/s with and without rendering, and the expert's.

Usage: python bench/env_speed.py [--seconds 2.0]
The last line printed is one JSON object (steps_per_s is the 96x96 rendered rate).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from selfimprove.envs.tabletop.expert import TabletopExpert  # noqa: E402
from selfimprove.envs.tabletop.world import TabletopEnv  # noqa: E402


def _pin_one_core() -> None:
    """Runs on a single core so the number is per-core throughput."""
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        except OSError:
            pass


def measure_random(image_size: int | None, seconds: float, seed: int = 0, task: str = "block2block"
                   ) -> tuple[float, float]:
    """Steps/s under uniform random actions (episodes reset when they end) and mean reset time (s)."""
    env = TabletopEnv(task=task, image_size=image_size)
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-0.05, 0.05, (4096, 2))
    env.reset(seed=seed)
    steps, resets, reset_time = 0, 0, 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            _, _, term, trunc, _ = env.step(actions[steps % len(actions)])
            steps += 1
            if term or trunc:
                t = time.perf_counter()
                env.reset(seed=seed + resets + 1)
                reset_time += time.perf_counter() - t
                resets += 1
    elapsed = time.perf_counter() - start
    return steps / elapsed, reset_time / max(resets, 1)


def measure_expert(image_size: int | None, seconds: float, seed: int = 0) -> dict[str, float]:
    """Steps/s of expert rollouts (act + step), with success rate and median length of the episodes."""
    env = TabletopEnv(image_size=image_size)
    expert = TabletopExpert()
    steps, episodes, successes, lengths = 0, 0, 0, []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset(seed=seed + episodes)
        expert.reset(env, np.random.default_rng(seed + episodes))
        for t in range(env.max_episode_steps):
            _, _, term, trunc, info = env.step(expert.act(env))
            steps += 1
            if term or trunc:
                break
        episodes += 1
        if info["is_success"]:
            successes += 1
            lengths.append(t + 1)
    elapsed = time.perf_counter() - start
    return {"steps_per_s": steps / elapsed, "episodes": episodes,
            "success_rate": successes / max(episodes, 1),
            "median_steps": float(np.median(lengths)) if lengths else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    _pin_one_core()
    rows = []
    rates: dict[str, float] = {}
    for size in (None, 64, 96, 128):
        sps, reset_s = measure_random(size, args.seconds)
        label = "no render" if size is None else f"{size}x{size}"
        rates[label] = sps
        rows.append((f"random actions, {label}", sps, reset_s * 1e3))
    banana_sps, banana_reset_s = measure_random(96, args.seconds, task="banana2location")
    rows.append(("random actions, banana 96x96", banana_sps, banana_reset_s * 1e3))
    expert = measure_expert(96, args.seconds)
    expert_bare = measure_expert(None, args.seconds)
    rows.append(("expert + env, 96x96", expert["steps_per_s"], float("nan")))
    rows.append(("expert + env, no render", expert_bare["steps_per_s"], float("nan")))
    print(f"{'configuration (1 core)':<32}{'steps/s':>10}{'reset ms':>10}")
    for name, sps, reset_ms in rows:
        print(f"{name:<32}{sps:>10.0f}{reset_ms:>10.2f}")
    ratio = rates["no render"] / rates["96x96"]
    print(f"no-render / 96x96 ratio: {ratio:.2f}; original LanguageTable: 27.3 steps/s (render), ~106 (physics)")
    print(f"expert (block2block, 96x96): success {expert['success_rate']:.2f} on {expert['episodes']} episodes, "
          f"median {expert['median_steps']:.0f} steps")
    print(json.dumps({
        "steps_per_s": round(rates["96x96"], 1),
        "steps_per_s_no_render": round(rates["no render"], 1),
        "image_size": 96,
        "steps_per_s_64": round(rates["64x64"], 1),
        "steps_per_s_128": round(rates["128x128"], 1),
        "steps_per_s_banana": round(banana_sps, 1),
        "render_ratio": round(ratio, 3),
        "expert_steps_per_s": round(expert["steps_per_s"], 1),
        "expert_steps_per_s_no_render": round(expert_bare["steps_per_s"], 1),
        "expert_success_rate": round(expert["success_rate"], 3),
        "expert_median_steps": expert["median_steps"],
    }))


if __name__ == "__main__":
    main()
