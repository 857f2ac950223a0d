"""Throughput of the pipeline's hot loops on this machine, for a preset (default: point mass).

Prints a table of SFT samples/s, the cost of the preset's SFT augmentations per batch, fleet env-steps/s
with batched policy + reward-model inference (for 1, 4, 16 robots), the REINFORCE update rate, and one
Self-Improvement iteration's split between collecting and updating; the last line is one JSON object
with every figure. Every SFT row times ``SFTStep``, the step ``sft()`` itself runs: drawing the batch,
the preset's augmentations and mismatched-instruction negatives, the losses and the optimiser step
(samples/s counts the batch's demo frames, ``sft.batch_size`` per step, not the negatives). The
float32 rows (1 and 2 torch threads) and the bfloat16 row (where the CPU computes bfloat16 natively,
see ``precision``) use the preset's action decoder; the decoder table runs the preset's precision with
``model.action_decoder`` "independent", "autoregressive" and (where the action space is small enough)
"joint" on 1 and 2 threads, alternating short blocks of the decoders and reporting the median block. Usage:
``python bench/throughput.py [--preset language-table] [--quick] [--stage2] [--set section.field=value ...]``.
Without ``--quick`` each fleet and update row is the median of 3 runs (one run with it): on a shared
2-core machine single runs of these rows vary by 10-20%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from selfimprove.config import load_config
from selfimprove.data.collect import collect_demos
from selfimprove.data.store import EpisodeStore
from selfimprove.domains import augmentation, make_env, model_spec
from selfimprove.fleet.local import LocalFleet, seed_stream
from selfimprove.model.decoders import MAX_JOINT_CLASSES
from selfimprove.model.policy import EmbodiedModel
from selfimprove.reward import StepsToGoReward
from selfimprove.train.improve import fleet_features, reinforce_batch
from selfimprove.train.objectives import policy_update
from selfimprove.train.precision import autocast, native_bf16_cpu, resolve_precision
from selfimprove.train.allocator import retain_freed_memory
from selfimprove.train.sft import FrameBatches, SFTStep


def bench_update(config, spec, episodes, repeats: int = 1) -> tuple[float, int]:
    """Seconds of one Stage-2 update at ``config.improve`` on ``episodes`` (the median of ``repeats``
    updates, each from the same fresh policy), and the batch's env steps."""
    times = [_one_update(config, spec, episodes) for _ in range(repeats)]
    return statistics.median(t for t, _ in times), times[0][1]


def _one_update(config, spec, episodes) -> tuple[float, int]:
    torch.manual_seed(config.seed)
    policy = EmbodiedModel(spec)
    source, acting, tokens, returns = reinforce_batch(episodes, policy, 0.9)
    params = policy.fusion_parameters() if config.improve.train == "fusion" else list(policy.parameters())
    opt = torch.optim.Adam(params, lr=3e-4, fused=True)  # as Stage 2 builds it
    reference = EmbodiedModel(spec).eval().requires_grad_(False) if config.improve.kl_coef > 0 else None
    if reference is not None:
        reference.load_state_dict(policy.state_dict())  # as in Stage 2: the reference is the starting policy
    fused = fleet_features(episodes) if config.improve.train == "fusion" else None  # as Stage 2 does
    t0 = time.perf_counter()
    policy_update(policy, opt, source, acting, tokens, returns, config, torch.Generator().manual_seed(0), reference,
                  fused=fused)
    return time.perf_counter() - t0, int(len(returns))


def decoders(config) -> list[str]:
    """The action decoders the bench compares: the joint one only where its classes fit."""
    env = make_env(config)
    dim = int(np.prod(env.action_space.shape))
    env.close()
    joint = config.model.action_bins ** dim <= MAX_JOINT_CLASSES
    return ["independent", "autoregressive"] + (["joint"] if joint else [])


def sft_step(config, frames, precision: str | None = None, decoder: str | None = None) -> SFTStep:
    """The training loop's step for ``config`` (optionally another precision or action decoder), as sft() builds it."""
    config = dataclasses.replace(config, precision=precision or config.precision)
    if decoder is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, action_decoder=decoder))
    torch.manual_seed(config.seed)
    model = EmbodiedModel(model_spec(config, make_env(config)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft.lr, weight_decay=config.sft.weight_decay,
                                  fused=True)  # as train/sft.py
    model.train()
    return SFTStep(config, model, optimizer, FrameBatches(frames, model), frames.instructions)


def bench_sft_steps(steps: dict[str, SFTStep], threads: int, seconds: float, block: float = 0.5) -> dict[str, float]:
    """Samples/s of each step, timed in alternating blocks of ``block`` seconds (``seconds`` each in all):
    the median block's rate, so that other load on the machine falls on every step alike."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    for step in steps.values():  # warm-up: first calls allocate and pick kernels
        for _ in range(3):
            step(generator)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(max(1, round(seconds / block))):
        for name, step in steps.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < block or n == 0:
                losses = step(generator)
                for value in losses.values():  # as the training loop reads its losses every step
                    float(value)
                n += 1
            rates[name].append(n * step.batch_size / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def bench_sft(config, frames, threads: int, seconds: float, precision: str = "float32") -> float:
    return bench_sft_steps({"sft": sft_step(config, frames, precision)}, threads, seconds)["sft"]


def bench_augment(config, frames, seconds: float) -> float:
    """Milliseconds per batch for the preset's SFT augmentations (each on a random half of the batch)."""
    torch.set_num_threads(1)
    spec = model_spec(config, make_env(config))
    data = FrameBatches(frames, EmbodiedModel(spec))
    augments = [augmentation(config.domain, name) for name in config.sft.augment]
    g = torch.Generator().manual_seed(0)
    batches, spent = 0, 0.0
    while spent < seconds:
        idx = torch.randint(0, data.size, (config.sft.batch_size,), generator=g)
        obs, tokens, _, _ = data.batch(idx)
        t0 = time.perf_counter()
        for augment in augments:
            obs, tokens = augment(obs, tokens, spec.action_bins, torch.rand(len(idx), generator=g) < 0.5)
        spent += time.perf_counter() - t0
        batches += 1
    return spent / batches * 1000


def bench_fleet(config, robots: int, steps: int, shared: bool = False, repeats: int = 1) -> tuple[float, float, list]:
    """env-steps/s of a collection (the median of ``repeats`` collections of the same episodes) and its
    seconds; ``shared``: the reward model is the policy's own weights (Stage 2 with improve.train =
    "fusion" at its start), so one conv pass per frame serves both."""
    torch.set_num_threads(1)
    env = make_env(config)
    spec = model_spec(config, env)
    policy = EmbodiedModel(spec)
    reward_model = EmbodiedModel(spec)
    if shared:
        reward_model.load_state_dict(policy.state_dict())
    reward = StepsToGoReward(reward_model, threshold=-1.0)  # never fires: full-length episodes
    fleet = LocalFleet(lambda: make_env(config, terminate_on_success=False), spec, robots, reward)
    fleet.collect(policy.state_dict(), 0, seeds=seed_stream(0), n_steps=robots * 10)  # warm-up
    elapsed = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        episodes = fleet.collect(policy.state_dict(), 1, seeds=seed_stream(10_000), n_steps=steps,
                                 generator=torch.Generator().manual_seed(0))
        elapsed.append(time.perf_counter() - t0)
    seconds = statistics.median(elapsed)
    return sum(e.length for e in episodes) / seconds, seconds, episodes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument("--preset", default="pointmass", help="config preset to measure")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field of the preset (repeatable)")
    parser.add_argument("--stage2", action="store_true",
                        help="only the Stage-2 rows: a 16-robot collection and the update, per improve.train")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else 6.0
    repeats = 1 if args.quick else 3  # the Stage-2 rows: the median of 3 collections and 3 updates
    retain_freed_memory()  # as sft() does
    fleet_steps = 2048 if args.quick else 8192
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.preset, [f"runs_dir={tmp}", "data.episodes=300", "data.collect_workers=1",
                                             *args.set])
        collect_demos(config, progress=False)
        frames = EpisodeStore(config.dataset_path).frames()
        rows, figures = [], {}
        extras = (f" + {', '.join(config.sft.augment)}" if config.sft.augment else "") + (
            f" + {round(config.sft.negatives * config.sft.batch_size)} negatives" if config.sft.negatives else "")
        for threads in (() if args.stage2 else (1, 2)):
            rate = bench_sft(config, frames, threads, seconds)
            rows.append((f"SFT, batch {config.sft.batch_size}{extras}, {threads} torch thread(s), float32",
                         f"{rate:,.0f} samples/s"))
            figures[f"sft_samples_per_s_threads{threads}"] = round(rate, 1)
        if native_bf16_cpu() and not args.stage2:
            rate = bench_sft(config, frames, 1, seconds, "bfloat16")
            rows.append((f"SFT, batch {config.sft.batch_size}{extras}, 1 thread, bfloat16 autocast",
                         f"{rate:,.0f} samples/s"))
            figures["sft_samples_per_s_bf16_threads1"] = round(rate, 1)
            figures["sft_speedup_bf16_vs_fp32"] = round(rate / figures["sft_samples_per_s_threads1"], 2)
        precision = resolve_precision(config.precision)
        for threads in (() if args.stage2 else (1, 2)):
            steps = {d: sft_step(config, frames, decoder=d) for d in decoders(config)}
            for decoder, rate in bench_sft_steps(steps, threads, 2 * seconds).items():
                rows.append((f"SFT step, {decoder} decoder, {threads} torch thread(s), {precision}",
                             f"{rate:,.0f} samples/s"))
                figures[f"sft_{decoder}_samples_per_s_threads{threads}"] = round(rate, 1)
        if config.sft.augment and not args.stage2:
            ms = bench_augment(config, frames, seconds)
            step_ms = 1000 * config.sft.batch_size / figures.get("sft_samples_per_s_bf16_threads1",
                                                                figures["sft_samples_per_s_threads1"])
            rows.append((f"SFT augmentation ({', '.join(config.sft.augment)}), batch {config.sft.batch_size}",
                         f"{ms:.1f} ms per batch ({ms / step_ms:.0%} of a 1-thread step)"))
            figures["sft_augment_ms_per_batch"] = round(ms, 2)
            figures["sft_augment_share_of_step"] = round(ms / step_ms, 3)
        figures["precision"] = resolve_precision(config.precision)  # what the update rows below use
        episodes, collect_s = None, 0.0
        for robots in ((16,) if args.stage2 else (1, 4, 16)):
            rate, collect_s, episodes = bench_fleet(config, robots, min(fleet_steps, 512 * robots), repeats=repeats)
            rows.append((f"fleet, {robots} robot(s), policy + reward inference", f"{rate:,.0f} env-steps/s"))
            figures[f"fleet_env_steps_per_s_robots{robots}"] = round(rate, 1)
        spec = model_spec(config, make_env(config))
        imp = config.improve
        learner = (f"{imp.objective}, {'full batch' if imp.minibatch_size <= 0 else f'minibatch {imp.minibatch_size}'}"
                   f" x {imp.epochs or 1} epoch(s){', KL' if imp.kl_coef > 0 else ''}")
        trains = ["all", "fusion"] if config.model.encoder in ("film", "late_fusion") else ["all"]
        for train in trains:  # improve.train: the whole policy, or the fusion MLP + decoder on cached conv features
            if train == "fusion":  # the fleet shares one conv pass between the policy and the reward model
                rate, collect_s, episodes = bench_fleet(config, 16, min(fleet_steps, 512 * 16), shared=True,
                                                        repeats=repeats)
                rows.append(("fleet, 16 robots, policy + reward inference sharing the convs", f"{rate:,.0f} env-steps/s"))
                figures["fleet_env_steps_per_s_robots16_shared"] = round(rate, 1)
            update_s, steps = bench_update(dataclasses.replace(config, improve=dataclasses.replace(imp, train=train)),
                                           spec, episodes, repeats)
            suffix = "" if train == "all" else "_fusion"
            rows.append((f"Stage-2 update ({learner}), improve.train = {train}, {figures['precision']}",
                         f"{steps / update_s:,.0f} samples/s"))
            figures[f"reinforce{suffix}_samples_per_s"] = round(steps / update_s, 1)
            figures[f"si_env_steps_per_s_with_update{suffix}"] = round(steps / (collect_s + update_s), 1)
            figures[f"si_update_share{suffix}"] = round(update_s / (collect_s + update_s), 3)
            rows.append((f"Self-Improvement iteration, 16 robots, collect + update, improve.train = {train}",
                         f"{figures[f'si_env_steps_per_s_with_update{suffix}']:,.0f} env-steps/s "
                         f"({figures[f'si_update_share{suffix}']:.0%} of the time in the update)"))
        figures["preset"] = args.preset
        if not args.stage2:
            figures["fleet_speedup_16_vs_1_robot"] = round(
                figures["fleet_env_steps_per_s_robots16"] / figures["fleet_env_steps_per_s_robots1"], 2)
            figures["sft_speedup_2_vs_1_thread"] = round(
                figures["sft_samples_per_s_threads2"] / figures["sft_samples_per_s_threads1"], 2)
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement'.ljust(width)}  rate")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    if "fleet_speedup_16_vs_1_robot" in figures:
        print(f"{'fleet speed-up, 16 robots vs 1'.ljust(width)}  {figures['fleet_speedup_16_vs_1_robot']}x")
        print(f"{'SFT speed-up, 2 threads vs 1'.ljust(width)}  {figures['sft_speedup_2_vs_1_thread']}x")
    if "sft_speedup_bf16_vs_fp32" in figures:
        print(f"{'SFT speed-up, bfloat16 vs float32'.ljust(width)}  {figures['sft_speedup_bf16_vs_fp32']}x")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
