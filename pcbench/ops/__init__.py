"""The CUDA-free neighbour core: exact, vectorised torch ops on packed point batches.

Every op takes packed points ``[N, 3]`` with cumulative end ``offset [B]`` (``None`` = one cloud) and
uses ``-1`` for a missing neighbour. Squared distances are called ``dist2``.
"""

from ._dispatch import dispatch_as
from .ball_query import ball_query
from .batch import (
    PointBatch,
    batch2offset,
    lengths2offset,
    offset2batch,
    offset2lengths,
    offset2start,
)
from .fps import farthest_point_sample, sample_offset
from .grouping import group, group_relative
from .interpolate import interpolate
from .knn import knn
from .serialize import serialize
from .sparse import kernel_map, kernel_maps
from .voxel import voxel_levels, voxel_pool, voxelize

__all__ = [
    "PointBatch",
    "ball_query",
    "batch2offset",
    "dispatch_as",
    "farthest_point_sample",
    "group",
    "group_relative",
    "interpolate",
    "kernel_map",
    "kernel_maps",
    "knn",
    "lengths2offset",
    "offset2batch",
    "offset2lengths",
    "offset2start",
    "sample_offset",
    "serialize",
    "voxel_levels",
    "voxel_pool",
    "voxelize",
]
