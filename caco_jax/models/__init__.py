"""Encoders (torchvision-layout ResNets), projection heads, and encoder export."""

from caco_jax.models.export import load_encoder, save_encoder
from caco_jax.models.heads import ProjectionHead, SubspaceHeads, l2_normalize
from caco_jax.models.resnet import BatchNorm, ResNet

__all__ = [
    "BatchNorm",
    "ProjectionHead",
    "ResNet",
    "SubspaceHeads",
    "l2_normalize",
    "load_encoder",
    "save_encoder",
]
