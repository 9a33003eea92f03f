"""Tests of the data modules: synthetic scenes, RetinaMNIST and class-folder trees."""

from __future__ import annotations

import io
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylex.data import (
    CAUSAL_FACTORS,
    FACTOR_NAMES,
    NUISANCE_FACTORS,
    SEGMENT_NAMES,
    FolderDataModule,
    RetinaDataModule,
    SyntheticDataModule,
    render_scene,
    sample_factors,
)
from stylex.data import retina as retina_module
from stylex.data.folder import load_image
from stylex.data.synthetic import generate_split

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RETINA_NPZ = SHARED_DATA / "retinamnist.npz"
POTATO = SHARED_DATA / "potato_leaves"

EXUDATE = SEGMENT_NAMES.index("exudate")
HAEMORRHAGE = SEGMENT_NAMES.index("haemorrhage")
COL = {name: i for i, name in enumerate(FACTOR_NAMES)}


def small_synthetic(**kwargs) -> SyntheticDataModule:
    args = dict(resolution=16, num_train=96, num_val=32, num_test=32, batch_size=16)
    args.update(kwargs)
    dm = SyntheticDataModule(**args)
    dm.setup()
    return dm


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


# ============================================================================ synthetic
def test_synthetic_same_seed_same_data_different_seed_different_data():
    a, b, c = small_synthetic(seed=5), small_synthetic(seed=5), small_synthetic(seed=6)
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        da, db = getattr(a, split), getattr(b, split)
        assert torch.equal(da.images, db.images)
        assert torch.equal(da.labels, db.labels)
        assert torch.equal(da.extras["mask"], db.extras["mask"])
        assert torch.equal(da.extras["factors"], db.extras["factors"])
    assert not torch.equal(a.train_dataset.images, c.train_dataset.images)
    assert not torch.equal(a.train_dataset.extras["factors"], c.train_dataset.extras["factors"])
    # The splits come from disjoint streams: no validation scene repeats a training one.
    train_f = a.train_dataset.extras["factors"].numpy()
    val_f = a.val_dataset.extras["factors"].numpy()
    seeds = COL["vessel_seed"]
    assert not set(train_f[:, seeds].tolist()) & set(val_f[:, seeds].tolist())


def test_synthetic_scene_depends_on_seed_and_index_only():
    short = generate_split(5, seed=3, split="train", resolution=16)
    long = generate_split(12, seed=3, split="train", resolution=16)
    np.testing.assert_array_equal(short["images"], long["images"][:5])
    np.testing.assert_array_equal(short["factors"], long["factors"][:5])


@pytest.mark.parametrize("num_classes", [2, 3])
def test_synthetic_label_is_the_documented_function_of_the_factors(num_classes):
    dm = small_synthetic(num_classes=num_classes, resolution=8, num_train=300)
    factors = dm.train_dataset.extras["factors"].numpy()
    e, h = factors[:, COL["exudates"]] > 0, factors[:, COL["haemorrhages"]] > 0
    expected = (e | h).astype(int) if num_classes == 2 else e.astype(int) + h.astype(int)
    np.testing.assert_array_equal(dm.train_labels().numpy(), expected)
    assert dm.num_classes == num_classes == len(dm.class_names)
    assert set(expected.tolist()) == set(range(num_classes))  # every class occurs


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_synthetic_mask_shows_lesions_exactly_when_their_factor_is_positive(resolution):
    data = generate_split(48, seed=1, split="val", resolution=resolution)
    masks, factors = data["masks"], data["factors"]
    has_ex = (masks == EXUDATE).reshape(len(masks), -1).any(1)
    has_he = (masks == HAEMORRHAGE).reshape(len(masks), -1).any(1)
    np.testing.assert_array_equal(has_ex, factors[:, COL["exudates"]] > 0)
    np.testing.assert_array_equal(has_he, factors[:, COL["haemorrhages"]] > 0)
    assert has_ex.any() and (~has_ex).any() and has_he.any()
    # The image corners lie outside the fundus: black background.
    images = data["images"]
    assert (masks[:, 0, 0] == 0).all() and (images[:, 0, 0] == 0).all()


def test_synthetic_nuisance_factors_do_not_depend_on_the_label():
    dm = small_synthetic(resolution=8, num_train=600, num_val=8, num_test=8)
    factors = dm.train_dataset.extras["factors"].numpy()
    labels = dm.train_labels().numpy()
    sick, healthy = factors[labels == 1], factors[labels == 0]
    assert len(sick) > 150 and len(healthy) > 150
    for name in NUISANCE_FACTORS:
        gap = ks_statistic(sick[:, COL[name]], healthy[:, COL[name]])
        # KS critical value at alpha = 0.001 for ~300 vs ~300 samples is about 0.16.
        assert gap < 0.16, f"{name} differs between labels (KS distance {gap:.3f})"
    # Each lesion kind is present with probability lesion_prob = 0.3 (binomial, n = 600).
    for name in CAUSAL_FACTORS:
        rate = (factors[:, COL[name]] > 0).mean()
        assert abs(rate - 0.3) < 0.07, f"{name} present in {rate:.2f} of scenes"
        counts = factors[factors[:, COL[name]] > 0, COL[name]]
        assert counts.min() >= 1 and counts.max() <= 4
    assert set(NUISANCE_FACTORS) | set(CAUSAL_FACTORS) == set(FACTOR_NAMES)


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_synthetic_samples_have_the_contract_shapes_and_ranges(resolution):
    dm = small_synthetic(resolution=resolution, num_train=32, num_val=8, num_test=8)
    sample = dm.train_dataset[3]
    assert sample["image"].dtype == torch.float32
    assert sample["image"].shape == (3, resolution, resolution)
    assert sample["label"].dtype == torch.int64 and sample["label"].shape == ()
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (resolution,) * 2
    assert sample["factors"].dtype == torch.float32
    assert sample["factors"].shape == (len(FACTOR_NAMES),)
    images = torch.stack([dm.train_dataset[i]["image"] for i in range(len(dm.train_dataset))])
    assert images.min() == -1.0 and images.max() <= 1.0  # black background maps to -1
    assert images.max() > 0.5  # bright optic disc
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, resolution, resolution)
    assert batch["mask"].shape == (16, resolution, resolution)


def test_render_scene_without_exudates_differs_only_on_exudate_pixels():
    rng = np.random.default_rng(11)
    factors = sample_factors(rng)
    factors.update(exudates=3, haemorrhages=2)
    with_ex, mask_with = render_scene(factors, 32)
    without, mask_without = render_scene({**factors, "exudates": 0}, 32)
    changed = np.abs(with_ex.astype(int) - without.astype(int)).max(-1) > 0
    exudate_pixels = mask_with == EXUDATE
    assert exudate_pixels.sum() >= 3  # three visible spots
    np.testing.assert_array_equal(changed, exudate_pixels)
    assert not (mask_without == EXUDATE).any()
    np.testing.assert_array_equal(mask_with == HAEMORRHAGE, mask_without == HAEMORRHAGE)
    # Exudates are bright yellow: red and green up, blue down relative to the fundus.
    diff = with_ex[exudate_pixels].astype(int) - without[exudate_pixels].astype(int)
    assert (diff[:, 1].mean() > 40) and (diff[:, 2].mean() < diff[:, 1].mean())


def test_render_scene_fills_missing_factors_from_rng_and_rejects_unknown_ones():
    a = render_scene({"exudates": 0}, 16, np.random.default_rng(4))
    b = render_scene({"exudates": 0}, 16, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(ValueError, match="missing"):
        render_scene({"exudates": 0}, 16)
    with pytest.raises(ValueError, match="unknown factor"):
        render_scene({**sample_factors(np.random.default_rng(0)), "colour": 1.0}, 16)


def test_hflip_mirrors_image_and_mask_together_on_train_only():
    dm = small_synthetic(hflip=True, num_train=16)
    stored = dm.train_dataset.images[0].float() / 127.5 - 1
    stored_mask = dm.train_dataset.extras["mask"][0].long()
    torch.manual_seed(0)
    flips = []
    for _ in range(30):
        s = dm.train_dataset[0]
        flipped = torch.equal(s["image"], stored.flip(-1))
        assert flipped or torch.equal(s["image"], stored)
        assert torch.equal(s["mask"], stored_mask.flip(-1) if flipped else stored_mask)
        flips.append(flipped)
    assert 5 < sum(flips) < 25
    val_stored = dm.val_dataset.images[0].float() / 127.5 - 1
    assert all(torch.equal(dm.val_dataset[0]["image"], val_stored) for _ in range(10))


def test_balanced_sampling_equalises_classes():
    dm = small_synthetic(num_classes=3, resolution=8, num_train=600, balanced=True,
                         batch_size=50)
    counts = dm.class_counts().float()
    assert counts[2] / counts.sum() < 0.15  # both lesion kinds together are rare
    loader = dm.train_dataloader()
    drawn = torch.cat([batch["label"] for batch in loader])
    share = torch.bincount(drawn, minlength=3).float() / len(drawn)
    assert torch.all((share - 1 / 3).abs() < 0.08), share


def test_dataloaders_follow_the_contract():
    dm = small_synthetic(num_train=100, num_val=30, batch_size=16)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last and len(train) == 100 // 16
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert not val.drop_last and len(val) == 2
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    labels = torch.cat([b["label"] for b in dm.val_dataloader()])
    assert torch.equal(labels, dm.val_dataset.labels)  # no shuffling
    assert dm.hparams["num_train"] == 100 and dm.hparams["batch_size"] == 16


def test_data_module_argument_errors_are_explained():
    with pytest.raises(ValueError, match="power of two"):
        SyntheticDataModule(resolution=24)
    with pytest.raises(ValueError, match="num_classes must be 2 or 3"):
        SyntheticDataModule(num_classes=5)
    with pytest.raises(ValueError, match="lesion_count"):
        SyntheticDataModule(lesion_count=(0, 9))
    dm = SyntheticDataModule(resolution=8, num_train=8)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup()
    with pytest.raises(ValueError, match="fewer than batch_size"):
        dm.train_dataloader()


def test_a_small_cnn_learns_the_synthetic_label():
    # Lesions must be visible even at 16 px (harder than the 32 px default): a two-layer CNN
    # reaches > 95 % validation accuracy within a few epochs.
    torch.manual_seed(0)
    dm = small_synthetic(resolution=16, num_train=1024, num_val=256, num_test=8)
    x = dm.train_dataset.images.float() / 127.5 - 1
    y = dm.train_dataset.labels
    xv = dm.val_dataset.images.float() / 127.5 - 1
    yv = dm.val_dataset.labels
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 2),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    accuracy = 0.0
    for _ in range(25):
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accuracy = (net(xv).argmax(1) == yv).float().mean().item()
        if accuracy > 0.95:
            break
    assert accuracy > 0.95


# ============================================================================ retina
def write_npz(path: Path, n: int = 6, size: int = 28, labels=None, drop=()) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        lab = np.arange(n) % 5 if labels is None else np.asarray(labels)
        arrays[f"{split}_labels"] = lab.reshape(-1, 1).astype(np.uint8)
    for key in drop:
        arrays.pop(key)
    np.savez(path, **arrays)
    return path


class FakeResponse(io.BytesIO):
    """What ``urlopen`` returns: a readable context manager."""


@pytest.fixture
def real_retina() -> Path:
    if not RETINA_NPZ.is_file():
        pytest.skip(f"RetinaMNIST not available at {RETINA_NPZ} (shared data folder absent)")
    return RETINA_NPZ


def test_retina_pads_28_to_32_with_black(real_retina):
    dm = RetinaDataModule(root=str(real_retina.parent), resolution=32, download=False)
    dm.setup()
    raw = np.load(real_retina)
    assert len(dm.train_dataset) == 1080 and len(dm.val_dataset) == 120
    assert len(dm.test_dataset) == 400
    sample = dm.train_dataset[7]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    images = torch.stack([dm.train_dataset[i]["image"] for i in range(0, 1080, 9)])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (images[:, :, border] == -1).all()
    # The interior is the original picture, untouched.
    original = torch.from_numpy(raw["train_images"][7]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(sample["image"][:, 2:30, 2:30], original)
    assert sample["label"].item() == int(raw["train_labels"][7, 0])


def test_retina_label_counts_for_grades_and_binary(real_retina):
    grades = RetinaDataModule(root=str(real_retina), download=False)
    grades.setup()
    assert grades.class_counts().tolist() == [486, 128, 206, 194, 66]
    assert grades.num_classes == 5 and grades.class_names[4] == "grade 4 (proliferative DR)"
    binary = RetinaDataModule(root=str(real_retina), binary=True, resize_mode="resize",
                              resolution=16, download=False)
    binary.setup()
    assert binary.class_counts().tolist() == [486, 594]
    assert binary.class_names == ["no DR", "DR"]
    assert binary.train_dataset[0]["image"].shape == (3, 16, 16)


def test_retina_missing_file_and_failed_download_names_path_and_url(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(retina_module, "urlopen", offline)
    dm = RetinaDataModule(root=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "data" / "retinamnist.npz") in message
    assert "https://zenodo.org/records/10519652/files/retinamnist.npz" in message
    assert "dataset.root=" in message
    assert list((tmp_path / "data").iterdir()) == []  # no partial file left behind
    with pytest.raises(FileNotFoundError, match="retinamnist_64.npz"):
        RetinaDataModule(root=str(tmp_path), size=64, download=False).setup()


def test_retina_download_with_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(retina_module, "urlopen",
                        lambda url, timeout=None: FakeResponse(b"not the RetinaMNIST file"))
    dm = RetinaDataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MD5"):
        dm.setup()
    assert list(tmp_path.iterdir()) == []


def test_retina_download_of_other_sizes_checks_keys_and_lands_atomically(tmp_path, monkeypatch):
    payload = write_npz(tmp_path / "served.npz", n=10, size=64).read_bytes()
    requested = []

    def serve(url, timeout=None):
        requested.append((url, timeout))
        return FakeResponse(payload)

    monkeypatch.setattr(retina_module, "urlopen", serve)
    dm = RetinaDataModule(root=str(tmp_path / "data"), size=64, resolution=32)
    dm.prepare_data()
    assert requested[0][0].endswith("/retinamnist_64.npz?download=1")
    assert requested[0][1] is not None  # a timeout is always set
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["retinamnist_64.npz"]
    dm.setup()
    assert dm.train_dataset[0]["image"].shape == (3, 32, 32)  # 64 is a power of two: resized only


def test_retina_rejects_out_of_range_labels(tmp_path):
    path = write_npz(tmp_path / "retinamnist.npz", labels=[0, 1, 2, 7, 4, 1])
    dm = RetinaDataModule(root=str(tmp_path), download=False)
    with pytest.raises(ValueError, match=r"values \[7\] outside the DR grades") as info:
        dm.setup()
    assert str(path) in str(info.value)


def test_retina_rejects_files_with_missing_keys_or_garbage(tmp_path):
    write_npz(tmp_path / "retinamnist.npz", drop=("val_labels", "test_images"))
    dm = RetinaDataModule(root=str(tmp_path), download=False)
    with pytest.raises(ValueError, match=r"missing keys \['val_labels', 'test_images'\]"):
        dm.setup()
    garbage = tmp_path / "broken" / "retinamnist.npz"
    garbage.parent.mkdir()
    garbage.write_bytes(b"PK\x03\x04 truncated archive")
    with pytest.raises(ValueError, match="corrupt"):
        RetinaDataModule(root=str(garbage), download=False).setup()


# ============================================================================ folder
def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def make_tree(root: Path, per_class=(6, 6, 5), size=12, seed=0) -> None:
    """Class folders of small coloured images: class k is dominated by colour channel k."""
    rng = np.random.default_rng(seed)
    for k, n in enumerate(per_class):
        for i in range(n):
            img = rng.integers(0, 60, (size, size + 4, 3), dtype=np.uint8)
            img[..., k] += 180
            ext = "jpg" if (k == 1 and i % 2) else "png"
            path = root / f"class_{k}" / f"img {i}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)


def catch_our_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if "unreadable" in str(w.message)]


def test_folder_skips_a_corrupt_file_with_one_warning_and_converts_modes(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "class_0" / "broken.JPG").write_bytes(np.random.bytes(300))
    grey = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    save_png(tmp_path / "class_2" / "grey.png", grey, "L")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :, 0] = 255  # red everywhere, ...
    rgba[:, 8:, 3] = 255  # ... opaque on the right half only
    save_png(tmp_path / "class_1" / "rgba.png", rgba, "RGBA")
    dm = FolderDataModule(root=str(tmp_path), resolution=8, val_fraction=0.2,
                          test_fraction=0.2, batch_size=4)
    _, caught = catch_our_warnings(dm.setup)
    assert len(caught) == 1
    assert "skipped 1 unreadable" in str(caught[0].message)
    assert "broken.JPG" in str(caught[0].message)
    every_path = sum((dm.paths[s] for s in ("train", "val", "test")), [])
    assert len(every_path) == 6 + 6 + 5 + 2  # all files but the corrupt one
    assert all(p.name != "broken.JPG" for p in every_path)
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        for i in range(len(ds)):
            assert ds[i]["image"].shape == (3, 8, 8)
    grey_out = load_image(tmp_path / "class_2" / "grey.png", 8)
    assert (grey_out == grey_out[..., :1]).all()  # R == G == B
    assert grey_out[0, 0, 0] < grey_out[0, -1, 0]  # the ramp survives
    rgba_out = load_image(tmp_path / "class_1" / "rgba.png", 8).astype(int)
    assert (rgba_out[:, :3] == 0).all()  # transparent -> black
    assert (rgba_out[:, 5:, 0] == 255).all() and (rgba_out[:, 5:, 1:] == 0).all()


def test_folder_decodes_center_square_of_non_square_images(tmp_path):
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, :10] = 255  # white strips left and right are cropped away
    img[:, 30:] = 255
    save_png(tmp_path / "wide.png", img)
    out = load_image(tmp_path / "wide.png", 4)
    assert out.shape == (4, 4, 3) and out.max() == 0


def test_folder_split_is_seeded_and_stratified(tmp_path):
    make_tree(tmp_path, per_class=(20, 20, 10), size=6)

    def split(seed):
        dm = FolderDataModule(root=str(tmp_path), resolution=4, seed=seed,
                              val_fraction=0.2, test_fraction=0.1)
        dm.setup()
        return dm

    a, b, c = split(0), split(0), split(1)
    assert a.paths == b.paths
    assert a.paths["val"] != c.paths["val"]
    assert torch.bincount(a.val_dataset.labels).tolist() == [4, 4, 2]
    assert torch.bincount(a.test_dataset.labels).tolist() == [2, 2, 1]
    assert a.class_counts().tolist() == [14, 14, 7]
    sets = [set(a.paths[s]) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert len(sets[0] | sets[1] | sets[2]) == 50
    # Labels follow the folder: class k images are dominated by channel k.
    for ds in (a.train_dataset, a.val_dataset):
        means = ds.images.float().mean(dim=(2, 3))
        assert torch.equal(means.argmax(1), ds.labels)


def test_folder_detects_split_folders(tmp_path):
    make_tree(tmp_path / "train", per_class=(4, 3, 2), size=6)
    make_tree(tmp_path / "valid", per_class=(2, 1), size=6, seed=1)
    make_tree(tmp_path / "test", per_class=(1, 1, 1), size=6, seed=2)
    dm = FolderDataModule(root=str(tmp_path), resolution=4, batch_size=2)
    assert dm.class_names == ["class_0", "class_1", "class_2"]  # known before setup
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (9, 3, 3)
    assert dm.val_dataset.labels.tolist() == [0, 0, 1]
    assert all("valid" in p.parts for p in dm.paths["val"])
    (tmp_path / "test" / "class_9").mkdir()
    with pytest.raises(ValueError, match="class_9"):
        FolderDataModule(root=str(tmp_path), resolution=4).setup()


def test_folder_bad_trees_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FolderDataModule(root=str(tmp_path / "nowhere")).setup()
    (tmp_path / "flat").mkdir()
    save_png(tmp_path / "flat" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no class sub-folders"):
        FolderDataModule(root=str(tmp_path / "flat")).setup()
    make_tree(tmp_path / "tree", per_class=(3, 3), size=6)
    (tmp_path / "tree" / "class_empty").mkdir()
    (tmp_path / "tree" / "class_empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class_empty holds no image files"):
        FolderDataModule(root=str(tmp_path / "tree"), resolution=4).setup()
    with pytest.raises(ValueError, match="val_fraction"):
        FolderDataModule(root=str(tmp_path / "tree"), val_fraction=1.5)


def test_folder_lazy_mode_replaces_unreadable_files_and_warns_once(tmp_path):
    make_tree(tmp_path, per_class=(4, 4), size=6)
    (tmp_path / "class_1" / "zz broken.png").write_bytes(b"\x89PNG garbage")
    cached = FolderDataModule(root=str(tmp_path), resolution=4, cache=True,
                              val_fraction=0.0, test_fraction=0.0)
    catch_our_warnings(cached.setup)
    lazy = FolderDataModule(root=str(tmp_path), resolution=4, cache=False,
                            val_fraction=0.0, test_fraction=0.0)
    _, caught = catch_our_warnings(lazy.setup)
    assert caught == []  # nothing is decoded yet
    ds = lazy.train_dataset
    assert len(ds) == 9

    def read_all_twice():
        return [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]

    samples, caught = catch_our_warnings(read_all_twice)
    assert len(caught) == 1 and "zz broken.png" in str(caught[0].message)
    broken = [i for i, p in enumerate(ds.paths) if p.name == "zz broken.png"][0]
    good = [i for i in range(len(ds)) if i != broken]
    lazy_images = torch.stack([samples[i]["image"] for i in good])
    cached_images = torch.stack([cached.train_dataset[i]["image"] for i in range(8)])
    assert torch.equal(lazy_images, cached_images)
    replacement = samples[broken]  # the next readable file, with its own label
    assert torch.equal(replacement["image"], samples[(broken + 1) % len(ds)]["image"])
    assert replacement["label"] == samples[(broken + 1) % len(ds)]["label"]


def test_potato_leaves_split_folders():
    if not POTATO.is_dir():
        pytest.skip(f"potato leaves not available at {POTATO} (shared data folder absent)")
    dm = FolderDataModule(root=str(POTATO), resolution=16)
    dm.setup()
    assert dm.class_names == ["Potato___Early_blight", "Potato___Late_blight", "Potato___healthy"]
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1506, 213, 433)
    assert dm.class_counts().tolist() == [700, 700, 106]
    assert dm.skipped == []
    sample = dm.test_dataset[0]
    assert sample["image"].shape == (3, 16, 16)
    assert -1.0 <= sample["image"].min() and sample["image"].max() <= 1.0


def test_lesion_scale_grows_the_lesions_and_nothing_else():
    from stylex.data.synthetic import EXUDATE, HAEMORRHAGE, render_batch

    data = generate_split(64, seed=3, split="train", resolution=32)
    f = data["factors"]
    lesions = (f[:, 0] > 0) | (f[:, 1] > 0)
    assert lesions.any() and (~lesions).any()
    img1, mask1 = render_batch(f, 32, lesion_scale=1.0)
    img2, mask2 = render_batch(f, 32, lesion_scale=1.6)
    np.testing.assert_array_equal(img1, data["images"])  # scale 1 is the default
    # scenes without lesions are the same picture at any scale
    np.testing.assert_array_equal(img1[~lesions], img2[~lesions])
    # lesion area grows about as the square of the scale (pixel rounding aside)
    for kind in (EXUDATE, HAEMORRHAGE):
        a1, a2 = float((mask1 == kind).sum()), float((mask2 == kind).sum())
        assert 1.6 ** 2 * 0.7 < a2 / a1 < 1.6 ** 2 * 1.3, (kind, a1, a2)
    # every scene keeps its lesion kinds: a kind present at scale 1 is present at 1.6 and vice versa
    for kind in (EXUDATE, HAEMORRHAGE):
        np.testing.assert_array_equal((mask1 == kind).any(axis=(1, 2)), (mask2 == kind).any(axis=(1, 2)))
    with pytest.raises(ValueError, match="lesion_scale must lie in"):
        render_batch(f[:1], 32, lesion_scale=10)


def test_a_loaded_image_is_writable_so_torch_takes_it_without_a_warning(tmp_path):
    import warnings

    path = tmp_path / "leaf.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(path)
    array = load_image(path, 16)
    assert array.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The given NumPy array is not writable" would fail here
        torch.from_numpy(array)
