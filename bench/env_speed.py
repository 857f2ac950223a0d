"""Measures env throughput on one core: steps/s with and without rendering, and the expert's.

Usage: python bench/env_speed.py [--domain language-table|aloha] [--seconds 2.0]
The last line printed is one JSON object (steps_per_s: the tabletop's 96x96 rate, or Aloha's rate
with the preset's 64x64 top camera; for Aloha also the ratio to the stock gym-aloha env).
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


def aloha_actions(episodes: int = 4) -> list[list[np.ndarray]]:
    """The scripted expert's actions on a few placements (replayed so that only the env is timed)."""
    from selfimprove.envs.aloha.expert import AlohaExpert
    from selfimprove.envs.aloha.world import AlohaInsertionEnv

    env, expert, out = AlohaInsertionEnv(image_size=None), AlohaExpert(), []
    for seed in range(episodes):
        env.reset(seed=seed)
        expert.reset(env, np.random.default_rng(seed))
        actions = []
        for _ in range(env.max_episode_steps):
            actions.append(expert.act(env))
            if env.step(actions[-1])[2]:
                break
        out.append(actions)
    return out


def measure_aloha(seconds: float, episodes: list[list[np.ndarray]], **kwargs) -> float:
    """Steps/s of our Aloha env replaying expert episodes (resets included)."""
    from selfimprove.envs.aloha.world import AlohaInsertionEnv

    env = AlohaInsertionEnv(terminate_on_success=False, **kwargs)
    steps, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        env.reset(seed=i % len(episodes))
        for action in episodes[i % len(episodes)]:
            env.step(action)
            steps += 1
        i += 1
    return steps / (time.perf_counter() - start)


def measure_aloha_expert(seconds: float) -> dict[str, float]:
    """Steps/s of expert rollouts with the preset's camera (act + step), with the success rate."""
    from selfimprove.envs.aloha.expert import AlohaExpert
    from selfimprove.envs.aloha.world import AlohaInsertionEnv

    env, expert = AlohaInsertionEnv(image_size=64), AlohaExpert()
    steps, episodes, successes, start = 0, 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset(seed=1000 + episodes)
        expert.reset(env, np.random.default_rng(episodes))
        for _ in range(env.max_episode_steps):
            _, _, term, trunc, info = env.step(expert.act(env))
            steps += 1
            if term or trunc:
                break
        episodes += 1
        successes += bool(info["is_success"])
    return {"steps_per_s": steps / (time.perf_counter() - start), "episodes": episodes,
            "success_rate": successes / max(episodes, 1)}


def measure_stock_aloha(seconds: float) -> float:
    """Steps/s of gym-aloha's own AlohaInsertion-v0 (three 480x640 cameras per step, 50 Hz control)."""
    import importlib

    import gymnasium as gym

    importlib.import_module("gym_aloha")  # registers gym_aloha/AlohaInsertion-v0

    env = gym.make("gym_aloha/AlohaInsertion-v0")
    env.reset(seed=0)
    action = np.zeros(14)
    env.step(action)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.step(action)
        steps += 1
    env.close()
    return steps / (time.perf_counter() - start)


def main_aloha(seconds: float) -> None:
    episodes = aloha_actions()
    rows = {
        "physics only": measure_aloha(seconds, episodes, image_size=None),
        "top 64x64 (preset)": measure_aloha(seconds, episodes, image_size=64),
        "top + left wrist 64x64": measure_aloha(seconds, episodes, image_size=64, cameras=("top", "left_wrist")),
        "top 96x96": measure_aloha(seconds, episodes, image_size=96),
    }
    expert = measure_aloha_expert(seconds)
    stock = measure_stock_aloha(max(seconds, 3.0))
    print(f"{'Aloha insertion (1 core)':<34}{'steps/s':>10}{'x stock':>10}")
    for name, sps in rows.items():
        print(f"{name:<34}{sps:>10.0f}{sps / stock:>10.0f}")
    print(f"{'expert + env, top 64x64':<34}{expert['steps_per_s']:>10.0f}{expert['steps_per_s'] / stock:>10.0f}")
    print(f"{'stock gym-aloha (3 x 480x640)':<34}{stock:>10.1f}{1:>10}")
    print("a step here is 0.1 s of simulated time (10 Hz), the stock env's 0.02 s (50 Hz): per simulated second "
          f"the preset runs {5 * rows['top 64x64 (preset)'] / stock:.0f}x the stock env")
    print(f"expert: success {expert['success_rate']:.2f} on {expert['episodes']} episodes")
    print(json.dumps({
        "domain": "aloha",
        "steps_per_s": round(rows["top 64x64 (preset)"], 1),
        "steps_per_s_no_render": round(rows["physics only"], 1),
        "steps_per_s_top_wrist": round(rows["top + left wrist 64x64"], 1),
        "steps_per_s_96": round(rows["top 96x96"], 1),
        "stock_steps_per_s": round(stock, 2),
        "ratio_to_stock": round(rows["top 64x64 (preset)"] / stock, 1),
        "expert_steps_per_s": round(expert["steps_per_s"], 1),
        "expert_success_rate": round(expert["success_rate"], 3),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domain", choices=("language-table", "aloha"), default="language-table")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    _pin_one_core()
    if args.domain == "aloha":
        main_aloha(args.seconds)
        return
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
