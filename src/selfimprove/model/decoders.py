"""Action decoders: how the trunk's features become a distribution over action token vectors.

An action of ``D`` dimensions is ``D`` tokens, one bin per dimension (:mod:`~selfimprove.model.tokens`).
Every decoder writes its distribution as ``K`` categoricals of ``C`` classes, ``logits [B, K, C]``,
with ``targets(tokens) [B, K]`` the class of each one, so that every user of a log-probability (the BC
loss, REINFORCE, PPO ratios, the KL to the SFT policy) is the same few lines for all of them:

* ``"independent"``: one categorical per dimension, all read from the features alone (``K = D``).
  Sampling each dimension on its own mixes dimensions from different modes of the demonstrator, and
  the per-dimension argmax can be an action it never takes. Checkpoints made before the decoders
  existed are this one (its weights keep the name ``action_head.weight``).
* ``"autoregressive"``: token ``k`` is predicted from the features and the tokens before it,
  ``log pi(a) = sum_k log pi(a_k | a_<k, o, g)``, as a VLM writes an action as text tokens (RT-2,
  OpenVLA, the paper's policy). ``K = D``; the logits of dimension ``k`` are conditioned on the
  given tokens' prefix (teacher forcing), so in Stage 2 the KL to the SFT policy is the per-token KL
  along the batch's own actions (the chain rule's terms; exact in expectation over the prefixes).
* ``"joint"``: one categorical over every combination of bins (``K = 1``, ``C = bins ** D``): exact,
  and cheap only for small ``D`` (a 2-D action of 41 bins is 1,681 classes).
"""

from __future__ import annotations

import torch
from torch import nn

#: the most classes the joint decoder may have (bins ** action_dim)
MAX_JOINT_CLASSES = 8192


class ActionDecoder(nn.Module):
    """The contract every decoder keeps (see the module docstring)."""

    #: whether :meth:`logits` reads the tokens (teacher forcing)
    needs_tokens = False

    def logits(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K, C] logits of the K categoricals (conditioned on ``tokens`` where the decoder needs them)."""
        raise NotImplementedError

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, D] action tokens -> [B, K] the class each categorical should give."""
        raise NotImplementedError

    def sample(self, h: torch.Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, D] tokens drawn at ``temperature`` (0: the most likely class of each categorical in turn)."""
        raise NotImplementedError


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One class per row of ``logits [..., C]`` at ``temperature`` (0: argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    # inverse-CDF sampling: one uniform per row against the cumulative probabilities. Exact, like
    # ``torch.multinomial``, and ~15x faster on a fleet's 16 x 1,681 joint logits (multinomial draws
    # one exponential per class); the acting loop samples every control step
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.reshape(-1, probs.shape[-1]).cumsum_(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator) * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
    return index.view(probs.shape[:-1])


class IndependentDecoder(nn.Linear, ActionDecoder):
    """One linear layer, ``D`` categoricals read from the features alone."""

    def __init__(self, features: int, action_dim: int, bins: int, width: int = 0) -> None:
        nn.Linear.__init__(self, features, action_dim * bins)
        self.action_dim, self.bins = action_dim, bins

    def logits(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return nn.Linear.forward(self, h).view(h.shape[0], self.action_dim, self.bins)

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def sample(self, h: torch.Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return draw(self.logits(h), temperature, generator)


class JointDecoder(nn.Linear, ActionDecoder):
    """One categorical over all ``bins ** D`` token vectors (row-major: the first dimension varies slowest)."""

    def __init__(self, features: int, action_dim: int, bins: int, width: int = 0) -> None:
        classes = bins ** action_dim
        if classes > MAX_JOINT_CLASSES:
            raise ValueError(f"the joint action decoder needs bins ** action_dim = {bins} ** {action_dim} = {classes} "
                             f"classes (at most {MAX_JOINT_CLASSES}); use model.action_decoder = 'autoregressive'")
        nn.Linear.__init__(self, features, classes)
        self.action_dim, self.bins = action_dim, bins
        self.register_buffer("place", bins ** torch.arange(action_dim - 1, -1, -1), persistent=False)

    def logits(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return nn.Linear.forward(self, h).unsqueeze(1)

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens * self.place).sum(-1, keepdim=True)

    def sample(self, h: torch.Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        index = draw(self.logits(h)[:, 0], temperature, generator)
        return (index.unsqueeze(-1) // self.place) % self.bins


class AutoregressiveDecoder(ActionDecoder):
    """Token ``k`` from the features and the tokens before it: a small MLP on their sum.

    ``z_k = W h + p_k + sum_{j<k} E_j[a_j]`` (``p_k`` a learnt position, ``E_j`` an embedding of
    dimension ``j``'s bins), then a residual MLP block and a per-dimension linear read-out. With
    teacher forcing all ``D`` logits come from one pass (an exclusive cumulative sum of the
    embeddings); sampling takes ``D`` passes of the small head, never of the trunk.
    """

    needs_tokens = True

    def __init__(self, features: int, action_dim: int, bins: int, width: int = 256) -> None:
        super().__init__()
        self.action_dim, self.bins = action_dim, bins
        self.project = nn.Linear(features, width)
        self.position = nn.Parameter(torch.zeros(action_dim, width))
        self.embed = nn.Embedding(action_dim * bins, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.out_norm = nn.LayerNorm(width)
        self.out_weight = nn.Parameter(torch.empty(action_dim, width, bins))
        nn.init.normal_(self.out_weight, std=width ** -0.5)
        self.out_bias = nn.Parameter(torch.zeros(action_dim, bins))
        self.register_buffer("offsets", torch.arange(action_dim) * bins, persistent=False)

    def _read_out(self, z: torch.Tensor, dims: slice) -> torch.Tensor:
        """[B, k, W] states of dimensions ``dims`` -> [B, k, bins] logits."""
        z = z + self.mlp(self.norm(z))
        z = self.out_norm(z)
        return torch.einsum("bkw,kwc->bkc", z, self.out_weight[dims]) + self.out_bias[dims]

    def logits(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        if tokens is None:
            raise ValueError("the autoregressive decoder's logits depend on the action tokens before each one; "
                             "pass the tokens (teacher forcing) or sample with EmbodiedModel.act()")
        e = self.embed(tokens + self.offsets)
        prefix = e.cumsum(1) - e  # sum of the embeddings of the tokens before each dimension
        z = self.project(h).unsqueeze(1) + self.position + prefix
        return self._read_out(z, slice(None))

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def sample(self, h: torch.Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        base = self.project(h)
        prefix = torch.zeros_like(base)
        out = []
        for k in range(self.action_dim):
            logits = self._read_out((base + self.position[k] + prefix).unsqueeze(1), slice(k, k + 1))[:, 0]
            token = draw(logits, temperature, generator)
            out.append(token)
            prefix = prefix + self.embed(token + self.offsets[k])
        return torch.stack(out, dim=-1)


#: ``model.action_decoder`` -> the decoder class (each takes features, action_dim, bins, width)
DECODERS: dict[str, type[ActionDecoder]] = {
    "independent": IndependentDecoder,
    "autoregressive": AutoregressiveDecoder,
    "joint": JointDecoder,
}


def make_decoder(name: str, features: int, action_dim: int, bins: int, width: int) -> ActionDecoder:
    """The decoder ``name`` of :data:`DECODERS`, or a ValueError naming the known ones."""
    if name not in DECODERS:
        raise ValueError(f"unknown action decoder {name!r}; known: {sorted(DECODERS)}")
    return DECODERS[name](features, action_dim, bins, width)
