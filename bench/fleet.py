"""Fleet throughput: env-steps/s with policy + reward-model inference, in-process vs Ray.

For 1, 2, 4 and 8 robots (``--robots``) it runs the same collection on the in-process fleet and
on the Ray fleet (a local Ray started with this machine's CPUs; robots spread over one actor per
CPU, each actor batching its robots' inference), prints a table with the Ray/in-process ratio,
and ends with one JSON line keyed by backend and robot count. ``--profile`` adds where the
in-process fleet's time goes (cProfile, top functions by own time).
Usage: ``python bench/fleet.py [--preset pointmass] [--steps 8192] [--repeats 3] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch

from selfimprove.config import load_config
from selfimprove.domains import make_env, model_spec
from selfimprove.fleet.local import LocalFleet, seed_stream
from selfimprove.fleet.ray import RayFleet, init_ray
from selfimprove.model.policy import EmbodiedModel
from selfimprove.reward import StepsToGoReward


def measure(fleet, weights, steps: int, repeats: int) -> float:
    """Best env-steps/s of ``repeats`` collections of ``steps`` steps (after one warm-up)."""
    fleet.collect(weights, 0, seeds=seed_stream(0), n_steps=min(steps, 256))
    best = 0.0
    for r in range(repeats):
        t0 = time.perf_counter()
        episodes = fleet.collect(weights, 1 + r, seeds=seed_stream(10_000 * (r + 1)), n_steps=steps,
                                 generator=torch.Generator().manual_seed(r))
        best = max(best, sum(e.length for e in episodes) / (time.perf_counter() - t0))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="pointmass")
    parser.add_argument("--robots", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=8192, help="env steps per measured collection")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile the in-process fleet at the largest count")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.preset)
    env = make_env(config)
    spec = model_spec(config, env)
    env.close()
    policy = EmbodiedModel(spec)
    reward = StepsToGoReward(EmbodiedModel(spec), threshold=-1.0)  # computed every step, never fires

    def make():
        return make_env(config, terminate_on_success=False)

    counts = [int(c) for c in args.robots.split(",")]
    init_ray(num_cpus=os.cpu_count())
    figures: dict[str, dict[str, float]] = {"local": {}, "ray": {}}
    weights = policy.state_dict()
    for n in counts:
        fleet = LocalFleet(make, spec, n, reward)
        figures["local"][str(n)] = round(measure(fleet, weights, args.steps, args.repeats), 1)
        fleet.close()
        fleet = RayFleet(make, spec, n, reward)
        actors = len(fleet.actors)
        figures["ray"][str(n)] = round(measure(fleet, weights, args.steps, args.repeats), 1)
        fleet.close()
        print(f"  measured {n} robot(s) ({actors} Ray actor(s))", flush=True)
    print(f"\nFleet throughput, {args.preset}, env-steps/s with policy + reward-model inference "
          f"({os.cpu_count()} CPUs, best of {args.repeats} x {args.steps} steps)")
    print(f"{'robots':>6} | {'in-process':>11} | {'Ray':>9} | {'Ray / in-process':>16}")
    print("-" * 52)
    for n in counts:
        local, remote = figures["local"][str(n)], figures["ray"][str(n)]
        print(f"{n:>6} | {local:>11,.0f} | {remote:>9,.0f} | {remote / local:>16.2f}")
    if args.profile:
        fleet = LocalFleet(make, spec, counts[-1], reward)
        profiler = cProfile.Profile()
        profiler.enable()
        fleet.collect(weights, 0, seeds=seed_stream(0), n_steps=args.steps)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
        print(f"\nWhere the in-process fleet's time goes ({counts[-1]} robots, own time):")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:4000])
    figures["ratio_ray_over_local"] = {str(n): round(figures["ray"][str(n)] / figures["local"][str(n)], 3)
                                       for n in counts}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
