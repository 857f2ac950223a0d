"""Stage 1: supervised fine-tuning with the behaviour-cloning and steps-to-go losses summed."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from selfimprove.config import RunConfig
from selfimprove.data.store import EpisodeStore, Frames, split_episodes
from selfimprove.domains import augmentation, check_store, goal_key_for, make_env, model_spec
from selfimprove.folders import locks_run
from selfimprove.errors import ConfigError, DatasetError
from selfimprove.model.checkpoint import (load_checkpoint, load_train_state, optimizer_state_tensors,
                                          read_checkpoint_config, recover_checkpoint, restore_optimizer,
                                          save_checkpoint)
from selfimprove.model.inputs import frame_source
from selfimprove.model.policy import EmbodiedModel
from selfimprove.reward import MismatchedInstructions
from selfimprove.rundir import RunDir
from selfimprove.runlog import MetricsLog, prepare_run, seed_everything, torch_generator
from selfimprove.train.allocator import retain_freed_memory
from selfimprove.train.precision import autocast, resolve_precision

log = logging.getLogger(__name__)


def sft_checkpoint(config: RunConfig) -> Path:
    return RunDir(config.run_dir).sft_checkpoint


class FrameBatches:
    """Frames as torch tensors, with BC targets (tokens) and steps-to-go labels, for fast batching."""

    def __init__(self, frames: Frames, model: EmbodiedModel, bc_at_goal: bool = True) -> None:
        """``bc_at_goal = False``: frames at or past the demo's goal (its still hold steps) get no BC
        target; the steps-to-go head still learns them (``sft.bc_at_goal``)."""
        spec = model.spec
        self.source = frame_source(frames, spec)
        self.tokens = torch.as_tensor(model.tokenizer.tokenize(frames.actions))
        has_action = ~frames.is_terminal if bc_at_goal else ~frames.is_terminal & ~frames.goal_reached
        self.has_action = torch.as_tensor(has_action)
        self.stg = torch.as_tensor(np.minimum(frames.steps_to_go, spec.max_steps))
        self.size = len(self.stg)

    def batch(self, idx: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.source.obs(idx), self.tokens[idx], self.has_action[idx], self.stg[idx]


def with_negatives(obs: dict, tokens: torch.Tensor, has_action: torch.Tensor, stg: torch.Tensor, count: int,
                   mismatched: MismatchedInstructions, never: int, generator: torch.Generator
                   ) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch plus ``count`` rows: its first rows again (cycled), each with a mismatched
    instruction, no BC target and the steps-to-go label ``never``."""
    rows = torch.arange(count) % len(stg)
    texts = mismatched.draw([obs["instruction"][r] for r in rows.tolist()], generator)
    out = {k: torch.cat([v, v[rows]]) for k, v in obs.items() if k != "instruction"}
    out["instruction"] = list(obs["instruction"]) + texts
    return (out, torch.cat([tokens, tokens[rows]]), torch.cat([has_action, torch.zeros(count, dtype=torch.bool)]),
            torch.cat([stg, torch.full((count,), never, dtype=stg.dtype)]))


def sft_losses(model: EmbodiedModel, obs: dict[str, torch.Tensor], tokens: torch.Tensor,
               has_action: torch.Tensor, stg: torch.Tensor) -> dict[str, torch.Tensor]:
    """BC cross-entropy over action tokens (non-terminal frames) and steps-to-go cross-entropy.

    Rows labelled with the "never" class (negatives) train only the steps-to-go head; ``stg_mae``
    is over the other rows, ``never_p`` the mean "never" probability the head gives the negatives.
    With a "never" class, ``stg_mae_reachable`` is the MAE of ``d`` without it (renormalised over
    0..max_steps) and ``never_p_demo`` the "never" probability the head gives the demos' own frames:
    a few percent of it there adds ~2 steps of error per percent to ``stg_mae``.
    """
    action_logits, stg_logits = model(obs, tokens)  # the autoregressive decoder reads the tokens' prefixes
    action_logits, stg_logits = action_logits.float(), stg_logits.float()  # losses in float32 under autocast
    targets = model.action_head.targets(tokens)
    bc_all = F.cross_entropy(action_logits.permute(0, 2, 1), targets, reduction="none").sum(-1)
    mask = has_action.float()
    bc = (bc_all * mask).sum() / mask.sum().clamp_min(1.0)
    stg_loss = F.cross_entropy(stg_logits, stg)
    out = {"bc": bc, "stg": stg_loss}
    with torch.no_grad():
        probs = torch.softmax(stg_logits, -1)
        d = probs @ model.stg_values
        positive = stg <= model.spec.max_steps
        out["stg_mae"] = ((d - stg.float()).abs() * positive).sum() / positive.sum().clamp_min(1)
        if model.never_class is not None:  # the "never" class counts 201 steps in d: also without it
            reach = model.expected_from_logits(stg_logits, reachable=True)
            out["stg_mae_reachable"] = ((reach - stg.float()).abs() * positive).sum() / positive.sum().clamp_min(1)
            out["never_p_demo"] = (probs[:, model.never_class] * positive).sum() / positive.sum().clamp_min(1)
        # the greedy action is the demo's (with teacher forcing, each argmax along the demo's own prefix)
        out["bc_token_acc"] = ((action_logits.argmax(-1) == targets).all(-1).float() * mask).sum() / mask.sum().clamp_min(1.0)
        if model.never_class is not None and bool((~positive).any()):
            out["never_p"] = probs[~positive, model.never_class].mean()
    return out


class SFTStep:
    """One Stage-1 gradient step of a run's recipe, shared by :func:`sft` and ``bench/throughput.py``.

    :meth:`batch` draws ``sft.batch_size`` frames with ``generator``, applies the ``sft.augment``
    augmentations (each to a random half of the rows) and appends the mismatched-instruction
    negatives (``sft.negatives``); calling the step trains on such a batch (losses under the run's
    ``precision``, ``bc + stg_weight * stg``, one optimiser step) and returns the detached losses.
    """

    def __init__(self, config: RunConfig, model: EmbodiedModel, optimizer: torch.optim.Optimizer,
                 data: FrameBatches, instructions: list[str]) -> None:
        cfg = config.sft
        self.model, self.optimizer, self.data = model, optimizer, data
        self.batch_size, self.stg_weight, self.precision = cfg.batch_size, cfg.stg_weight, config.precision
        self.augments = [augmentation(config.domain, name) for name in cfg.augment]
        self.n_negatives = int(round(cfg.negatives * cfg.batch_size))
        self.mismatched = (MismatchedInstructions(instructions, goal_key_for(config.domain))
                           if self.n_negatives else None)

    def batch(self, generator: torch.Generator) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(obs, tokens, has_action, steps-to-go) of one training batch, negatives included."""
        idx = torch.randint(0, self.data.size, (self.batch_size,), generator=generator)
        obs, tokens, has_action, stg = self.data.batch(idx)
        bins = self.model.spec.action_bins
        for augment in self.augments:
            rows = torch.rand(len(idx), generator=generator) < 0.5
            obs, tokens = augment(obs, tokens, bins, rows, generator=generator)  # the run's stream: exact resume
        if self.mismatched is not None:
            obs, tokens, has_action, stg = with_negatives(obs, tokens, has_action, stg, self.n_negatives,
                                                          self.mismatched, self.model.never_class, generator)
        return obs, tokens, has_action, stg

    def __call__(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw a batch and take one gradient step on it; the losses, detached."""
        obs, tokens, has_action, stg = self.batch(generator)
        with autocast(self.precision):
            losses = sft_losses(self.model, obs, tokens, has_action, stg)
        loss = losses["bc"] + self.stg_weight * losses["stg"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {k: v.detach() for k, v in losses.items()}


FEW_EPISODES = 10  # fewer training episodes than this gets a warning


def _load_split(config: RunConfig) -> tuple[Frames, Frames, EpisodeStore]:
    store = EpisodeStore(config.dataset_path)
    check_store(store, config.domain)  # its instructions and its domain, before any frame is read
    train_idx, val_idx = split_episodes(store.num_episodes, config.data.val_fraction, config.data.fraction)
    available = store.num_episodes - len(val_idx)
    if config.data.fraction * available < 1:
        raise ConfigError(f"data.fraction (--fraction) {config.data.fraction:g} of the {available} training episodes "
                          f"of {store.root} is less than one episode; use a fraction >= {1 / available:.3g}")
    if len(train_idx) < FEW_EPISODES:
        log.warning("SFT trains on only %d episode(s) (data.fraction %g of %d): expect a weak policy",
                    len(train_idx), config.data.fraction, available)
    train, val = store.frames(train_idx), store.frames(val_idx)
    longest = int(max(train.episode_lengths.max(), val.episode_lengths.max()))
    if longest > config.model.max_steps:
        raise DatasetError(f"{store.root} holds an episode of {longest} steps but model.max_steps is "
                           f"{config.model.max_steps}; raise model.max_steps to cover the longest episode")
    return train, val, store


@locks_run
def sft(config: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train Stage 1 and return the path of the ``sft`` checkpoint.

    With ``resume`` a finished checkpoint is reused and an interrupted one continues from its last
    saved step; without it an existing ``sft`` checkpoint is an error (nothing is overwritten).
    """
    final = sft_checkpoint(config)
    state_path = RunDir(config.run_dir).sft_state
    recover_checkpoint(state_path)
    if recover_checkpoint(final):
        if resume:
            read_checkpoint_config(final)
            log.info("sft checkpoint %s exists; skipping stage 1", final)
            return final
        from selfimprove.errors import RunStateError
        raise RunStateError(f"{final} already exists; pass --resume to reuse it or choose another --name")
    train, val, store = _load_split(config)  # a missing or bad dataset fails before the run folder is made
    prepare_run(config)
    seed_everything(config.seed, config.torch_threads)
    retain_freed_memory()  # no page faults on the step's large tensors
    env = make_env(config)
    spec = model_spec(config, env)
    env.close()
    model = EmbodiedModel(spec)
    # first: it checks the store's observation shapes against the model's, before any tensor maths
    data, held_out = (FrameBatches(f, model, config.sft.bc_at_goal) for f in (train, val))
    constant_mae = constant_guess_mae(held_out.stg)
    vectors = {k: torch.as_tensor(v) for k, v in train.observations.items() if k in spec.vector_keys}
    if vectors:
        obs_all = model.encoder.flatten(vectors).numpy()
        model.encoder.set_normalization(obs_all.mean(0), obs_all.std(0))
    cfg = config.sft
    # fused: one kernel over all parameters; on CPU the tabletop optimiser step drops from ~9 to ~2 ms
    def make_optimizer(m: EmbodiedModel) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

    optimizer = make_optimizer(model)
    metrics = MetricsLog.for_run(config)
    start, best, running = 0, float("inf"), {}  # running: the train losses' moving averages the records show
    best_path = RunDir(config.run_dir).sft_best
    if resume and state_path.exists():
        model, meta = load_checkpoint(state_path, expect_domain=config.domain)
        optimizer = make_optimizer(model)
        tensors, train_meta = load_train_state(state_path)
        restore_optimizer(optimizer, tensors, train_meta)
        start = int(train_meta["step"])
        best = float(train_meta.get("best", float("inf")))
        running = {k: float(v) for k, v in train_meta.get("running", {}).items()}  # so the records go on as if never stopped
        metrics.keep(lambda r: r.get("stage") != "sft" or r.get("step", 0) <= start)
        log.info("resuming stage 1 at step %d", start)
    else:
        metrics.keep(lambda r: r.get("stage") != "sft")
    step_fn = SFTStep(config, model, optimizer, data, train.instructions)
    log.info("stage 1: %d train frames (%d episodes), %d held-out frames, %s gradient steps", data.size,
             len(train.episode_lengths), held_out.size, resolve_precision(config.precision))
    block = max(1, cfg.checkpoint_every)
    generator = torch_generator(config.seed, 1, start // block)
    bar = tqdm(range(start, cfg.steps), desc="sft", unit="step", disable=not progress, initial=start, total=cfg.steps)
    t0 = time.time()
    model.train()
    for step in bar:
        if step % block == 0:
            generator = torch_generator(config.seed, 1, step // block)
        losses = step_fn(generator)
        for k, v in losses.items():
            value = float(v)
            running[k] = running[k] * 0.98 + value * 0.02 if k in running else value
        done = step + 1
        if done % 50 == 0:
            bar.set_postfix(bc=f"{running['bc']:.3f}", stg=f"{running['stg']:.3f}")
        if done % cfg.eval_every == 0 or done == cfg.steps:
            record = {"stage": "sft", "step": done, "time_s": round(time.time() - t0, 2),
                      **{f"train_{k}": round(v, 5) for k, v in running.items()},
                      **{f"val_{k}": v for k, v in evaluate_losses(model, held_out).items()},
                      "val_stg_mae_constant": constant_mae}
            score = record["val_bc"] + cfg.stg_weight * record["val_stg"]
            if cfg.keep_best and score < best:
                best = score
                save_checkpoint(model, best_path, meta={"stage": "sft", "step": done, "val_loss": score},
                                precision=config.precision)
            metrics.append(record)
            model.train()
        if done % block == 0 and done < cfg.steps:
            tensors, meta = optimizer_state_tensors(optimizer)
            save_checkpoint(model, state_path, meta={"stage": "sft", "step": done},
                            train_state=tensors, train_meta={**meta, "step": done, "best": best, "running": running},
                            precision=config.precision)
    model.eval()
    step = cfg.steps
    if cfg.keep_best and recover_checkpoint(best_path):
        model, best_meta = load_checkpoint(best_path)
        step = int(best_meta["step"])
        log.info("keeping the step-%d checkpoint (lowest held-out loss %.4f)", step, best)
    save_checkpoint(model, final, meta={"stage": "sft", "step": step, "seed": config.seed,
                                        "dataset": str(store.root), "fraction": config.data.fraction,
                                        "train_episodes": int(len(train.episode_lengths))},
                    precision=config.precision)
    shutil.rmtree(state_path, ignore_errors=True)
    shutil.rmtree(best_path, ignore_errors=True)
    return final


@torch.no_grad()
def constant_guess_mae(steps_to_go: torch.Tensor) -> float:
    """The held-out steps-to-go MAE of the best constant guess (the labels' median): the floor a
    steps-to-go head must beat before its ``d`` says anything about a frame."""
    labels = steps_to_go.float()
    return round(float((labels - labels.median()).abs().mean()), 5) if len(labels) else float("nan")


def evaluate_losses(model: EmbodiedModel, frames: FrameBatches, batch_size: int = 4096) -> dict[str, float]:
    """Mean held-out losses and metrics over all frames."""
    model.eval()
    sums: dict[str, float] = {}
    for start in range(0, frames.size, batch_size):
        idx = torch.arange(start, min(start + batch_size, frames.size))
        for k, v in sft_losses(model, *frames.batch(idx)).items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
    return {k: round(v / frames.size, 5) for k, v in sums.items()}

