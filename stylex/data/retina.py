"""RetinaMNIST (MedMNIST v2) fundus photographs graded for diabetic retinopathy.

The data is one ``.npz`` file in the MedMNIST layout: ``{train,val,test}_images`` uint8
``[N, S, S, 3]`` (or ``[N, S, S]`` grey) and ``{train,val,test}_labels`` ``[N, 1]``, with ``S``
= 28 for ``retinamnist.npz`` and ``S`` = 64, 128 or 224 for ``retinamnist_{S}.npz``.

Classes: the five DR grades 0-4, or with ``binary=True`` "no DR" (grade 0) against "DR"
(grades 1-4).

Resizing to the model resolution ``R`` (``resize_mode``):

- ``"pad"`` (default): pad the ``S x S`` image with black to the smallest power of two
  ``P >= S`` (28 -> 32 pads 2 px on each side, keeping every original pixel), then resize
  ``P -> R`` if ``P != R``. The black border matches the black surround of a fundus photo.
- ``"resize"``: resize ``S -> R`` directly (antialiased bilinear).

When the file is missing and ``download=True``, :meth:`RetinaDataModule.prepare_data` fetches
it from the MedMNIST v2 Zenodo record into a temporary file, checks it (MD5 for the 28 px
file, loadable keys for the others) and renames it into place, so an interrupted download
never leaves a partial file behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import numpy as np
import torch
import torch.nn.functional as F

from stylex.data.base import ArrayImageDataset, ImageDataModule

ZENODO_RECORD = "https://zenodo.org/records/10519652/files"
KNOWN_MD5 = {28: "bd4c0672f1bba3e3a89f0e4e876791e4"}
SPLITS = ("train", "val", "test")
GRADE_NAMES = [
    "grade 0 (no DR)",
    "grade 1 (mild NPDR)",
    "grade 2 (moderate NPDR)",
    "grade 3 (severe NPDR)",
    "grade 4 (proliferative DR)",
]
BINARY_NAMES = ["no DR", "DR"]
DOWNLOAD_TIMEOUT_S = 15.0


def file_name(size: int) -> str:
    return "retinamnist.npz" if size == 28 else f"retinamnist_{size}.npz"


def download_url(size: int) -> str:
    return f"{ZENODO_RECORD}/{file_name(size)}?download=1"


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Read and check a MedMNIST ``.npz``: all six arrays, with matching lengths.

    Raises ``ValueError`` naming the file when it cannot be read or lacks keys.
    """
    required = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
    unreadable = (
        f"could not read {path} as an .npz archive; the file is probably truncated or "
        "corrupt: delete it and download it again"
    )
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{unreadable} ({type(err).__name__}: {err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive with {required}")
    with archive:
        missing = [key for key in required if key not in archive.files]
        if missing:
            raise ValueError(
                f"{path} is not a MedMNIST file: missing keys {missing} (it has "
                f"{sorted(archive.files)}). Expected {required}."
            )
        try:
            arrays = {key: archive[key] for key in required}
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise ValueError(f"{unreadable} ({type(err).__name__}: {err})") from err
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise ValueError(
                f"{path}: {split}_images must be [N, S, S, 3] or [N, S, S], got {images.shape}"
            )
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"{path}: {split}_images must be square, got {images.shape}")
        if labels.reshape(len(labels), -1).shape[1] != 1 or len(labels) != len(images):
            raise ValueError(
                f"{path}: {split}_labels must be [N={len(images)}, 1] (one grade per image), "
                f"got {labels.shape}"
            )
    return arrays


def download_file(
    url: str,
    dest: Path,
    md5: str | None = None,  # expected hex digest; None checks that the npz loads instead
    timeout: float = DOWNLOAD_TIMEOUT_S,  # seconds without data before giving up
) -> None:
    """Fetch ``url`` into ``dest`` atomically (temporary file, check, rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        if md5 is not None:
            got = md5_of(tmp)
            if got != md5:
                raise OSError(f"the downloaded file has MD5 {got}, expected {md5}")
        else:
            load_npz(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fit_to_resolution(
    images: np.ndarray,  # uint8 [N, S, S, 3]
    resolution: int,  # R, a power of two
    mode: str,  # "pad" or "resize"
) -> torch.Tensor:
    """uint8 ``[N, 3, R, R]`` (see the module docstring for the two modes)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    size = x.shape[-1]
    if mode == "pad":
        target = 1 << (size - 1).bit_length()  # smallest power of two >= size
        before = (target - size) // 2
        after = target - size - before
        x = F.pad(x, (before, after, before, after), value=0)
    elif mode != "resize":
        raise ValueError(f"resize_mode must be 'pad' or 'resize', got {mode!r}")
    if x.shape[-1] != resolution:
        # antialias only matters when shrinking; it is ignored when enlarging
        y = F.interpolate(x.float(), size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=True)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    return x.contiguous()


class RetinaDataModule(ImageDataModule):
    """RetinaMNIST as a data module (see the module docstring).

    Args:
        root: folder holding ``retinamnist[_{size}].npz``, or the ``.npz`` file itself.
        size: side of the stored images (28, 64, 128 or 224); picks the file name.
        binary: two classes (no DR / DR) instead of the five grades.
        resize_mode: ``"pad"`` or ``"resize"``.
        download: fetch the file from Zenodo when it is missing.
        (the remaining arguments are those of :class:`ImageDataModule`)
    """

    def __init__(
        self,
        root: str = "data",
        size: int = 28,
        binary: bool = False,
        resize_mode: str = "pad",
        download: bool = True,
        resolution: int = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        hflip: bool = False,
        balanced: bool = False,
    ):
        super().__init__(
            resolution=resolution, batch_size=batch_size, num_workers=num_workers,
            seed=seed, hflip=hflip, balanced=balanced,
        )
        self.save_hyperparameters(logger=False)  # the run logs its whole config once (training.run)
        if resize_mode not in ("pad", "resize"):
            raise ValueError(
                f"dataset.resize_mode must be 'pad' or 'resize', got {resize_mode!r}"
            )
        root_path = Path(os.path.expanduser(str(root)))
        self.path = root_path if root_path.suffix == ".npz" else root_path / file_name(int(size))
        self.url = download_url(int(size))
        self.size = int(size)
        self.binary = bool(binary)
        self.resize_mode = resize_mode
        self.download = bool(download)
        self._class_names = list(BINARY_NAMES if self.binary else GRADE_NAMES)

    def _missing_file_error(self, reason: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"RetinaMNIST file not found at {self.path} ({reason}). Download {self.url} and "
            f"save it as {self.path}, or point dataset.root= at the folder (or .npz file) "
            "that holds it."
        )

    def prepare_data(self) -> None:
        """Download the file if it is missing (Lightning runs this on one process only)."""
        if self.path.is_file():
            return
        if not self.download:
            raise self._missing_file_error("dataset.download=false")
        try:
            download_file(self.url, self.path, md5=KNOWN_MD5.get(self.size))
        except Exception as err:  # offline, HTTP error, bad checksum, unwritable folder
            raise self._missing_file_error(
                f"the download failed: {type(err).__name__}: {err}"
            ) from err

    def _labels(self, raw: np.ndarray, split: str) -> torch.Tensor:
        grades = raw.reshape(-1).astype(np.int64)
        bad = (grades < 0) | (grades >= len(GRADE_NAMES))
        if bad.any():
            values = sorted(set(grades[bad].tolist()))[:10]
            raise ValueError(
                f"{self.path}: {split}_labels holds values {values} outside the DR grades "
                f"0..{len(GRADE_NAMES) - 1}; is this really a RetinaMNIST file?"
            )
        if self.binary:
            grades = (grades > 0).astype(np.int64)
        return torch.from_numpy(grades)

    def _build(self) -> tuple[Any, Any, Any, torch.Tensor]:
        self.prepare_data()  # a no-op when the file is there (e.g. after rank zero fetched it)
        arrays = load_npz(self.path)
        datasets = []
        for split in SPLITS:
            images = arrays[f"{split}_images"]
            if images.ndim == 3:
                images = images[..., None]
            if images.shape[-1] == 1:
                images = np.repeat(images, 3, axis=-1)
            if images.dtype != np.uint8:
                raise ValueError(f"{self.path}: {split}_images must be uint8, got {images.dtype}")
            labels = self._labels(arrays[f"{split}_labels"], split)
            datasets.append(ArrayImageDataset(
                fit_to_resolution(images, self.resolution, self.resize_mode),
                labels,
                hflip=self.hflip and split == "train",
            ))
        train, val, test = datasets
        return train, val, test, train.labels
