"""Image classification data stored as one sub-folder per class.

Two layouts are recognised under ``root``:

- split folders: ``root/train/<class>/...`` plus ``root/{validation,val,valid}/<class>/...``
  and/or ``root/test/<class>/...``. Class names are the sorted sub-folders of ``train``. A
  class may be absent from the validation or test folder; a class that exists *only* there is
  an error. A missing validation (or test) folder is carved out of ``train`` as below.
- plain class folders: ``root/<class>/...``. The files of every class are shuffled with a
  seeded generator and ``val_fraction`` / ``test_fraction`` of them go to validation / test
  (stratified: each class contributes in proportion to its size, and keeps at least one
  training image). The split depends only on the file list and ``seed``, so every process
  of a distributed run computes the same one.

Image files are found recursively inside each class folder (hidden files and folders are
ignored) by extension, case-insensitively. Each image is converted to RGB (grey, palette and
CMYK directly; transparent images are composited on black), then the central square is cut
out and resized to the model resolution with an antialiasing bicubic filter (equivalently:
the shorter side is scaled to the resolution and the longer one center-cropped).

Decoded images are cached in memory as uint8 when the training split would take less than
``CACHE_LIMIT_BYTES`` (or as ``cache`` says); otherwise each image is decoded when it is
read. Unreadable files are skipped and reported in a single warning.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from stylex.data.base import ArrayImageDataset, ImageDataModule, show_progress, to_signed_unit

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp")
VAL_FOLDER_NAMES = ("validation", "val", "valid")
CACHE_LIMIT_BYTES = 2 << 30  # decoded training images kept in memory below this size
REPORTED_PATHS = 5  # how many skipped files a warning lists


# ------------------------------------------------------------------------ decoding
def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on black."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)  # "over" black: colour x alpha
        return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")
    if image.mode.startswith("I;16"):  # 16-bit grey: keep the high byte
        grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("I", "F"):  # 32-bit grey, assumed to hold 8-bit values
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def load_image(
    path: Path,  # any format PIL reads
    resolution: int,  # output side R in pixels
) -> np.ndarray:
    """Decode one file to uint8 ``[R, R, 3]`` (RGB, central square, antialiased resize)."""
    with Image.open(path) as image:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale directly; draft keeps both sides >= R.
        image.draft("RGB", (resolution, resolution))
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop before resizing: resizing with a box would let the filter reach the cut-off sides.
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    out = np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on PIL's read-only buffer
    assert out.shape == (resolution, resolution, 3), (path, out.shape)
    return out


def _try_load(path: Path, resolution: int) -> np.ndarray | None:
    try:
        return load_image(path, resolution)
    except Exception:  # corrupt files raise many kinds of error; all mean "unreadable"
        return None


def decode_all(
    paths: Sequence[Path],
    resolution: int,
    desc: str = "decoding images",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode files in parallel threads (PIL releases the GIL while decoding).

    Returns ``(images uint8 [N_ok, R, R, 3], ok bool [N])``, images in input order.
    """
    threads = max(1, min(8, os.cpu_count() or 1))
    images: list[np.ndarray] = []
    ok = np.zeros(len(paths), dtype=bool)
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(lambda p: _try_load(p, resolution), paths)
        bar = tqdm(results, total=len(paths), desc=desc, unit="img", disable=not progress,
                   delay=1.0, leave=False)
        for i, image in enumerate(bar):
            if image is not None:
                images.append(image)
                ok[i] = True
    stacked = np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8)
    return stacked, ok


def describe_skipped(paths: Sequence[Path], root: Path) -> str:
    shown = ", ".join(f"'{p}'" for p in paths[:REPORTED_PATHS])
    more = f" and {len(paths) - REPORTED_PATHS} more" if len(paths) > REPORTED_PATHS else ""
    return (
        f"skipped {len(paths)} unreadable image file(s) under {root}: {shown}{more}. "
        "Delete or fix them to silence this warning."
    )


# ------------------------------------------------------------------------ scanning
def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(
    folder: Path,
    extensions: Sequence[str],  # lower-case, without the dot
) -> list[Path]:
    """Image files below ``folder`` (recursively), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in extensions:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def find_split_folders(root: Path) -> dict[str, Path | None] | None:
    """``{"train", "val", "test"} -> folder or None`` for the split layout, else None."""
    train = root / "train"
    if not train.is_dir():
        return None
    val = next((root / n for n in VAL_FOLDER_NAMES if (root / n).is_dir()), None)
    test = root / "test" if (root / "test").is_dir() else None
    if val is None and test is None:
        return None
    return {"train": train, "val": val, "test": test}


def class_folders(
    folder: Path,  # holds one sub-folder per class
    option_hint: str = "dataset.root",
) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; set {option_hint}= to a folder with one "
            "sub-folder per class"
        )
    classes = _visible_dirs(folder)
    if not classes:
        raise ValueError(
            f"{folder} has no class sub-folders; expected {folder}/<class name>/<images> "
            f"(or train/ and validation/ folders with class sub-folders inside); set "
            f"{option_hint}= accordingly"
        )
    return classes


def scan_split(
    folder: Path,  # e.g. root/train, holding class folders
    class_names: list[str],
    extensions: Sequence[str],
    require_all: bool,  # every class folder must exist and hold images (the training split)
) -> tuple[list[Path], list[int]]:
    """Files and labels of one split folder (or of ``root`` in the plain layout)."""
    known = {name: i for i, name in enumerate(class_names)}
    paths: list[Path] = []
    labels: list[int] = []
    for sub in _visible_dirs(folder):
        if sub.name not in known:
            raise ValueError(
                f"class folder {sub} has no counterpart in the training folder (classes: "
                f"{class_names}); rename or remove it"
            )
        files = list_images(sub, extensions)
        if not files and require_all:
            raise ValueError(
                f"class folder {sub} holds no image files (extensions: "
                f"{', '.join(extensions)}); add images or remove the folder"
            )
        paths += files
        labels += [known[sub.name]] * len(files)
    return paths, labels


def _quota(
    counts: np.ndarray,  # [C] samples per class
    fraction: float,
    cap: np.ndarray,  # [C] the most each class may give
) -> np.ndarray:
    """Per-class sample counts summing to ``round(fraction * N)``, proportional to ``counts``
    (largest remainders get the leftovers), never above ``cap``."""
    exact = counts * fraction
    take = np.minimum(np.floor(exact).astype(np.int64), cap)
    left = int(round(float(counts.sum()) * fraction)) - int(take.sum())
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    for c in order:
        if left <= 0:
            break
        if take[c] < cap[c]:
            take[c] += 1
            left -= 1
    return take


def stratified_split(
    labels: np.ndarray,  # int [N]
    fractions: Sequence[float],  # one per held-out split, e.g. (val_fraction, test_fraction)
    seed: int,
    num_classes: int,
) -> list[np.ndarray]:
    """Index arrays ``[train, held_out_1, ...]``, each sorted.

    Every class keeps at least one training image; the rest is shuffled per class with a
    generator seeded by ``(seed, class)`` and cut into the held-out quotas.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    room = np.maximum(counts - 1, 0)
    quotas = []
    for fraction in fractions:
        q = _quota(counts, fraction, room)
        room = room - q
        quotas.append(q)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        members = members[np.random.default_rng([seed, c]).permutation(len(members))]
        start = 0
        for k, q in enumerate(quotas):
            parts[k + 1].append(members[start:start + q[c]])
            start += q[c]
        parts[0].append(members[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


# ------------------------------------------------------------------------ lazy dataset
class LazyImageDataset(Dataset):
    """Decodes each image when it is read; for trees too large to keep in memory.

    A file that cannot be decoded is replaced by the next readable sample (image and label
    together) and remembered; the first such failure in a process triggers one warning.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        resolution: int,
        hflip: bool = False,
        root: Path | None = None,  # only for the warning text
    ):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.resolution = int(resolution)
        self.hflip = bool(hflip)
        self.root = root
        self.failed: set[int] = set()
        self._warned = False

    def __len__(self) -> int:
        return len(self.paths)

    def _note_failure(self, index: int) -> None:
        self.failed.add(index)
        if not self._warned:  # once per process: each DataLoader worker has its own copy
            self._warned = True
            rank_zero_warn(
                describe_skipped([self.paths[index]], self.root or self.paths[index].parent)
                + " Unreadable files are replaced by other samples; further failures are "
                "not reported."
            )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.paths)
        for step in range(n):
            i = (index + step) % n
            if i in self.failed:
                continue
            array = _try_load(self.paths[i], self.resolution)
            if array is None:
                self._note_failure(i)
                continue
            image = torch.from_numpy(array).permute(2, 0, 1)
            if self.hflip and bool(torch.rand(()) < 0.5):
                image = image.flip(-1)
            return {"image": to_signed_unit(image), "label": self.labels[i]}
        raise RuntimeError(
            f"none of the {n} image files of this split could be decoded (e.g. {self.paths[0]})"
        )


# ------------------------------------------------------------------------ data module
class FolderDataModule(ImageDataModule):
    """Class-folder image trees (see the module docstring for layouts and preprocessing).

    Args:
        root: the folder holding the class folders (or the train/validation/test folders).
        val_fraction: share of each class held out for validation when there is no
            validation folder.
        test_fraction: likewise for the test split.
        cache: keep decoded images in memory; None decides by size (< 2 GiB of training
            images at the model resolution).
        extensions: file extensions to read, case-insensitive, with or without the dot.
        (the remaining arguments are those of :class:`ImageDataModule`)
    """

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        cache: bool | None = None,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
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
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"dataset.{name} must lie in [0, 1), got {value!r}")
        if float(val_fraction) + float(test_fraction) >= 1.0:
            raise ValueError(
                f"dataset.val_fraction + dataset.test_fraction must be < 1 to leave training "
                f"images, got {val_fraction} + {test_fraction}"
            )
        exts = tuple(str(e).lower().lstrip(".") for e in extensions)
        if not exts or not all(exts):
            raise ValueError(f"dataset.extensions must list file extensions, got {extensions!r}")
        self.root = Path(os.path.expanduser(str(root)))
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.cache = cache
        self.extensions = exts
        self.skipped: list[Path] = []  # unreadable files found while caching

    def _layout(self) -> tuple[dict[str, Path | None] | None, Path]:
        """(split folders or None, the folder whose sub-folders are the classes)."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"dataset root {self.root} does not exist; set dataset.root= to a folder with "
                "one sub-folder of images per class"
            )
        splits = find_split_folders(self.root)
        return splits, (splits["train"] if splits else self.root)

    def _discover_class_names(self) -> list[str]:
        _, class_root = self._layout()
        return [p.name for p in class_folders(class_root)]

    def _scan(self) -> dict[str, tuple[list[Path], np.ndarray]]:
        """Files and labels of each split, before decoding."""
        splits, class_root = self._layout()
        names = [p.name for p in class_folders(class_root)]
        self._class_names = names
        paths, labels = scan_split(class_root, names, self.extensions, require_all=True)
        labels_np = np.asarray(labels, dtype=np.int64)
        out: dict[str, tuple[list[Path], np.ndarray]] = {}
        carve = []  # held-out splits taken from the training files
        for split, fraction in (("val", self.val_fraction), ("test", self.test_fraction)):
            folder = splits[split] if splits else None
            if folder is not None:
                p, l = scan_split(folder, names, self.extensions, require_all=False)
                out[split] = (p, np.asarray(l, dtype=np.int64))
            else:
                carve.append((split, fraction))
        parts = stratified_split(labels_np, [f for _, f in carve], self.seed, len(names))
        out["train"] = ([paths[i] for i in parts[0]], labels_np[parts[0]])
        for (split, _), idx in zip(carve, parts[1:]):
            out[split] = ([paths[i] for i in idx], labels_np[idx])
        return out

    def _use_cache(self, num_train: int) -> bool:
        if self.cache is not None:
            return bool(self.cache)
        return num_train * 3 * self.resolution**2 < CACHE_LIMIT_BYTES

    def _build(self) -> tuple[Any, Any, Any, torch.Tensor]:
        scanned = self._scan()
        cache = self._use_cache(len(scanned["train"][0]))
        datasets: dict[str, Dataset] = {}
        skipped: list[Path] = []
        for split in ("train", "val", "test"):
            paths, labels = scanned[split]
            hflip = self.hflip and split == "train"
            if not cache:
                datasets[split] = LazyImageDataset(paths, labels, self.resolution, hflip, self.root)
                continue
            images, ok = decode_all(paths, self.resolution, f"decoding {split} images",
                                    progress=show_progress())
            skipped += [p for p, good in zip(paths, ok) if not good]
            scanned[split] = ([p for p, good in zip(paths, ok) if good], labels[ok])
            datasets[split] = ArrayImageDataset(
                torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                torch.from_numpy(labels[ok]),
                hflip=hflip,
            )
        self.skipped = skipped
        if skipped:
            rank_zero_warn(describe_skipped(skipped, self.root))
        train_labels = torch.from_numpy(scanned["train"][1])
        counts = torch.bincount(train_labels, minlength=len(self.class_names))
        empty = [self.class_names[c] for c in range(len(counts)) if counts[c] == 0]
        if empty:
            raise ValueError(
                f"no readable training image for class(es) {empty} under {self.root}; every "
                "class needs at least one"
            )
        self.paths = {split: scanned[split][0] for split in scanned}
        return datasets["train"], datasets["val"], datasets["test"], train_labels
