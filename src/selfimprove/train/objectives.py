"""Stage 2's policy-gradient losses, in one registry, and the one update loop that applies them.

``improve.objective`` names the loss (:data:`OBJECTIVES`):

* ``"reinforce"`` (the paper's): ``-c * A_t * log pi(a_t | o_t, g)``, one pass over the batch unless
  ``improve.epochs`` says otherwise;
* ``"ppo"``: the clipped surrogate ``-c * min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)`` with
  ``rho = pi / pi_old``, 4 passes unless set. ``pi_old`` is recomputed once, before the first
  update, from the weights that collected the batch (eval mode, the sampling temperature, and the
  same autocast precision as the learner's forward pass, so ``rho = 1`` exactly at the start);
* ``"ppo_token"``: the same with one ratio per token of the action (:func:`ppo_token_loss`).

``A_t`` is the Monte Carlo return ``R_t`` as it is (``improve.advantage = "return"``, the paper's)
or normalised per batch (``"normalized"``: ``(R_t - mean R) / std R``, a constant baseline and
scale), or GAE(lambda) with a learned critic (``"gae"``, :mod:`selfimprove.train.critic`, then
normalised the same way), or the episode's leave-one-out advantage over several attempts at the same start board
(``"group"``, computed where the episodes are known: :func:`selfimprove.train.improve.group_advantages`).
Either loss may add ``kl_coef * KL(pi || pi_ref)`` on the batch's states, where ``pi_ref`` is the
frozen SFT policy: it bounds how far a few hundred episodes can move the policy; with
``improve.kl_target`` the coefficient adapts per batch (:func:`adapt_kl_coef`).

``improve.positive_only`` trains on the rows with a positive advantage alone: the failures' actions
are not pushed down, which on a categorical over many classes (the joint decoder's 1,681) spreads
their probability over every other action, most of them worse (success-filtered imitation, in the
limit of a binary reward).

``improve.train = "fusion"`` trains only the fusion MLP and the action decoder: the convs below them
are SFT's in the policy and the reference alike, so their output is computed once per frame
(:class:`BatchRows`) and the epochs cost a fraction of a full forward and backward pass.

The shuffled batch is cut into minibatches of ``improve.minibatch_size`` rows (:func:`minibatches`);
``minibatch_size = 0`` takes one full-batch step per epoch, its gradient accumulated over chunks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from selfimprove.config import ImproveConfig, RunConfig
from selfimprove.model.inputs import FrameSource
from selfimprove.model.policy import EmbodiedModel
from selfimprove.train.precision import autocast

#: passes over each batch when ``improve.epochs`` is unset.
DEFAULT_EPOCHS = {"reinforce": 1, "ppo": 4, "ppo_token": 4}
CHUNK = 256  # rows per forward pass when a gradient step covers more (accumulated)


def update_epochs(cfg: ImproveConfig) -> int:
    """Passes over each batch: ``improve.epochs``, or the objective's default (1 REINFORCE, 4 PPO)."""
    return int(cfg.epochs) if cfg.epochs is not None else DEFAULT_EPOCHS[cfg.objective]


def normalized_advantages(returns: torch.Tensor) -> torch.Tensor:
    """Returns with the batch mean removed and unit spread (a constant baseline; no value network)."""
    returns = returns.float()
    if len(returns) < 2:
        return returns - returns.mean()
    return (returns - returns.mean()) / (returns.std() + 1e-8)


def advantages(returns: torch.Tensor, kind: str) -> torch.Tensor:
    """``improve.advantage``: the returns as they are (``"return"``) or normalised per batch."""
    if kind == "return":
        return returns.float()
    if kind in ("normalized", "gae"):  # gae: the critic's GAE(lambda) advantages, normalised as PPO does
        return normalized_advantages(returns)
    if kind == "group":  # already per-episode leave-one-out advantages
        return returns.float()
    raise ValueError(f"unknown advantage {kind!r}; use 'return', 'normalized', 'gae' or 'group'")


def adapt_kl_coef(coef: float, kl: float | None, target: float) -> float:
    """The KL coefficient for the next batch: doubled when the batch's KL to the SFT policy exceeded
    1.5 x ``target``, halved below ``target`` / 1.5 (PPO's adaptive penalty), unchanged otherwise."""
    if target <= 0 or kl is None:
        return coef
    if kl > 1.5 * target:
        return coef * 2.0
    if kl < target / 1.5:
        return coef / 2.0
    return coef


def reinforce_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, adv: torch.Tensor, cfg: ImproveConfig
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """``-A * log pi`` (mean over samples): the paper's REINFORCE."""
    return -(adv * logp).mean(), {}


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


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, adv: torch.Tensor, cfg: ImproveConfig
             ) -> tuple[torch.Tensor, dict[str, float]]:
    return clipped_surrogate_loss(logp, old_logp, adv, cfg.ppo_clip)


def ppo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, adv: torch.Tensor, cfg: ImproveConfig
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip with one ratio per token of the action (``logp`` [B, K]): each token's
    ``pi(a_k | a_<k, o, g) / pi_old(...)`` is clipped on its own and the surrogates are summed over
    the tokens (mean over rows), as RL on language models clips per token. A 14-token action's
    whole-action ratio is the product of 14 ratios and leaves the clip range after a small step in
    each (Aloha: clip fraction 0.49 with ``"ppo"``), silencing the sample; per token, only the
    tokens that moved too far stop contributing. Identical to ``"ppo"`` for the joint decoder (one
    categorical)."""
    loss, stats = clipped_surrogate_loss(logp, old_logp, adv.unsqueeze(-1).expand_as(logp), cfg.ppo_clip)
    return loss * logp.shape[-1], stats


Loss = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, ImproveConfig],
                tuple[torch.Tensor, dict[str, float]]]
#: objective name -> (loss, whether it needs the behaviour policy's log-probabilities)
OBJECTIVES: dict[str, tuple[Loss, bool]] = {"reinforce": (reinforce_loss, False), "ppo": (ppo_loss, True),
                                            "ppo_token": (ppo_token_loss, True)}
#: objectives whose loss reads one log-probability per token ([B, K]) rather than per action ([B])
PER_TOKEN = {"ppo_token"}


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over samples of ``KL(pi || pi_ref)``: the KLs of the decoder's categoricals, summed.

    Exact for the independent and joint decoders; for the autoregressive one both sets of logits are
    conditioned on the batch's own tokens, so this is the per-token KL along the taken actions (the
    chain rule's terms, the sequence KL in expectation over prefixes drawn from the policy).
    """
    logp = torch.log_softmax(logits / temperature, dim=-1)
    ref = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - ref)).sum(-1).sum(-1).mean()


class BatchRows:
    """How the learner reaches the action logits of a batch's rows (``acting``: rows of ``source``).

    With ``improve.train = "fusion"`` the part of the model below the fusion MLP stays at SFT, in
    the policy and in the frozen reference alike, so its output is computed once per row
    (:meth:`precompute_fusion`) and every epoch, the behaviour log-probs and the KL's reference run
    only the fusion MLP and the action decoder: most of an update's cost is the convs.
    """

    def __init__(self, source: FrameSource, acting: torch.Tensor, precision: str) -> None:
        self.source, self.acting, self.precision = source, acting, precision
        self.fused: torch.Tensor | None = None

    @torch.no_grad()
    def precompute_fusion(self, model: EmbodiedModel) -> None:
        with _eval_mode(model):
            out = []
            for part in torch.split(self.acting, 4 * CHUNK):
                with autocast(self.precision):
                    out.append(model.fusion_inputs(self.source.obs(part)).float())
        self.fused = torch.cat(out)

    def logits(self, model: EmbodiedModel, idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Action logits of rows ``idx`` of the batch (conditioned on their ``tokens``), float32,
        under the learner's autocast; gradients flow unless the caller turns them off."""
        with autocast(self.precision):
            if self.fused is not None:
                logits = model.action_logits_from_fusion(self.fused[idx], tokens)
            else:
                logits, _ = model(self.source.obs(self.acting[idx]), tokens)
        return logits.float()

    @torch.no_grad()
    def all_logits(self, model: EmbodiedModel, tokens: torch.Tensor) -> torch.Tensor:
        """Action logits of every row in eval mode (chunked)."""
        with _eval_mode(model):
            index = torch.arange(len(self.acting))
            out = [self.logits(model, part, tokens[part]) for part in torch.split(index, 4 * CHUNK)]
        return torch.cat(out) if out else torch.zeros(0)


@contextmanager
def _eval_mode(model: EmbodiedModel) -> Iterator[None]:
    """``model`` in eval mode inside, its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def behaviour_log_probs(policy: EmbodiedModel, source: FrameSource, acting: torch.Tensor, tokens: torch.Tensor,
                        temperature: float, precision: str = "float32", rows: BatchRows | None = None,
                        per_token: bool = False) -> torch.Tensor:
    """log pi_old(a_t | o_t, g) of the batch under the current (not yet updated) weights, in eval mode
    ([B], or [B, K] per token with ``per_token``)."""
    rows = rows or BatchRows(source, acting, precision)
    logp = policy.token_log_probs(rows.all_logits(policy, tokens) / temperature, tokens)
    return logp if per_token else logp.sum(-1)


def minibatches(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The shuffled rows cut into minibatches of ``size`` rows, the last one what is left
    (``size = 0``: one full batch).

    Evening out the last minibatch (equal shares, or merging a short tail into the one before) was
    measured on the point-mass preset: its Stage-2 episode length went from 12.2 steps to 12.5-14.3
    over seeds and variants, against 12.2-12.7 with this split; the tabletop preset takes full-batch
    steps, where the question does not arise.
    """
    if not len(order):
        return []
    return [order] if size <= 0 else list(torch.split(order, size))


def policy_update(policy: EmbodiedModel, optimizer: torch.optim.Optimizer, source: FrameSource,
                  acting: torch.Tensor, tokens: torch.Tensor, returns: torch.Tensor, config: RunConfig,
                  generator: torch.Generator, reference: EmbodiedModel | None = None,
                  kl_coef: float | None = None, fused: torch.Tensor | None = None) -> dict[str, float]:
    """Train the policy on one on-policy batch with ``improve.objective``'s loss (module docstring).

    ``reference``: the frozen SFT policy of the KL term (needed when the KL coefficient is > 0);
    ``kl_coef``: the coefficient of this batch (default ``improve.kl_coef``; adapted by the caller);
    ``fused``: with ``improve.train = "fusion"``, the acting rows' fusion inputs when the fleet already
    computed them (else they are computed here).
    """
    cfg = config.improve
    kl_coef = cfg.kl_coef if kl_coef is None else kl_coef
    loss_fn, needs_old = OBJECTIVES[cfg.objective]
    if kl_coef > 0 and reference is None:
        raise ValueError("improve.kl_coef > 0 needs the reference (SFT) policy")
    if fused is not None and len(fused) != len(acting):
        raise ValueError(f"{len(fused)} rows of fusion inputs for {len(acting)} acting rows")
    adv = advantages(returns, cfg.advantage)
    if cfg.positive_only:  # only raise what went well: lowering a taken action spreads it over all others
        keep = adv > 0
        acting, tokens, adv = acting[keep], tokens[keep], adv[keep]
        fused = fused[keep] if fused is not None else None
        if not len(adv):
            return {"updates": 0, "positive_rows": 0}
    batch = BatchRows(source, acting, config.precision)
    if cfg.train == "fusion":  # the convs are SFT's in the policy and the reference: run them once
        if fused is not None:
            batch.fused = fused.float()
        else:
            batch.precompute_fusion(policy)
    per_token = cfg.objective in PER_TOKEN
    old_logp = behaviour_log_probs(policy, source, acting, tokens, cfg.temperature, config.precision,
                                   batch, per_token) if needs_old else None
    ref_logits = batch.all_logits(reference, tokens) if kl_coef > 0 else None
    policy.train()
    sums: dict[str, list[float]] = {}
    for _ in range(update_epochs(cfg)):
        for rows in minibatches(torch.randperm(len(adv), generator=generator), cfg.minibatch_size):
            optimizer.zero_grad(set_to_none=True)
            step: dict[str, float] = {}
            for part in torch.split(rows, CHUNK) if cfg.minibatch_size <= 0 else (rows,):
                logits = batch.logits(policy, part, tokens[part])
                logp = policy.token_log_probs(logits / cfg.temperature, tokens[part])
                logp = logp if per_token else logp.sum(-1)
                pg, stats = loss_fn(logp, old_logp[part] if old_logp is not None else None, adv[part], cfg)
                loss = cfg.loss_scale * pg
                if ref_logits is not None:
                    kl = kl_to_reference(logits, ref_logits[part], cfg.temperature)
                    loss = loss + kl_coef * kl
                    stats = {**stats, "kl_ref": float(kl.detach())}
                share = len(part) / len(rows)
                (loss * share).backward()
                for k, v in {"loss": float(loss.detach()), **stats}.items():
                    step[k] = step.get(k, 0.0) + v * share
            step["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
            optimizer.step()
            for k, v in step.items():
                sums.setdefault(k, []).append(v)
    policy.eval()
    out = {k: float(np.mean(v)) for k, v in sums.items()}
    out["updates"] = len(sums.get("loss", []))
    if cfg.positive_only:
        out["positive_rows"] = int(len(adv))
    return out
