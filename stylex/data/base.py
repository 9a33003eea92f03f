"""The data-module contract shared by every dataset of the project.

Every dataset is an :class:`ImageDataModule`. After :meth:`~ImageDataModule.setup` it holds
three torch ``Dataset`` objects (``train_dataset``, ``val_dataset``, ``test_dataset``) whose
samples are dicts:

- ``"image"``: float32 ``[3, R, R]`` in ``[-1, 1]`` (``R`` = the model resolution);
- ``"label"``: int64 scalar, the class index in ``[0, num_classes)``;
- dataset-specific extras (the synthetic scenes add ``"mask"`` and ``"factors"``).

Images are kept in memory as uint8 ``[N, 3, R, R]`` (4x smaller than float) and converted to
float per sample, so a 32x32 dataset of a few thousand images costs a few tens of MB.

Training batches are always full (``drop_last=True``): the discriminator's minibatch standard
deviation layer groups samples and needs a constant batch size. Distributed training is left to
Lightning, which wraps whatever sampler is returned here; nothing below depends on the rank
except progress bars and warnings, which only rank zero shows.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def to_signed_unit(
    images: torch.Tensor,  # uint8 [..., 3, R, R] in [0, 255]
) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]`` (0 -> -1, 255 -> +1)."""
    return images.to(torch.float32) / 127.5 - 1.0


def show_progress() -> bool:
    """Progress bars only on the first process, so DDP logs are not printed once per rank."""
    return rank_zero_only.rank == 0


class ArrayImageDataset(Dataset):
    """A dataset over images already decoded into memory.

    ``images`` is uint8 ``[N, 3, R, R]``; ``labels`` int64 ``[N]``. ``extras`` maps a key to a
    tensor with leading dimension ``N`` that is returned per sample as ``extras[key][i]``
    (uint8 masks are widened to int64 on the fly to save memory). Keys listed in
    ``spatial_keys`` are flipped together with the image when ``hflip`` is on, so a
    segmentation mask stays aligned with its image.
    """

    def __init__(
        self,
        images: torch.Tensor,  # uint8 [N, 3, R, R]
        labels: torch.Tensor,  # int64 [N]
        extras: dict[str, torch.Tensor] | None = None,  # each [N, ...]
        hflip: bool = False,  # random horizontal flip with probability 1/2
        spatial_keys: Sequence[str] = (),  # extras whose last axis is image width
    ):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 [N, 3, R, R], got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be square, got {tuple(images.shape[2:])}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be [N={images.shape[0]}], got {tuple(labels.shape)}"
            )
        extras = dict(extras or {})
        for key, value in extras.items():
            if value.shape[0] != images.shape[0]:
                raise ValueError(
                    f"extra {key!r} has {value.shape[0]} rows, expected {images.shape[0]}"
                )
        unknown = set(spatial_keys) - set(extras)
        if unknown:
            raise ValueError(f"spatial_keys {sorted(unknown)} are not among the extras")
        self.images = images.contiguous()
        self.labels = labels
        self.extras = extras
        self.hflip = bool(hflip)
        self.spatial_keys = tuple(spatial_keys)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        extras = {key: value[index] for key, value in self.extras.items()}
        # torch's global generator is seeded per worker by the DataLoader, so flips differ
        # between workers and epochs yet are reproducible under a fixed seed.
        if self.hflip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
            for key in self.spatial_keys:
                extras[key] = extras[key].flip(-1)
        sample = {"image": to_signed_unit(image), "label": self.labels[index]}
        for key, value in extras.items():
            sample[key] = value.to(torch.int64) if value.dtype == torch.uint8 else value
        return sample


class ImageDataModule(pl.LightningDataModule):
    """Base of the dataset modules: argument checks, data loaders and the class metadata.

    Subclasses implement :meth:`_build` (return the three datasets; it runs once, in
    :meth:`setup`, on every process, and must be deterministic so that all ranks see the same
    split) and set ``self._class_names`` as early as they cheaply can.

    Args:
        resolution: side of the square images fed to the model, in pixels; a power of two.
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: seeds every random split and the balanced sampler.
        hflip: random horizontal flips of the training split only.
        balanced: draw training samples with probability inversely proportional to their
            class frequency (with replacement), so every class is seen equally often.
    """

    def __init__(
        self,
        resolution: int = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        hflip: bool = False,
        balanced: bool = False,
    ):
        super().__init__()
        if not is_power_of_two(resolution) or resolution < 4:
            raise ValueError(
                f"dataset resolution must be a power of two >= 4 (e.g. 32, 64, 128), got "
                f"{resolution!r}; set model.resolution accordingly"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.hflip = bool(hflip)
        self.balanced = bool(balanced)
        self._class_names: list[str] | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self._train_labels: torch.Tensor | None = None

    # ----------------------------------------------------------------- metadata
    def _discover_class_names(self) -> list[str] | None:
        """Class names before :meth:`setup`, where they are cheap to find; None otherwise."""
        return None

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = self._discover_class_names()
        if self._class_names is None:
            raise RuntimeError(
                f"{type(self).__name__}.class_names is only known after setup(); call "
                "datamodule.setup() first"
            )
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -------------------------------------------------------------------- setup
    def _build(self) -> tuple[Dataset, Dataset, Dataset, torch.Tensor]:
        """Return ``(train, val, test, train_labels)``; ``train_labels`` is int64 ``[N_train]``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        # All splits are built at once: they are small, and Lightning calls setup() again for
        # the test stage, which must then see the exact same data.
        if self.train_dataset is not None:
            return
        train, val, test, train_labels = self._build()
        train_labels = torch.as_tensor(train_labels, dtype=torch.int64)
        if train_labels.shape != (len(train),):
            raise RuntimeError(
                f"{type(self).__name__}: {len(train)} training samples but "
                f"{tuple(train_labels.shape)} labels"
            )
        if len(train) == 0:
            raise ValueError(f"{type(self).__name__}: the training split is empty")
        n = self.num_classes
        if int(train_labels.min()) < 0 or int(train_labels.max()) >= n:
            raise ValueError(
                f"{type(self).__name__}: training labels span "
                f"[{int(train_labels.min())}, {int(train_labels.max())}] but there are {n} "
                "classes"
            )
        self.train_dataset, self.val_dataset, self.test_dataset = train, val, test
        self._train_labels = train_labels

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no data yet: call setup() before asking for data "
                "loaders or labels"
            )

    def train_labels(self) -> torch.Tensor:
        """int64 ``[N_train]``: every training label, in dataset order (for class weights)."""
        self._require_setup()
        assert self._train_labels is not None
        return self._train_labels.clone()

    def class_counts(self) -> torch.Tensor:
        """int64 ``[num_classes]``: training samples per class."""
        return torch.bincount(self.train_labels(), minlength=self.num_classes)

    # -------------------------------------------------------------- dataloaders
    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }

    def _balanced_sampler(self) -> WeightedRandomSampler:
        counts = self.class_counts().to(torch.float64)
        labels = self.train_labels()
        weights = 1.0 / counts[labels]
        # A private generator keeps the draw identical on every rank (Lightning splits the
        # drawn indices across ranks) and independent of the model's random consumption.
        generator = torch.Generator().manual_seed(self.seed)
        return WeightedRandomSampler(
            weights, num_samples=len(labels), replacement=True, generator=generator
        )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        n = len(self.train_dataset)
        if n < self.batch_size:
            raise ValueError(
                f"{type(self).__name__}: the training split has {n} samples, fewer than "
                f"batch_size={self.batch_size}; with drop_last no batch would be produced. "
                "Lower the batch size or add data."
            )
        kwargs = self._loader_kwargs()
        if self.balanced:
            return DataLoader(
                self.train_dataset, sampler=self._balanced_sampler(), drop_last=True, **kwargs
            )
        return DataLoader(self.train_dataset, shuffle=True, drop_last=True, **kwargs)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return DataLoader(self.val_dataset, shuffle=False, drop_last=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return DataLoader(
            self.test_dataset, shuffle=False, drop_last=False, **self._loader_kwargs()
        )

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def spread_indices(
    total: int,  # size of the data set
    count: int,  # how many to take
) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when count >= total)."""
    if count >= total:
        return list(range(total))
    return torch.linspace(0, total - 1, count).round().long().unique().tolist()
