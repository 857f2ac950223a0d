"""Stage 2 policy-gradient objectives beside the paper's REINFORCE: a PPO-style clipped surrogate.

``improve.objective = "ppo"`` reuses each on-policy batch for ``improve.epochs`` passes (4 unless
set). The reward and the discounted Monte Carlo returns are exactly REINFORCE's; the advantage is
the batch-normalised return ``A_t = (R_t - mean R) / (std R + 1e-8)`` (a constant baseline and
scale, so one clip range suits every domain). The behaviour policy's log-probabilities are
recomputed once, before the first update, from the weights that collected the batch (in eval mode,
at the sampling temperature). With ``improve.max_staleness = 0`` those are exactly the weights the
robots ran; with stale episodes the ratio is taken against the policy at the start of the update.

Loss per sample: ``-c * min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)`` with
``rho = pi(a|o,g) / pi_old(a|o,g)``. At ``rho = 1`` its gradient is REINFORCE's ``-c * A * grad log pi``.
"""

from __future__ import annotations

import numpy as np
import torch

from selfimprove.config import ImproveConfig, RunConfig
from selfimprove.model.inputs import FrameSource
from selfimprove.model.policy import EmbodiedModel
from selfimprove.train.precision import autocast

OBJECTIVES = ("reinforce", "ppo")
#: passes over each batch when ``improve.epochs`` is unset.
DEFAULT_EPOCHS = {"reinforce": 1, "ppo": 4}


def update_epochs(cfg: ImproveConfig) -> int:
    """Passes over each batch: ``improve.epochs``, or the objective's default (1 REINFORCE, 4 PPO)."""
    return int(cfg.epochs) if cfg.epochs is not None else DEFAULT_EPOCHS[cfg.objective]


def normalized_advantages(returns: torch.Tensor) -> torch.Tensor:
    """Returns with the batch mean removed and unit spread (a constant baseline; no value network)."""
    returns = returns.float()
    if len(returns) < 2:
        return returns - returns.mean()
    return (returns - returns.mean()) / (returns.std() + 1e-8)


def clipped_surrogate_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                           clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped objective as a loss (mean over samples), and its clip fraction and approximate KL.

    Outside ``[1 - clip, 1 + clip]`` in the direction the advantage favours, the sample gives no
    gradient, which is what lets a batch be reused for several epochs without running away.
    """
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_fraction = float(((ratio - 1.0).abs() > clip).float().mean())
        approx_kl = float(((ratio - 1.0) - log_ratio).mean())  # k3 estimator of KL(old || new), >= 0
    return loss, {"clip_fraction": clip_fraction, "approx_kl": approx_kl}


@torch.no_grad()
def behaviour_log_probs(policy: EmbodiedModel, source: FrameSource, acting: torch.Tensor, tokens: torch.Tensor,
                        temperature: float, chunk: int = 512) -> torch.Tensor:
    """log pi_old(a_t | o_t, g) of the batch under the current (not yet updated) weights, in eval mode."""
    was_training = policy.training
    policy.eval()
    out = []
    for start in range(0, len(acting), chunk):
        rows = torch.arange(start, min(start + chunk, len(acting)))
        logits, _ = policy(source.obs(acting[rows]))
        out.append(EmbodiedModel.token_log_prob(logits / temperature, tokens[rows]))
    policy.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def ppo_update(policy: EmbodiedModel, optimizer: torch.optim.Optimizer, source: FrameSource,
               acting: torch.Tensor, tokens: torch.Tensor, returns: torch.Tensor, config: RunConfig,
               generator: torch.Generator) -> dict[str, float]:
    """Several epochs of shuffled minibatches of the clipped surrogate on one on-policy batch."""
    cfg = config.improve
    advantages = normalized_advantages(returns)
    old_logp = behaviour_log_probs(policy, source, acting, tokens, cfg.temperature)
    policy.train()
    n = len(returns)
    losses, norms, clip_fractions, kls = [], [], [], []
    for _ in range(update_epochs(cfg)):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.minibatch_size):
            idx = order[start:start + cfg.minibatch_size]
            with autocast(config.precision):
                logits, _ = policy(source.obs(acting[idx]))
            logp = EmbodiedModel.token_log_prob(logits.float() / cfg.temperature, tokens[idx])
            surrogate, stats = clipped_surrogate_loss(logp, old_logp[idx], advantages[idx], cfg.ppo_clip)
            loss = cfg.loss_scale * surrogate
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)))
            optimizer.step()
            losses.append(float(loss.detach()))
            clip_fractions.append(stats["clip_fraction"])
            kls.append(stats["approx_kl"])
    policy.eval()
    return {"loss": float(np.mean(losses)), "grad_norm": float(np.mean(norms)), "updates": len(losses),
            "clip_fraction": float(np.mean(clip_fractions)), "approx_kl": float(np.mean(kls))}
