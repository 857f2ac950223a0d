"""A Hugging Face vision-language model (SmolVLM / Idefics3, PaliGemma, ...) as the trunk of the embodied model.

``model.encoder = "hf"`` with ``model.hf_model = <local folder or hub id>`` loads the model's base
(vision tower + connector + language model, without the LM head; the ``AutoModel`` class of its
config) and its ``AutoProcessor``. Each observation becomes one prompt: the camera frames as images,
then the instruction (through the processor's chat template when it has one); :class:`VLMInputs`
makes the processor's inputs without running it on every batch. One forward pass gives the last
hidden states; they are pooled (the last prompt token's state, which under causal attention has read
every frame and word, concatenated with the masked mean over all tokens), joined with the normalised
proprioception (the effector position, which the VLM does not see) in a small MLP, and fed to the
same two heads as every other trunk: per-dimension action-token logits and steps-to-go logits.

Why heads on fused features rather than RT-2-style action text: the action and steps-to-go heads,
the BC / steps-to-go / REINFORCE losses, ``d(o, g)``, the success detector and the checkpoints stay
exactly those of the other trunks; one forward pass per control step gives both the action
distribution and ``d(o, g)`` (RT-2-style decoding needs ``action_dim`` autoregressive steps for an
action and a second pass to score steps-to-go text); and no vocabulary entries are repurposed, so
the action bins (e.g. 41) and steps-to-go classes (e.g. 0..200) need no matching tokens.

Where it runs: the VLM sits on ``hf_device`` (``auto``: CUDA when present) in ``hf_dtype``
(``auto``: bfloat16 on CUDA, float32 on the CPU); the pooled features come back as float32 to the
device of the rest of the model (the CPU), so trainers, samplers and the reward code are unchanged.
Checkpoints: the VLM's weights are saved with the heads in our ``model.safetensors``; its config is
stored in the spec (``spec.extra["hf_config"]``, in our ``config.json``), so loading a checkpoint
builds the VLM from that config and reads no pretrained weights; only the processor (tokenizer and
image preprocessing settings) is read again from ``hf_model``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfimprove.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["HF_DEVICES", "HF_DTYPES", "HF_TRAIN", "HFVisionLanguageTrunk", "TRANSFORMERS_VERSION", "VLMInputs",
           "hf_trunk", "pool_hidden_states", "resolve_device", "resolve_dtype"]

TRANSFORMERS_VERSION = "5.24.0"
HF_DTYPES = ("auto", "bfloat16", "float32")
HF_DEVICES = ("auto", "cpu", "cuda")
HF_TRAIN = ("all", "language", "heads")  # what learns: everything; all but the vision tower; only MLP + heads
_INSTALL_HINT = f'pip install -c constraints.txt "selfimprove[hf]" (transformers=={TRANSFORMERS_VERSION})'


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"model.encoder = 'hf' needs the package 'transformers'; install it with: "
                          f"{_INSTALL_HINT}") from None
    return transformers


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"model.hf_device = {name!r} but torch sees no CUDA GPU here; use 'auto' (CUDA when "
                              "present, else the CPU) or 'cpu'")
        return torch.device(name)
    raise ConfigError(f"model.hf_device must be one of {HF_DEVICES} (or 'cuda:N'), got {name!r}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU that supports it, float32 otherwise (bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name in ("bfloat16", "float32"):
        return getattr(torch, name)
    raise ConfigError(f"model.hf_dtype must be one of {HF_DTYPES}, got {name!r}")


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith(("/", ".", "~"))


def _load_error(source: str, what: str, exc: Exception) -> CheckpointError:
    if _is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            return CheckpointError(f"model.hf_model = {source!r}: no such folder; pass a folder written by "
                                   "save_pretrained (model + processor files) or a Hugging Face hub id")
        return CheckpointError(f"could not load the {what} from the folder {source!r} ({type(exc).__name__}: {exc}); "
                               "it must hold a transformers vision-language model and its processor as written by "
                               "model.save_pretrained(folder) and processor.save_pretrained(folder)")
    return CheckpointError(
        f"could not load the {what} of the hub id {source!r} ({type(exc).__name__}: {exc}). A hub id works only "
        "where the Hugging Face hub is reachable or the model is already in the local cache (HF_HOME; set "
        f"HF_HUB_OFFLINE=1 to use the cache without network). Otherwise download it where the hub is reachable "
        f"(`hf download {source} --local-dir DIR`), copy DIR here and pass --set model.hf_model=DIR")


def load_processor(source: str) -> Any:
    """The model's ``AutoProcessor`` (tokenizer + image processor); remote code is never run."""
    transformers = _transformers()
    try:
        return transformers.AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(source, "processor", exc) from exc


def load_pretrained(source: str, dtype: torch.dtype) -> nn.Module:
    """The pretrained base model (no LM head) from a folder or hub id.

    Hub checkpoints are image-text-to-text models (base + LM head): loading them as such and keeping
    ``base_model`` reads every stored tensor (no "unexpected lm_head" report); a config with no
    image-text-to-text class loads with ``AutoModel``.
    """
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        if type(config) in transformers.AutoModelForImageTextToText._model_mapping:
            return transformers.AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).base_model
        return transformers.AutoModel.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(source, "model", exc) from exc


def config_to_dict(config: Any) -> dict[str, Any]:
    """A transformers config as plain JSON data (what the checkpoint's config.json stores)."""
    return json.loads(config.to_json_string(use_diff=False))


def build_from_config(data: dict[str, Any], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The base model from a stored config, with fresh weights (a checkpoint's weights are loaded next)."""
    transformers = _transformers()
    data = dict(data)
    model_type = data.pop("model_type", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **data)
        with torch.device(device):  # initialise where it will run: fast on a GPU
            return transformers.AutoModel.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"the stored Hugging Face config (model_type {model_type!r}) cannot be rebuilt with "
                              f"transformers {transformers.__version__} ({exc}); use transformers=="
                              f"{TRANSFORMERS_VERSION}") from exc


def pool_hidden_states(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, D] states and [B, L] attention mask -> [B, 2D]: last real token's state and masked mean.

    The last real token is found from the mask, so left- and right-padded batches pool alike; sums
    are taken in float32 (a bfloat16 mean over hundreds of tokens loses digits).
    """
    hidden, mask = hidden.float(), mask.to(hidden.device)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * (mask > 0)).argmax(-1)
    last_state = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.cat([last_state, mean], dim=-1)


# PIL resampling codes (NEAREST, LANCZOS, BILINEAR, BICUBIC) -> the closest torch interpolation
_TORCH_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic"}
# image processors that resize every frame to one fixed size, rescale and normalise (nothing else when
# Idefics3 / SmolVLM image splitting is off): their pixels can be made in torch
_FIXED_SIZE_IMAGE_PROCESSORS = ("Idefics3ImageProcessor", "SmolVLMImageProcessor", "SiglipImageProcessor")
_PIXEL_TOLERANCE = 0.05  # max |torch - processor| on a smooth probe, in normalised units (1/255 ~ 0.008)


def _probe_frame(height: int, width: int) -> np.ndarray:
    """A smooth uint8 test image: resampling filters agree on it, unlike on noise."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    return (np.stack([x, y, (x + y) / 2], axis=-1) * 255).round().astype(np.uint8)


class VLMInputs:
    """Model inputs (token ids, masks, pixel values) from uint8 frames and instructions, as the processor makes them.

    The processor is the reference, but running it on every batch costs ~20 ms per frame on the CPU
    (PIL resizing to the model's 384-512 px input), more than a small VLM's forward pass on a GPU.
    So the text part (prompt with image placeholders -> token ids) is made once per distinct
    instruction by the processor and cached, and the pixels are resized and normalised in torch on
    the model's device; at construction a probe checks that this reproduces the processor's pixel
    values, else every batch goes through the processor (``fast = False``).
    """

    def __init__(self, processor: Any, frames: int, image_shape: tuple[int, int], accepted: set[str]) -> None:
        self.processor, self.frames, self.accepted = processor, frames, accepted
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.left_padding = getattr(tokenizer, "padding_side", "right") == "left"
        ip = processor.image_processor
        self.image_kwargs: dict[str, Any] = {}
        if hasattr(ip, "do_image_splitting"):
            # one tile per frame: splitting multiplies the image tokens for no gain at camera-frame sizes;
            # resizing straight to the tile size skips an intermediate up-sampling to size["longest_edge"]
            self.image_kwargs["do_image_splitting"] = False
            tile = getattr(ip, "max_image_size", None)
            if isinstance(tile, dict) and "longest_edge" in tile:
                self.image_kwargs["size"] = {"longest_edge": int(tile["longest_edge"])}
        self._prompts: dict[str, str] = {}
        self._rows: dict[str, dict[str, torch.Tensor]] = {}
        self._probe = np.stack([_probe_frame(*image_shape)] * frames)[None]  # [1, F, H, W, 3]
        reference = self.run_processor(self._probe, ["probe"])
        pixels = reference["pixel_values"]
        self.target = tuple(int(d) for d in pixels.shape[-2:])
        self.pixel_dims = pixels.dim()  # 5: [B, F, 3, h, w] (Idefics3); 4: [B * F, 3, h, w] (PaliGemma)
        self.mask_dtype = reference["pixel_attention_mask"].dtype if "pixel_attention_mask" in reference else None
        self.scale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
        normalize = getattr(ip, "do_normalize", True)
        self.mean = torch.tensor(ip.image_mean if normalize else 0.0, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(ip.image_std if normalize else 1.0, dtype=torch.float32).view(1, -1, 1, 1)
        self.mode = _TORCH_RESAMPLE.get(int(getattr(ip, "resample", 3) or 3), "bicubic")
        self.fast = False
        if type(ip).__name__.removesuffix("Pil") in _FIXED_SIZE_IMAGE_PROCESSORS and pixels.shape[-3] == 3:
            mine = self.pixels(torch.as_tensor(self._probe), torch.device("cpu"), torch.float32)
            same_mask = self.mask_dtype is None or bool(reference["pixel_attention_mask"].all())
            same_shape = mine["pixel_values"].shape == pixels.shape
            diff = (mine["pixel_values"] - pixels.float()).abs().max() if same_shape else float("inf")
            self.fast = same_mask and float(diff) <= _PIXEL_TOLERANCE
        if not self.fast:
            log.warning("%s: pixels go through the processor on every batch (slow on large batches)",
                        type(ip).__name__)

    def prompt(self, instruction: str) -> str:
        """The text of one observation: one image placeholder per frame, then the instruction."""
        text = self._prompts.get(instruction)
        if text is None:
            if getattr(self.processor, "chat_template", None):
                content = [{"type": "image"}] * self.frames + [{"type": "text", "text": instruction}]
                text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                          add_generation_prompt=True, tokenize=False)
            else:
                text = self.processor.image_token * self.frames + instruction
            self._prompts[instruction] = text
        return text

    def run_processor(self, frames: np.ndarray, instructions: list[str]) -> dict[str, torch.Tensor]:
        """The processor on uint8 frames [B, F, H, W, 3]: the reference inputs."""
        return dict(self.processor(text=[self.prompt(t) for t in instructions], images=[list(f) for f in frames],
                                   padding=True, return_tensors="pt", input_data_format="channels_last",
                                   **self.image_kwargs))

    def text(self, instructions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Padded token ids and masks of the prompts (each distinct one tokenised once)."""
        rows = []
        for t in instructions:
            row = self._rows.get(t)
            if row is None:
                batch = self.run_processor(self._probe, [t])
                row = {k: batch[k][0] for k in ("input_ids", "attention_mask", "token_type_ids")
                       if k in batch and k in self.accepted}
                self._rows[t] = row
            rows.append(row)
        width = max(len(r["input_ids"]) for r in rows)
        out = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in rows[0]:
                continue
            padded = torch.full((len(rows), width), fill, dtype=rows[0][key].dtype)
            for i, r in enumerate(rows):
                n = len(r[key])
                if self.left_padding:
                    padded[i, width - n:] = r[key]
                else:
                    padded[i, :n] = r[key]
            out[key] = padded.to(device)
        return out

    def pixels(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """uint8 frames [B, F, H, W, 3] -> resized, rescaled, normalised pixel values on ``device``."""
        b, f, h, w, _ = images.shape
        x = images.to(device).reshape(b * f, h, w, 3).permute(0, 3, 1, 2).float()
        if (h, w) != self.target:
            extra = {} if self.mode == "nearest" else {
                "align_corners": False, "antialias": h > self.target[0] or w > self.target[1]}
            x = F.interpolate(x, size=self.target, mode=self.mode, **extra).clamp(0, 255).round()
        x = ((x * self.scale - self.mean.to(device)) / self.std.to(device)).to(dtype)
        out = {"pixel_values": x.view(b, f, *x.shape[1:]) if self.pixel_dims == 5 else x}
        if self.mask_dtype is not None and "pixel_attention_mask" in self.accepted:
            out["pixel_attention_mask"] = torch.ones(b, f, *self.target, dtype=self.mask_dtype, device=device)
        return out

    def __call__(self, images: torch.Tensor, instructions: list[str], device: torch.device, dtype: torch.dtype,
                 fast: bool | None = None) -> dict[str, torch.Tensor]:
        """Inputs for the VLM's forward, on ``device`` (floating ones in ``dtype``)."""
        if self.fast if fast is None else fast:
            return {**self.text(instructions, device), **self.pixels(images, device, dtype)}
        batch = self.run_processor(images.detach().cpu().numpy(), instructions)
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                for k, v in batch.items() if k in self.accepted}


class HFVisionLanguageTrunk(nn.Module):
    """Frames + instruction + proprioception -> one feature vector, through a Hugging Face VLM.

    See the module docstring. ``out_dim`` is ``hidden``; the action and steps-to-go heads of
    :class:`~selfimprove.model.policy.EmbodiedModel` attach to it as to any trunk.
    """

    def __init__(self, image_key: str, image_shape: tuple[int, int], vector_keys: list[str], vector_dim: int,
                 frames: int, source: str, hidden: int, layers: int, dtype: str = "auto", device: str = "auto",
                 train: str = "all", batch_size: int = 64, hf_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not source:
            raise ConfigError("model.encoder = 'hf' needs model.hf_model: a local folder written by save_pretrained "
                              "or a hub id such as HuggingFaceTB/SmolVLM-256M-Instruct")
        if train not in HF_TRAIN:
            raise ConfigError(f"model.hf_train must be one of {HF_TRAIN}, got {train!r}")
        if batch_size < 1:
            raise ConfigError(f"model.hf_batch_size must be >= 1, got {batch_size}")
        self.image_key, self.vector_keys, self.frames = image_key, vector_keys, frames
        self.source, self.train_mode, self.batch_size = source, train, batch_size
        run_device = resolve_device(device)
        run_dtype = resolve_dtype(dtype, run_device)
        # The processor holds no weights: a plain attribute, never in state_dict or checkpoints.
        self.processor = load_processor(source)
        if hf_config is None:
            vlm = load_pretrained(source, run_dtype)
            log.info("loaded %s (%s, %.1fM parameters) on %s in %s", source, type(vlm).__name__,
                     sum(p.numel() for p in vlm.parameters()) / 1e6, run_device, run_dtype)
        else:
            vlm = build_from_config(hf_config, run_dtype, run_device)
        # the dtype was set at load (a blanket .to(dtype) would also cast buffers kept in float32 on purpose)
        self.vlm = vlm.to(run_device)
        self.hf_config = config_to_dict(self.vlm.config)
        text_config = self.vlm.config.get_text_config()
        width = 2 * int(text_config.hidden_size)
        accepted = set(inspect.signature(self.vlm.forward).parameters)
        self.inputs = VLMInputs(self.processor, frames, image_shape, accepted)
        self._freeze(train)

        self.register_buffer("obs_mean", torch.zeros(vector_dim))
        self.register_buffer("obs_std", torch.ones(vector_dim))
        self.pool_norm = nn.LayerNorm(width)
        mlp: list[nn.Module] = []
        width += vector_dim
        for _ in range(max(1, layers)):
            mlp += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]
            width = hidden
        self.mlp = nn.Sequential(*mlp)
        self.out_dim = width

    def _freeze(self, train: str) -> None:
        if train == "heads":
            self.vlm.requires_grad_(False)
        elif train == "language":
            vision = [m for name, m in self.vlm.named_children() if "vision" in name]
            if not vision:
                children = [n for n, _ in self.vlm.named_children()]
                raise ConfigError(f"model.hf_train = 'language' freezes the vision tower, but "
                                  f"{type(self.vlm).__name__} has no child module named '*vision*' ({children}); "
                                  "use 'all' or 'heads'")
            for module in vision:
                module.requires_grad_(False)

    def train(self, mode: bool = True) -> HFVisionLanguageTrunk:
        """Like ``nn.Module.train``, but a frozen VLM stays in eval mode."""
        super().train(mode)
        if self.train_mode == "heads":
            self.vlm.eval()
        return self

    def set_normalization(self, mean, std) -> None:
        self.obs_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def flatten(self, obs: dict) -> torch.Tensor:
        if not self.vector_keys:
            n = len(obs["instruction"]) if "instruction" in obs else obs[self.image_key].shape[0]
            return torch.zeros(n, 0)
        return torch.cat([obs[k].reshape(obs[k].shape[0], -1).float() for k in self.vector_keys], dim=-1)

    def encode(self, images: torch.Tensor, instructions: list[str], fast: bool | None = None) -> torch.Tensor:
        """uint8 frames [B, F, H, W, 3] + instructions -> pooled VLM features [B, 2 * text hidden], float32."""
        inputs = self.inputs(images, instructions, self.vlm.device, self.vlm.dtype, fast=fast)
        with torch.no_grad() if self.train_mode == "heads" else contextlib.nullcontext():
            out = self.vlm(**inputs, use_cache=False)
            return pool_hidden_states(out.last_hidden_state, inputs["attention_mask"])

    def forward(self, obs: dict) -> torch.Tensor:
        images = obs[self.image_key]
        if images.dim() == 4:
            images = images.unsqueeze(1)
        if images.shape[1] != self.frames:
            raise ValueError(f"the trunk was built for {self.frames} frame(s), got {images.shape[1]}")
        instructions = list(obs["instruction"])
        home = self.obs_mean.device
        parts = [self.encode(images[i:i + self.batch_size], instructions[i:i + self.batch_size])
                 for i in range(0, len(instructions), self.batch_size)]
        pooled = torch.cat(parts).to(home, torch.float32)
        vector = (self.flatten(obs).to(home) - self.obs_mean) / self.obs_std
        return self.mlp(torch.cat([self.pool_norm(pooled), vector], dim=-1))


def hf_trunk(spec) -> HFVisionLanguageTrunk:
    """Build the trunk for a :class:`~selfimprove.model.policy.ModelSpec` and record the VLM config in it.

    A spec that already holds ``extra["hf_config"]`` (one read from a checkpoint, or a live model's)
    builds the VLM from that config; its weights come from the checkpoint. A fresh spec loads the
    pretrained weights from ``spec.hf_model``.
    """
    if len(spec.image_keys) != 1:
        raise ConfigError(f"the hf encoder needs exactly one image observation, got {spec.image_keys}")
    vector_dim = sum(int(np.prod(spec.obs_shapes[k])) for k in spec.vector_keys)
    if "hf_config" not in spec.extra and spec.hf_model and Path(spec.hf_model).expanduser().is_dir():
        # a fresh model from a local folder: checkpoints record where it is, wherever they are loaded from
        spec.hf_model = str(Path(spec.hf_model).expanduser().resolve())
    image_key = spec.image_keys[0]
    height, width = spec.obs_shapes[image_key][:2]
    trunk = HFVisionLanguageTrunk(image_key, (height, width), spec.vector_keys, vector_dim, spec.frames, spec.hf_model,
                                  spec.hidden, spec.layers, dtype=spec.hf_dtype, device=spec.hf_device,
                                  train=spec.hf_train, batch_size=spec.hf_batch_size,
                                  hf_config=spec.extra.get("hf_config"))
    spec.extra["hf_config"] = trunk.hf_config
    return trunk
