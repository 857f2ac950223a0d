"""A learned value baseline for Stage 2: ``improve.advantage = "gae"``.

The per-step learner's ``"normalized"`` advantage is the discounted return less the batch mean: a
constant baseline, so how much reward a *state* tends to collect (a block already near its target,
or one far off) rides on every action's credit as noise. A critic ``V(o, g)`` fitted to the returns
takes it out. Advantages are GAE(lambda) (Schulman et al., 2016),

    delta_t = r_t + gamma * V(o_{t+1}) - V(o_t),    A_t = sum_k (gamma * lambda)^k * delta_{t+k},

with ``V = 0`` after an episode that ended in success (the detector's, or the simulator's in the
oracle controls) and ``V(o_T)`` bootstrapped after a timeout. The critic is then fitted to the
lambda-returns ``A_t + V(o_t)`` of the batch (PPO's recipe; the policy's loss normalises ``A`` per
batch as ``"normalized"`` does).

What the critic reads: the frozen reward model's trunk features ``h(o, g)``, the ones its
steps-to-go head reads (so ``d`` is a linear read-out of the critic's input). They never change
during practice, so the critic is a small MLP on fixed features: with ``improve.train = "fusion"``
the fleet's fusion inputs give them for the cost of the fusion MLP.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from selfimprove.config import ImproveConfig
from selfimprove.data.episode import Episode
from selfimprove.model.checkpoint import optimizer_state_tensors, restore_optimizer
from selfimprove.model.inputs import from_episodes
from selfimprove.model.policy import EmbodiedModel
from selfimprove.reward import discounted_returns

PREFIX = "critic."  # train-state tensor names of the critic's weights
OPT_PREFIX = "critic_opt."  # ... and of its optimizer's state
CHUNK = 1024  # rows per forward pass of the frozen trunk


class Critic(nn.Module):
    """``V(h)``: two hidden layers on the frozen trunk's features."""

    def __init__(self, in_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


def gae(rewards: np.ndarray, values: np.ndarray, terminal: bool, gamma: float, lam: float) -> np.ndarray:
    """GAE(lambda) advantages of one episode: ``rewards`` [T], ``values`` [T + 1] (``V(o_0..o_T)``);
    ``terminal``: the episode ended in success, so nothing follows ``o_T`` (else ``V(o_T)`` bootstraps)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(rewards) + 1:
        raise ValueError(f"{len(values)} values for {len(rewards)} rewards; give V(o_0) .. V(o_T)")
    following = values[1:].copy()
    if terminal:
        following[-1] = 0.0
    deltas = rewards + gamma * following - values[:-1]
    return discounted_returns(deltas, gamma * lam)


def ended_in_success(episode: Episode) -> bool:
    """Whether nothing follows the episode's last frame (the detector or the simulator ended it)."""
    return episode.meta.get("ended_by") in ("detector", "success")


@torch.no_grad()
def trunk_features(reward_model: EmbodiedModel, episodes: list[Episode]) -> torch.Tensor:
    """The frozen reward model's trunk features of every frame of ``episodes`` (o_0 .. o_T each, in
    order): from the fleet's fusion inputs when every episode carries them, else from the frames."""
    was_training = reward_model.training
    reward_model.eval()
    try:
        if episodes and all(e.fused is not None for e in episodes) and reward_model.splits_at_fusion:
            z = torch.as_tensor(np.concatenate([e.fused for e in episodes])).float()
            return torch.cat([reward_model.encoder.fuse(part) for part in torch.split(z, CHUNK)])
        source, _ = from_episodes(episodes, reward_model.spec)  # the reward model's own inputs
        rows = torch.arange(len(source.frame_index))
        return torch.cat([reward_model.features(source.obs(part)).float() for part in torch.split(rows, CHUNK)])
    finally:
        reward_model.train(was_training)


class ValueBaseline:
    """The critic, its optimizer and the batch's advantages (module docstring)."""

    def __init__(self, in_dim: int, cfg: ImproveConfig, seed: int = 0) -> None:
        with torch.random.fork_rng(devices=[]):  # its init draws from its own seed, not the run's stream
            torch.manual_seed(seed)
            self.critic = Critic(in_dim)
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.value_lr)
        self.cfg = cfg

    def advantages(self, features: torch.Tensor, episodes: list[Episode], rewards: list[np.ndarray]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(advantages, lambda-return targets, features) of the acting rows, episode by episode.

        ``features``: every frame's (o_0 .. o_T of each episode, as :func:`trunk_features`)."""
        with torch.no_grad():
            values = torch.cat([self.critic(part) for part in torch.split(features, CHUNK)]).numpy()
        adv, acting, start = [], [], 0
        for episode, r in zip(episodes, rewards):
            end = start + episode.length + 1
            adv.append(gae(r, values[start:end], ended_in_success(episode), self.cfg.gamma, self.cfg.gae_lambda))
            acting.append(np.arange(start, end - 1))
            start = end
        if start != len(features):
            raise ValueError(f"{len(features)} feature rows for episodes of {start} frames")
        rows = torch.as_tensor(np.concatenate(acting))
        a = torch.as_tensor(np.concatenate(adv)).float()
        return a, a + torch.as_tensor(values)[rows], features[rows]

    def fit(self, features: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
            epochs: int, minibatch: int) -> dict[str, float]:
        """Regress the critic on the batch's lambda-returns; its loss and the share of the targets'
        variance it explains before fitting (a critic that explains none is a constant baseline)."""
        with torch.no_grad():
            before = torch.cat([self.critic(part) for part in torch.split(features, CHUNK)])
            spread = float(targets.var()) if len(targets) > 1 else 0.0
            explained = 1.0 - float((targets - before).var()) / spread if spread > 0 else 0.0
        losses = []
        size = minibatch if minibatch > 0 else len(targets)
        self.critic.train()
        for _ in range(epochs):
            for rows in torch.split(torch.randperm(len(targets), generator=generator), size):
                self.optimizer.zero_grad(set_to_none=True)
                loss = 0.5 * (self.critic(features[rows]) - targets[rows]).pow(2).mean()
                loss.backward()
                self.optimizer.step()
                losses.append(float(loss.detach()))
        self.critic.eval()
        return {"value_loss": float(np.mean(losses)) if losses else 0.0, "value_explained_variance": explained}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Train-state tensors and JSON of the critic and its optimizer (for the run's checkpoint)."""
        tensors = {PREFIX + k: v for k, v in self.critic.state_dict().items()}
        opt_tensors, opt_meta = optimizer_state_tensors(self.optimizer)
        tensors.update({OPT_PREFIX + k: v for k, v in opt_tensors.items()})
        return tensors, opt_meta

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.critic.load_state_dict({k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)})
        restore_optimizer(self.optimizer, {k[len(OPT_PREFIX):]: v for k, v in tensors.items()
                                           if k.startswith(OPT_PREFIX)}, meta)
