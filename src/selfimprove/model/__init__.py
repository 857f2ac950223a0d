"""The embodied foundation model: tokens, backbones, the two-headed policy, checkpoints."""

from selfimprove.model.checkpoint import load_checkpoint, save_checkpoint
from selfimprove.model.policy import EmbodiedModel, ModelSpec
from selfimprove.model.tokens import ActionTokenizer

__all__ = ["ActionTokenizer", "EmbodiedModel", "ModelSpec", "load_checkpoint", "save_checkpoint"]
