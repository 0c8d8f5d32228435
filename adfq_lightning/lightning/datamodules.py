"""LightningDataModules of calibration and evaluation images: CIFAR-10 (offline) and any ImageNet-style folder.

Their ``train_dataloader``/``calib_dataloader`` yield the calibration images (unshuffled, eval transforms),
``val_dataloader``/``test_dataloader`` the evaluation images.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Literal

import lightning as L
import timm.data
import torch
from timm.models import PretrainedCfg
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torchvision.datasets import ImageFolder

from ..data.cifar10 import ARCHIVE_ENV, cifar10_eval_transform, default_archive, load_bundle
from ..data.datasets import TensorImageDataset
from ..data.decode import CorruptImageError, decode_image_folder, load_image_file
from ..data.splits import calibration_indices, split_indices

__all__ = ["CIFAR10DataModule", "ImageFolderDataModule", "ReconstructionSteps"]


class ReconstructionSteps(IterableDataset):
    """What ``ADFQModule.fit`` iterates: one step number per training step, no data.

    Reconstruction draws its batches from the calibration cache it built once, so a training batch of images
    would be fetched (and, for JPEG folders, decoded) only to be thrown away. Return
    ``DataLoader(ReconstructionSteps(), batch_size=None)`` from your own datamodule's ``train_dataloader`` to
    avoid that, and give it a ``calib_dataloader()`` with the calibration images.
    """

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class _CalibrationDataModule(L.LightningDataModule):
    """Shared loaders: calib = calibration images (unshuffled, eval transforms), val/test/predict = evaluation
    images, train = :class:`ReconstructionSteps` for ``ADFQModule.fit``."""

    def __init__(self, batch_size: int, num_workers: int, num_calib: int, seed: int,
                 data_config: dict | None):
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_calib, self.seed = num_calib, seed
        self.data_config = data_config
        self.calib_set: Dataset | None = None
        self.eval_set: Dataset | None = None

    def set_data_config(self, data_config: dict) -> None:
        """Link to a model: ``dm.set_data_config(timm.data.resolve_data_config(model=model))``.
        Call before ``setup``; transforms are built there."""
        self.data_config = data_config

    def _loader(self, dataset: Dataset | None) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before requesting loaders")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def calib_dataloader(self) -> DataLoader:
        return self._loader(self.calib_set)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ReconstructionSteps(), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class CIFAR10DataModule(_CalibrationDataModule):
    """CIFAR-10 calibration images (from the 45k training part) and the 5,000 validation images.

    ``source="bundle"`` (default) reads the shipped offline bundle and draws ``num_calib`` of its
    1,024 calibration images; ``source="archive"`` decodes ``archive_path`` (default:
    ``$ADFQ_CIFAR10_ARCHIVE``, else ``shared/data/cifar10/train.tar.gz`` beside a source checkout, looked up
    in ``setup``) and draws from all 45,000 training images.  Validation images are identical for both sources.  ``seed`` selects
    the calibration images; the train/val split itself is fixed (:func:`split_indices`).
    """

    def __init__(
        self,
        source: Literal["bundle", "archive"] = "bundle",
        archive_path: str | Path | None = None,
        bundle_path: str | Path | None = None,
        cache_dir: str | Path | None = None,
        val_per_class: int = 500,
        batch_size: int = 64,
        num_workers: int = 0,
        num_calib: int = 1024,
        seed: int = 0,
        data_config: dict | None = None,
    ):
        super().__init__(batch_size, num_workers, num_calib, seed, data_config)
        if source not in ("bundle", "archive"):
            raise ValueError(f"source must be 'bundle' or 'archive', got {source!r}")
        self.source = source
        self.archive_path = Path(archive_path) if archive_path is not None else None
        self.bundle_path, self.cache_dir = bundle_path, cache_dir
        self.val_per_class = val_per_class
        self.classes: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.source == "bundle":
            bundle = load_bundle(self.bundle_path)
            calib_images, calib_labels = bundle["calib_images"], bundle["calib_labels"]
            val_images, val_labels = bundle["val_images"], bundle["val_labels"]
            self.classes = bundle["classes"]
            calib_idx = calibration_indices(calib_labels, self.num_calib, self.seed)
        else:
            archive = self.archive_path or default_archive()
            if not archive.exists():
                raise FileNotFoundError(f"CIFAR-10 archive not found: {archive}. Pass archive_path=<train.tar.gz or "
                                        f"its ImageFolder directory> (or set {ARCHIVE_ENV}), or use source='bundle', "
                                        "the images shipped with the package.")
            data = decode_image_folder(archive, "train", self.cache_dir)
            train_idx, val_idx = split_indices(data.labels, self.val_per_class)
            calib_images, calib_labels = data.images, data.labels
            val_images, val_labels = data.images[val_idx], data.labels[val_idx]
            self.classes = data.classes
            calib_idx = calibration_indices(data.labels, self.num_calib, self.seed, candidates=train_idx)
        transform = cifar10_eval_transform(self.data_config)
        self.calib_set = TensorImageDataset(calib_images[calib_idx], calib_labels[calib_idx], transform)
        self.eval_set = TensorImageDataset(val_images, val_labels, transform)


class ImageFolderDataModule(_CalibrationDataModule):
    """ImageNet-style tree ``root/train/<class>/*`` (calibration) and ``root/val/<class>/*``
    (evaluation), preprocessed with timm's eval transform for ``data_config`` (timm's defaults
    until :meth:`set_data_config` links a model)."""

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 64,
        num_workers: int = 4,
        num_calib: int = 1024,
        seed: int = 0,
        data_config: dict | None = None,
    ):
        super().__init__(batch_size, num_workers, num_calib, seed, data_config)
        self.root = Path(root)
        self.classes: list[str] = []

    def _folder(self, split: str, transform, purpose: str) -> ImageFolder:
        if not (self.root / split).is_dir():
            raise FileNotFoundError(f"No '{split}' directory under {self.root}: {purpose} reads "
                                    f"root/{split}/<class>/<image>.")
        try:
            return ImageFolder(self.root / split, transform=transform, loader=load_image_file)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.root / split}: {err}; expected root/{split}/<class>/<image>") from err

    def setup(self, stage: str | None = None) -> None:
        """``fit`` needs ``root/train`` (calibration images); ``validate``/``test``/``predict`` only ``root/val``."""
        # timm's PretrainedCfg defaults (ImageNet, 224, bicubic, crop 0.875) until a model is linked
        cfg = timm.data.resolve_data_config(pretrained_cfg=self.data_config or asdict(PretrainedCfg()))
        transform = timm.data.create_transform(**cfg, is_training=False)
        calibrate = stage in (None, "fit")
        evaluate = stage != "fit" or (self.root / "val").is_dir()  # fit evaluates afterwards when it can
        train = self._folder("train", transform, "calibration (fit)") if calibrate else None
        val = self._folder("val", transform, "evaluation (validate/test/predict)") if evaluate else None
        if train is not None and val is not None and train.classes != val.classes:
            raise ValueError(f"{self.root}: train and val have different class folders")
        self.classes = (train or val).classes
        if train is not None:
            self.calib_set = self._calibration_subset(train)
        if val is not None:
            self.eval_set = val

    def _calibration_subset(self, train: ImageFolder) -> Subset:
        labels = torch.tensor(train.targets, dtype=torch.int64)
        calib = calibration_indices(labels, self.num_calib, self.seed).tolist()
        corrupt = []
        for i in calib:  # decode the calibration images now: a bad one stops the run before any model work
            try:
                load_image_file(train.samples[i][0])
            except CorruptImageError as err:
                corrupt.append(str(err).split(": corrupt")[0])
        if corrupt:
            raise CorruptImageError(
                f"{len(corrupt)} of the {len(calib)} calibration images are corrupt or truncated: {corrupt[:5]}; "
                "delete or replace them (corrupt images are not skipped, so the image set stays the one the seed "
                "selects).")
        return Subset(train, calib)
