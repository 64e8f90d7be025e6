"""Layers shared by the point models: per-point MLPs, packed-batch normalisation and pooling helpers."""

from .mlp import MLP, canonical_order, cloud_max, cloud_mean, linear_bn_act
from .norm import BatchNormReLUMax, PointBatchNorm

__all__ = [
    "MLP",
    "BatchNormReLUMax",
    "PointBatchNorm",
    "canonical_order",
    "cloud_max",
    "cloud_mean",
    "linear_bn_act",
]
