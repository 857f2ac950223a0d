"""Trunks of the embodied model: the CPU-size vector MLP and the multimodal image + language trunk.

``FiLMTrunk`` (the tabletop default): stacked camera frames go through a conv stack in which every
layer is FiLM-conditioned on the instruction embedding (so the image features already know which
blocks matter), then spatial-softmax keypoints, concatenated with the proprioception and the
instruction embedding, and a small MLP. With ``image_init="pretrained"`` a frozen ImageNet
MobileNetV2 (truncated at stride 8) replaces the first conv layers; with ``text_encoder="minilm"``
the pretrained MiniLM sentence encoder embeds the instruction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfimprove.model.text import HashedBagOfWordsEncoder, InstructionEncoder, MiniLMEncoder
from selfimprove.model.vision import FiLM, ImageEncoder, SpatialSoftmax

TEXT_ENCODERS = ("hashed_bow", "hashed_roles", "minilm")


class HalvesMiniLM(InstructionEncoder):
    """MiniLM embedding of the sentence and of its first and second half of words, concatenated.

    MiniLM's mean pooling scores "push the red moon to the blue cube" and its swap 0.995 similar;
    the halves keep which block is moved and which is the target.
    """

    def __init__(self) -> None:
        super().__init__()
        self.minilm = MiniLMEncoder()
        self.dim = 3 * self.minilm.dim

    def encode(self, texts: list[str]) -> torch.Tensor:
        for t in self._split_cached(texts):
            words = t.split()
            mid = len(words) // 2
            parts = [t, " ".join(words[:mid]) or t, " ".join(words[mid:]) or t]
            self._cache[t] = self.minilm.encode(parts).reshape(-1)
        return torch.stack([self._cache[t] for t in texts]).to(self.device)


def make_text_encoder(kind: str, dim: int = 128) -> InstructionEncoder:
    if kind in ("hashed_bow", "hashed_roles"):
        return HashedBagOfWordsEncoder(dim=dim, positions=kind == "hashed_roles")
    if kind == "minilm":
        return HalvesMiniLM()
    raise ValueError(f"unknown text encoder {kind!r}; choose one of {TEXT_ENCODERS}")


COND_CACHE_SIZE = 4096  # instructions whose conditioning a trunk keeps (a tabletop preset has a few hundred)


class FiLMConvStack(nn.Module):
    """Conv -> GroupNorm -> FiLM(instruction) -> ReLU, for each layer."""

    def __init__(self, in_channels: int, channels: list[int], strides: list[int], cond_dim: int,
                 film: bool = True) -> None:
        super().__init__()
        self.film = film  # False: plain conv stack (late fusion: the instruction joins after it)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.films = nn.ModuleList()
        cin = in_channels
        for c, s in zip(channels, strides):
            self.convs.append(nn.Conv2d(cin, c, 3, s, 1))
            self.norms.append(nn.GroupNorm(min(8, c), c))
            self.films.append(FiLM(cond_dim, c))
            cin = c
        self.out_channels = cin

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for conv, norm, film in zip(self.convs, self.norms, self.films):
            x = norm(conv(x))
            x = torch.relu_(film(x, cond) if self.film else x)  # in place: the norm/FiLM output is a temporary
        return x

    def modulations(self, cond: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the ``(scale, shift)`` [B, C] that GroupNorm's affine followed by FiLM apply to the
        normalised activations: ``norm(x) * w + b`` then ``* (1 + gamma) + beta`` is one multiply-add."""
        out = []
        for norm, film in zip(self.norms, self.films):
            gamma, beta = film.proj(cond).chunk(2, dim=-1)
            scale = 1.0 + gamma
            out.append((scale * norm.weight, scale * norm.bias + beta))
        return out

    def modulated(self, x: torch.Tensor, modulations: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """:meth:`forward` from :meth:`modulations` (the same function; without gradients, in place):
        GroupNorm without its affine, then one multiply-add and the ReLU on its output. The values
        differ from :meth:`forward` in the last bits of float32 (the products are reassociated)."""
        for conv, norm, (scale, shift) in zip(self.convs, self.norms, modulations):
            y = F.group_norm(conv(x), norm.num_groups, eps=norm.eps)
            x = torch.relu_(y.mul_(scale[:, :, None, None]).add_(shift[:, :, None, None]))
        return x


class FiLMTrunk(nn.Module):
    """Images + proprioception + instruction -> one feature vector (see the module docstring)."""

    def __init__(self, image_key: str, vector_keys: list[str], vector_dim: int, frames: int,
                 image_init: str, text_encoder: str, channels: list[int], hidden: int, layers: int,
                 text_dim: int = 128, film: bool = True) -> None:
        super().__init__()
        self.image_key, self.vector_keys, self.frames = image_key, vector_keys, frames
        self.text = make_text_encoder(text_encoder, text_dim)
        cond = self.text.dim
        self.text_proj = nn.Sequential(nn.Linear(cond, hidden), nn.GELU())
        if image_init == "pretrained":
            self.stem = ImageEncoder(init="pretrained", trunk="mobilenet_v2", output_stride=8, freeze=True,
                                     frames=frames)
            in_channels, strides = self.stem.out_channels, [1] * len(channels)
        elif image_init == "scratch":
            self.stem = None
            in_channels, strides = 3 * frames, [2, 2, 2, 1, 1, 1][: len(channels)]
        else:
            raise ValueError(f"image_init must be 'scratch' or 'pretrained', got {image_init!r}")
        self.convs = FiLMConvStack(in_channels, channels, strides, hidden, film=film)
        self.keypoints = SpatialSoftmax()
        self.register_buffer("obs_mean", torch.zeros(vector_dim))
        self.register_buffer("obs_std", torch.ones(vector_dim))
        self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).repeat(frames).view(1, -1, 1, 1),
                             persistent=False)
        width = 2 * self.convs.out_channels + vector_dim + hidden
        mlp: list[nn.Module] = []
        for _ in range(layers):
            mlp += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]
            width = hidden
        self.mlp = nn.Sequential(*mlp)
        self.out_dim = width
        self._cond_cache: dict[str, tuple] = {}  # instruction -> its conditioning (see _conditioning)
        self._cond_key: tuple | None = None

    def _conditioning(self, instructions: list[str]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Without gradients: the instruction projection [B, hidden] and each conv layer's
        :meth:`FiLMConvStack.modulations` of ``instructions``, each instruction computed once and
        cached while the weights (and the autocast state) stay as they are.

        A robot's instruction is fixed for its episode, so acting and ``d`` would otherwise redo the
        text encoder, its projection and every FiLM projection on every control step (~5% of a
        Stage-2 collection). Any in-place change of a weight (an optimiser step, ``load_state_dict``)
        bumps its version counter and a new tensor (``.to``) has a new address; both are in the key.
        """
        key = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
               tuple((id(p), p._version, p.data_ptr(), p.dtype) for p in self._conditioning_tensors()))
        if key != self._cond_key or len(self._cond_cache) > COND_CACHE_SIZE:
            self._cond_cache, self._cond_key = {}, key
        missing = list(dict.fromkeys(t for t in instructions if t not in self._cond_cache))
        if missing:
            cond = self.text_proj(self.text.encode(missing))
            mods = self.convs.modulations(cond)
            for i, text in enumerate(missing):
                self._cond_cache[text] = (cond[i], [(scale[i], shift[i]) for scale, shift in mods])
        rows = [self._cond_cache[t] for t in instructions]
        cond = torch.stack([r[0] for r in rows])
        layers = [(torch.stack([r[1][k][0] for r in rows]), torch.stack([r[1][k][1] for r in rows]))
                  for k in range(len(self.convs.convs))]
        return cond, layers

    def _conditioning_tensors(self) -> list[torch.Tensor]:
        return [*self.text.parameters(), *self.text.buffers(), *self.text_proj.parameters(),
                *self.convs.norms.parameters(), *self.convs.films.parameters()]

    def set_normalization(self, mean, std) -> None:
        self.obs_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def flatten(self, obs: dict) -> torch.Tensor:
        return torch.cat([obs[k].reshape(obs[k].shape[0], -1).float() for k in self.vector_keys], dim=-1)

    def forward(self, obs: dict) -> torch.Tensor:
        return self.fuse(self.fusion_inputs(obs))

    def fuse(self, z: torch.Tensor) -> torch.Tensor:
        """The fusion MLP: the trunk's features from :meth:`fusion_inputs`."""
        return self.mlp(z)

    def fusion_inputs(self, obs: dict) -> torch.Tensor:
        """What the fusion MLP reads [B, Z]: image keypoints (from the instruction-conditioned convs),
        the normalised proprioception and the instruction's projection. Stage 2 with
        ``improve.train = "fusion"`` keeps everything up to here at SFT and computes it once per frame."""
        images = obs[self.image_key]
        if images.dim() == 4:
            images = images.unsqueeze(1)
        inference = self.convs.film and not torch.is_grad_enabled()
        if inference:  # acting, d, cached features: the instruction's part comes from the cache
            cond, modulations = self._conditioning(list(obs["instruction"]))
        else:
            cond = self.text_proj(self.text.encode(list(obs["instruction"])))
        if self.stem is not None:
            x = self.stem(images)
        else:
            b, f, h, w, c = images.shape
            # in place on the fresh float copy: the same values as ``/ 255.0 - mean``, two temporaries fewer
            x = images.permute(0, 1, 4, 2, 3).reshape(b, f * c, h, w).to(torch.float32, copy=True)
            x = x.div_(255.0).sub_(self.pixel_mean)
        features = self.keypoints(self.convs.modulated(x, modulations) if inference else self.convs(x, cond))
        vector = (self.flatten(obs) - self.obs_mean) / self.obs_std
        return torch.cat([features, vector, cond], dim=-1)
