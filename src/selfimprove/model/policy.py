"""The embodied model: one trunk, a behaviour-cloning head over action tokens, a steps-to-go head.

``d(o, g) = E[steps-to-go]`` under the categorical steps-to-go head is what the frozen copy turns
into a reward and a success detector in Stage 2; the trainable copy acts with the action head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from selfimprove.errors import ConfigError
from selfimprove.model.decoders import DECODERS, make_decoder
from selfimprove.model.inputs import check_inputs
from selfimprove.model.tokens import ActionTokenizer


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    domain: str
    obs_shapes: dict[str, list[int]]  # name -> per-frame shape of each observation the model reads
    action_low: list[float]
    action_high: list[float]
    action_bins: int = 21
    # how the action tokens are decoded (model/decoders.py): "independent" (checkpoints made before
    # the choice existed), "autoregressive" (one dimension after another) or "joint" (all bin combinations)
    action_decoder: str = "independent"
    max_steps: int = 100
    hidden: int = 256
    layers: int = 3
    dropout: float = 0.0
    encoder: str = "mlp"  # "mlp" (vector observations), "film" (images + instruction), "late_fusion" or "hf"
    frames: int = 1  # camera frames stacked per observation (the latest ones)
    image_init: str = "scratch"  # "scratch" or "pretrained" (frozen ImageNet MobileNetV2 stem)
    text_encoder: str = "hashed_bow"  # "hashed_roles" / "hashed_bow" (trainable, scratch) or "minilm" (pretrained)
    # a last steps-to-go class "not reached within the horizon" (value max_steps + 1), trained on
    # mismatched-instruction negatives (sft.negatives); False in checkpoints made before it existed
    stg_never: bool = False
    channels: list[int] = field(default_factory=lambda: [32, 64, 64, 64])
    # encoder "hf": a Hugging Face vision-language model as the trunk (see model/hf_backbone.py)
    hf_model: str = ""  # local folder or hub id
    hf_dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16" or "float32"
    hf_device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    hf_train: str = "all"  # "all", "language" (vision tower frozen) or "heads" (whole VLM frozen)
    hf_batch_size: int = 64  # observations per VLM forward pass (bigger batches run in chunks)
    extra: dict[str, Any] = field(default_factory=dict)  # hf: the VLM's config ("hf_config")

    @property
    def image_keys(self) -> list[str]:
        return sorted(k for k, shape in self.obs_shapes.items() if len(shape) == 3)

    @property
    def vector_keys(self) -> list[str]:
        return sorted(k for k, shape in self.obs_shapes.items() if len(shape) != 3)

    @property
    def action_dim(self) -> int:
        return len(self.action_low)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLPEncoder(nn.Module):
    """Flattens vector observations into one normalised feature vector."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.keys = sorted(spec.obs_shapes)
        if spec.image_keys:
            raise ValueError(f"the mlp encoder takes vector observations; {spec.image_keys} are images: "
                             "use model.encoder = 'film'")
        dim = sum(int(np.prod(spec.obs_shapes[k])) for k in self.keys)
        self.register_buffer("obs_mean", torch.zeros(dim))
        self.register_buffer("obs_std", torch.ones(dim))
        layers: list[nn.Module] = []
        width = dim
        for _ in range(spec.layers):
            layers += [nn.Linear(width, spec.hidden), nn.LayerNorm(spec.hidden), nn.GELU()]
            if spec.dropout:
                layers.append(nn.Dropout(spec.dropout))
            width = spec.hidden
        self.net = nn.Sequential(*layers)
        self.out_dim = width

    def set_normalization(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.obs_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(np.maximum(std, 1e-6), dtype=torch.float32))

    def flatten(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [obs[k].reshape(obs[k].shape[0], -1).float() for k in self.keys if k != "instruction"]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net((self.flatten(obs) - self.obs_mean) / self.obs_std)


def _film(spec: ModelSpec, film: bool = True) -> nn.Module:
    from selfimprove.model.backbones import FiLMTrunk

    if len(spec.image_keys) != 1:
        raise ValueError(f"the {spec.encoder} encoder needs exactly one image observation, got {spec.image_keys}")
    vector_dim = sum(int(np.prod(spec.obs_shapes[k])) for k in spec.vector_keys)
    return FiLMTrunk(spec.image_keys[0], spec.vector_keys, vector_dim, spec.frames, spec.image_init,
                     spec.text_encoder, list(spec.channels), spec.hidden, spec.layers, film=film)


def _late_fusion(spec: ModelSpec) -> nn.Module:
    """The FiLM trunk without FiLM: image features are computed blind to the instruction (ablation)."""
    return _film(spec, film=False)


def _hf(spec: ModelSpec) -> nn.Module:
    """A Hugging Face vision-language model as the trunk (needs the optional ``hf`` extra)."""
    from selfimprove.model.hf_backbone import hf_trunk

    return hf_trunk(spec)


ENCODERS = {"mlp": MLPEncoder, "film": _film, "late_fusion": _late_fusion, "hf": _hf}


class EmbodiedModel(nn.Module):
    """Shared trunk with two heads; see the module docstring."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {spec.encoder!r}; known: {sorted(ENCODERS)}")
        if spec.action_decoder not in DECODERS:
            raise ValueError(f"unknown action decoder {spec.action_decoder!r}; known: {sorted(DECODERS)}")
        self.spec = spec
        self.tokenizer = ActionTokenizer(spec.action_low, spec.action_high, spec.action_bins)
        self.encoder = ENCODERS[spec.encoder](spec)
        self.action_head = make_decoder(spec.action_decoder, self.encoder.out_dim, spec.action_dim,
                                        spec.action_bins, spec.hidden)
        classes = spec.max_steps + 1 + int(spec.stg_never)
        self.stg_head = nn.Linear(self.encoder.out_dim, classes)
        # d(o, g) = E[steps-to-go]; the "never" class counts as max_steps + 1 steps
        self.register_buffer("stg_values", torch.arange(classes, dtype=torch.float32))

    def features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The trunk's features [B, F] of checked inputs (both heads read them).

        ``obs`` is checked against the spec first (:func:`selfimprove.model.inputs.check_inputs`): a
        frame of the wrong size or channels, a vector of the wrong length or an empty or non-text
        instruction raises InputError naming the fix.
        """
        check_inputs(self.spec, obs)
        return self.encoder(obs)

    def forward(self, obs: dict[str, torch.Tensor], tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (action logits [B, K, C], steps-to-go logits [B, max_steps + 1]).

        The action logits are the decoder's K categoricals (:mod:`selfimprove.model.decoders`):
        ``[B, action_dim, bins]`` for the independent and autoregressive decoders. ``tokens [B, D]``
        are the actions whose prefixes the autoregressive decoder conditions on (teacher forcing); the
        other decoders ignore them.
        """
        h = self.features(obs)
        return self.action_head.logits(h, tokens), self.stg_head(h)

    @property
    def splits_at_fusion(self) -> bool:
        """Whether the trunk exposes its fusion MLP's inputs (the FiLM and late-fusion trunks), so
        Stage 2 can train the fusion MLP and the action decoder on features computed once per frame."""
        return hasattr(self.encoder, "fusion_inputs")

    def fusion_inputs(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inputs of the trunk's fusion MLP [B, Z] (see :meth:`splits_at_fusion`)."""
        if not self.splits_at_fusion:
            raise ConfigError(f"the {self.spec.encoder!r} encoder has no fusion MLP to train on its own; "
                              "improve.train = 'fusion' needs the 'film' or 'late_fusion' encoder")
        check_inputs(self.spec, obs)
        return self.encoder.fusion_inputs(obs)

    def action_logits_from_fusion(self, z: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The action logits of :meth:`forward` from :meth:`fusion_inputs` (the same values)."""
        return self.action_head.logits(self.encoder.fuse(z), tokens)

    def shares_fusion_inputs(self, other: "EmbodiedModel") -> bool:
        """Whether ``other`` computes the same :meth:`fusion_inputs` as this model: the same spec and
        the same weights below the fusion MLP (a policy practising with ``improve.train = "fusion"``
        beside its SFT checkpoint as the reward model). Then one conv pass per frame serves both."""
        if not (self.splits_at_fusion and other.splits_at_fusion and self.spec == other.spec):
            return False
        mine, theirs = self.encoder.state_dict(), other.encoder.state_dict()
        return mine.keys() == theirs.keys() and all(
            torch.equal(v, theirs[k]) for k, v in mine.items() if not k.startswith("mlp."))

    def fusion_parameters(self) -> list[nn.Parameter]:
        """The weights ``improve.train = "fusion"`` trains: the fusion MLP and the action decoder."""
        return [*self.encoder.mlp.parameters(), *self.action_head.parameters()]

    @property
    def never_class(self) -> int | None:
        """Index of the "not reached within the horizon" class, or None when the head has none."""
        return self.spec.max_steps + 1 if self.spec.stg_never else None

    def steps_to_go_distribution(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Categorical logits over steps-to-go 0..max_steps (then "never" when ``spec.stg_never``)."""
        return self.stg_head(self.features(obs))

    def expected_steps_to_go(self, obs: dict[str, torch.Tensor], reachable: bool = False) -> torch.Tensor:
        """d(o, g): the expectation of the steps-to-go distribution, [B].

        ``reachable``: the expectation over 0..max_steps only (the "never" class left out and the rest
        renormalised), for a head that has that class; the full expectation otherwise.
        """
        return self.expected_from_logits(self.steps_to_go_distribution(obs), reachable)

    def expected_steps_to_go_from_fusion(self, z: torch.Tensor, reachable: bool = False) -> torch.Tensor:
        """:meth:`expected_steps_to_go` from :meth:`fusion_inputs` (the same values)."""
        return self.expected_from_logits(self.stg_head(self.encoder.fuse(z)), reachable)

    def expected_from_logits(self, logits: torch.Tensor, reachable: bool = False) -> torch.Tensor:
        """:meth:`expected_steps_to_go` from the steps-to-go head's logits (already computed)."""
        if reachable and self.spec.stg_never:
            return expected_steps(logits[:, :-1], self.stg_values[:-1])
        return expected_steps(logits, self.stg_values)

    def token_log_prob(self, action_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log pi(a | o, g) [B] of token vectors [B, action_dim] under ``action_logits`` from
        :meth:`forward` (with the same tokens): the sum of the decoder's categoricals' log-probabilities."""
        return self.token_log_probs(action_logits, tokens).sum(-1)

    def token_log_probs(self, action_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's categoricals' log-probabilities of ``tokens`` [B, K], one per categorical
        (for the autoregressive decoder ``log pi(a_k | a_<k, o, g)``; one column for the joint one)."""
        logp = torch.log_softmax(action_logits, dim=-1)
        targets = self.action_head.targets(tokens)
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: dict[str, torch.Tensor], temperature: float = 1.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample action tokens [B, action_dim]; temperature 0 decodes greedily (the most likely
        class of each categorical, one after another for the autoregressive decoder)."""
        return self.action_head.sample(self.features(obs), temperature, generator)


def expected_steps(stg_logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (torch.softmax(stg_logits, dim=-1) * values).sum(-1)

