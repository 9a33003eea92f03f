"""Datasets as Lightning data modules.

- :class:`SyntheticDataModule`: generated fundus scenes with known causal factors (no files);
- :class:`RetinaDataModule`: RetinaMNIST (MedMNIST ``.npz``), downloaded when missing;
- :class:`FolderDataModule`: any ``<class>/<image>`` folder tree.

All samples are dicts with ``"image"`` (float32 ``[3, R, R]`` in ``[-1, 1]``) and ``"label"``
(int64 scalar); see :mod:`stylex.data.base` for the shared contract.
"""

from stylex.data.base import ArrayImageDataset, ImageDataModule
from stylex.data.folder import FolderDataModule, LazyImageDataset
from stylex.data.retina import RetinaDataModule
from stylex.data.synthetic import (
    CAUSAL_FACTORS,
    FACTOR_NAMES,
    NUISANCE_FACTORS,
    SEGMENT_NAMES,
    SyntheticDataModule,
    label_from_counts,
    render_scene,
    sample_factors,
)

__all__ = [
    "ArrayImageDataset",
    "CAUSAL_FACTORS",
    "FACTOR_NAMES",
    "FolderDataModule",
    "ImageDataModule",
    "LazyImageDataset",
    "NUISANCE_FACTORS",
    "RetinaDataModule",
    "SEGMENT_NAMES",
    "SyntheticDataModule",
    "label_from_counts",
    "render_scene",
    "sample_factors",
]
