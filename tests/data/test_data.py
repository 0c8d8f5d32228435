"""Data splits, calibration draws, bundle and DataModules on a tiny generated ImageFolder tree."""

import tarfile

import pytest
import torch
from PIL import Image

from adfq_lightning.data import build_bundle, calibration_indices, decode_image_folder, split_indices
from adfq_lightning.lightning import CIFAR10DataModule, ImageFolderDataModule

CLASSES = ["cat", "ant", "bee"]  # deliberately unsorted: labels must follow sorted order
PER_CLASS = 6


def _write_images(root, split, classes=CLASSES, per_class=PER_CLASS, size=8):
    for c, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            color = (40 * c, 20 * i, 100)
            Image.new("RGB", (size, size), color).save(root / split / name / f"{i:04d}.jpg")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "folder"
    _write_images(root, "train")
    _write_images(root, "val", per_class=2)
    return root


@pytest.fixture
def archive(folder, tmp_path):
    path = tmp_path / "train.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder / "train", arcname="train")
    return path


def test_decode_archive_matches_directory_and_is_cached(archive, folder, tmp_path):
    from_tar = decode_image_folder(archive, cache_dir=tmp_path / "cache")
    from_dir = decode_image_folder(folder, cache_dir=tmp_path / "cache")
    assert from_tar.classes == sorted(CLASSES)
    assert from_tar.images.shape == (len(CLASSES) * PER_CLASS, 3, 8, 8)
    assert from_tar.images.dtype == torch.uint8
    assert torch.equal(from_tar.labels, torch.arange(len(CLASSES)).repeat_interleave(PER_CLASS))
    assert torch.equal(from_tar.labels, from_dir.labels)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    cached = decode_image_folder(archive, cache_dir=tmp_path / "cache")
    assert torch.equal(cached.images, from_tar.images)


@pytest.mark.parametrize("val_per_class", [1, 2, 5])
def test_split_is_deterministic_disjoint_and_balanced(val_per_class):
    labels = torch.arange(4).repeat_interleave(PER_CLASS)
    train, val = split_indices(labels, val_per_class, seed=0)
    again_train, again_val = split_indices(labels, val_per_class, seed=0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[val]).tolist() == [val_per_class] * 4
    assert not torch.equal(val, split_indices(labels, val_per_class, seed=1)[1])


def test_split_needs_training_images_left():
    with pytest.raises(ValueError, match="val_per_class"):
        split_indices(torch.zeros(3, dtype=torch.int64), val_per_class=3)


def test_calibration_draw_is_balanced_within_candidates():
    labels = torch.arange(3).repeat_interleave(10)
    candidates = torch.arange(0, 30, 2)
    idx = calibration_indices(labels, 9, seed=0, candidates=candidates)
    assert set(idx.tolist()) <= set(candidates.tolist())
    assert len(set(idx.tolist())) == 9
    assert torch.bincount(labels[idx]).tolist() == [3, 3, 3]
    assert torch.bincount(labels[idx[:6]]).tolist() == [2, 2, 2]  # every prefix is balanced
    assert torch.equal(idx, calibration_indices(labels, 9, seed=0, candidates=candidates))
    with pytest.raises(ValueError, match="calibration images"):
        calibration_indices(labels, 16, candidates=candidates)


def test_decode_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode_image_folder(tmp_path / "missing.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="train/<class>/<image>"):
        decode_image_folder(tmp_path / "empty", cache_dir=tmp_path / "cache")
    flat = tmp_path / "flat" / "train"  # images without class folders
    flat.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(flat / "0000.jpg")
    with pytest.raises(ValueError, match="found no images"):
        decode_image_folder(tmp_path / "flat", cache_dir=tmp_path / "cache")


def test_bundle_round_trip_and_datamodule(archive, tmp_path):
    path = build_bundle(archive, tmp_path / "bundle.pt", num_calib=6, val_per_class=2,
                        cache_dir=tmp_path / "cache")
    bundle = torch.load(path, weights_only=True)
    assert bundle["classes"] == sorted(CLASSES)
    assert bundle["calib_images"].shape == (6, 3, 8, 8) and bundle["calib_images"].dtype == torch.uint8
    assert bundle["val_labels"].dtype == torch.int64
    assert torch.bincount(bundle["val_labels"]).tolist() == [2, 2, 2]
    calib = {tuple(x.flatten().tolist()) for x in bundle["calib_images"]}
    assert not calib & {tuple(x.flatten().tolist()) for x in bundle["val_images"]}

    cfg = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.25,) * 3}
    dm = CIFAR10DataModule(bundle_path=path, num_calib=3, batch_size=4, data_config=cfg)
    dm.setup()
    images, labels = next(iter(dm.calib_dataloader()))
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert sum(len(y) for _, y in dm.val_dataloader()) == 6

    archive_dm = CIFAR10DataModule("archive", archive_path=archive, cache_dir=tmp_path / "cache",
                                   val_per_class=2, num_calib=3, data_config=cfg)
    archive_dm.setup()
    assert torch.equal(archive_dm.eval_set.images, dm.eval_set.images)

    with pytest.raises(ValueError, match="calibration images"):
        CIFAR10DataModule(bundle_path=path, num_calib=7).setup()


def test_cifar_datamodule_missing_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match="archive not found"):
        CIFAR10DataModule("archive", archive_path=tmp_path / "nope.tar.gz").setup()


def test_image_folder_datamodule(folder):
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "interpolation": "bilinear", "crop_pct": 1.0}
    dm = ImageFolderDataModule(folder, batch_size=4, num_workers=0, num_calib=6)
    dm.set_data_config(cfg)
    dm.setup()
    images, _ = next(iter(dm.calib_dataloader()))
    assert images.shape == (4, 3, 16, 16)
    assert len(dm.calib_set) == 6 and len(dm.eval_set) == 6
    with pytest.raises(ValueError, match="calibration images"):
        ImageFolderDataModule(folder, num_calib=100, num_workers=0).setup()


def test_image_folder_datamodule_layout_errors(tmp_path):
    root = tmp_path / "imagenet"
    _write_images(root, "train")
    with pytest.raises(FileNotFoundError, match="evaluation .* reads root/val/<class>"):
        ImageFolderDataModule(root, num_workers=0).setup("validate")
    (root / "val" / "cat").mkdir(parents=True)  # class folder without images
    with pytest.raises(FileNotFoundError, match="expected root/val/<class>/<image>"):
        ImageFolderDataModule(root, num_workers=0, num_calib=6).setup()


def test_image_folder_evaluation_needs_only_val(tmp_path):
    root = tmp_path / "imagenet"
    _write_images(root, "val")
    data = ImageFolderDataModule(root, num_workers=0, batch_size=4)
    data.setup("test")
    assert len(data.eval_set) == 18 and data.calib_set is None
    with pytest.raises(FileNotFoundError, match="calibration \\(fit\\) reads root/train/<class>"):
        data.setup("fit")
