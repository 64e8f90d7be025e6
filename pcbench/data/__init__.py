"""Datasets over prepared folders, transforms and collation into packed PointBatch objects."""

from .collate import collate
from .dataset import PreparedDataset, seed_worker
from .modelnet import ModelNetDataset
from .scannet import ScanNetDataset
from .scanobjectnn import ScanObjectNNDataset

__all__ = ["ModelNetDataset", "PreparedDataset", "ScanNetDataset", "ScanObjectNNDataset", "collate", "seed_worker"]
