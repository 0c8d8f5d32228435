"""Calibration / evaluation data for post-training quantization.

Two sources of images:

* CIFAR-10 (the project's offline stand-in for ImageNet).  The 50,000-image training archive is
  decoded once into a uint8 tensor cache, then split deterministically into 45,000 images for
  training reference models and drawing calibration images, and 5,000 validation images
  (500 per class).  A small bundle of 1,024 calibration + 5,000 validation images ships inside
  the package so quantization runs need neither the archive nor a network.
* Any ImageNet-style folder tree (``root/train/<class>/*``, ``root/val/<class>/*``), evaluated
  with the model's own timm data config.

Both are exposed as LightningDataModules whose train/calib loaders yield calibration images and
whose val/test loaders yield the evaluation images.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
import io
import os
import tarfile
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Iterator, Literal, NamedTuple

import lightning as L
import timm.data
import torch
from PIL import Image
from timm.models import PretrainedCfg
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from adfq_lightning.report import atomic_torch_save
from adfq_lightning.zoo import CIFAR10_MEAN, CIFAR10_STD

__all__ = [
    "DEFAULT_ARCHIVE",
    "CorruptImageError",
    "LabeledImages",
    "TensorImageDataset",
    "build_bundle",
    "calibration_indices",
    "cifar10_eval_transform",
    "cifar10_train_transform",
    "decode_image_folder",
    "default_bundle_path",
    "default_cache_dir",
    "load_bundle",
    "split_indices",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
]

#: CIFAR-10 training archive, as laid out next to a source checkout (``../shared`` of the repo root).
DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train.tar.gz"

_LAYOUT_HELP = "expected ImageFolder layout '{split}/<class>/<image>' (image suffixes: {exts})"


class LabeledImages(NamedTuple):
    """Decoded images (N, 3, H, W) uint8, labels (N,) int64, and class names (index = label)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


def default_cache_dir() -> Path:
    """``$ADFQ_CACHE_DIR`` if set, else ``~/.cache/adfq_lightning``."""
    return Path(os.environ.get("ADFQ_CACHE_DIR", Path.home() / ".cache" / "adfq_lightning"))


def default_bundle_path():
    """The offline bundle shipped with the package (an ``importlib.resources`` Traversable)."""
    return resources.files("adfq_lightning").joinpath("assets").joinpath("cifar10_bundle.pt")


# --------------------------------------------------------------------------------------------
# Decoding an ImageFolder tree (tar archive or directory) into a tensor cache
# --------------------------------------------------------------------------------------------

def _layout_error(source: Path, split: str, found: str) -> ValueError:
    return ValueError(
        f"{source}: {found}; " + _LAYOUT_HELP.format(split=split, exts=", ".join(IMG_EXTENSIONS))
    )


class CorruptImageError(ValueError):
    """An image file that cannot be decoded."""


def _decode_rgb(data: bytes | str | Path, where: str | Path) -> Image.Image:
    """Decode one image file fully, as RGB (grayscale, palette, RGBA and CMYK images are converted).

    A corrupt or truncated file stops the run with an error naming it: a calibration or evaluation set
    that silently shrinks would give results that cannot be reproduced or compared.
    """
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            return image.convert("RGB")  # convert() loads every pixel: truncation shows here, not later
    except (OSError, SyntaxError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise CorruptImageError(
            f"{where}: corrupt or truncated image ({type(err).__name__}: {err}); delete or replace the file "
            "(corrupt images are not skipped, so the image set stays the one the seed selects)."
        ) from err


def _match(relpath: str, split: str) -> str | None:
    """Class name if ``relpath`` is ``<split>/<class>/<image>``, else None."""
    parts = PurePosixPath(relpath).parts
    if len(parts) == 3 and parts[0] == split and parts[2].lower().endswith(IMG_EXTENSIONS):
        return parts[1]
    return None


def _iter_images(source: Path, split: str) -> Iterator[tuple[str, str, bytes]]:
    """Yield (relative path, class, encoded bytes), streaming tar archives in one pass."""
    if source.is_dir():
        for path in sorted((source / split).glob("*/*")):
            rel = path.relative_to(source).as_posix()
            cls = _match(rel, split)
            if cls is not None and path.is_file():
                yield rel, cls, path.read_bytes()
        return
    with tarfile.open(source, "r:*") as tar:
        for member in tar:
            rel = member.name.removeprefix("./")
            cls = _match(rel, split)
            if cls is not None and member.isfile():
                yield rel, cls, tar.extractfile(member).read()


def _cache_file(source: Path, split: str, cache_dir: Path) -> Path:
    """Cache name keyed on path, size and mtime, so a replaced archive is decoded afresh."""
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{split}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir / f"{source.name.split('.')[0]}-{split}-{key[:12]}.pt"


def decode_image_folder(
    source: str | Path, split: str = "train", cache_dir: str | Path | None = None
) -> LabeledImages:
    """Decode every image under ``<split>/<class>/`` of a tar archive or directory, once.

    Images are ordered by (class, path) and classes sorted alphabetically, as torchvision's
    ImageFolder does, so indices are stable whatever the archive's member order.  All images must
    share one size (they are stacked into one tensor).  The result is cached in ``cache_dir``
    (default :func:`default_cache_dir`) and reloaded on later calls.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"Image archive or directory not found: {source}")
    cache = _cache_file(source, split, Path(cache_dir) if cache_dir else default_cache_dir())
    if cache.is_file():
        data = torch.load(cache, weights_only=True)
        return LabeledImages(data["images"], data["labels"], data["classes"])

    entries = sorted((cls, rel, pil_to_tensor(_decode_rgb(raw, f"{source}:{rel}")))
                     for rel, cls, raw in _iter_images(source, split))
    if not entries:
        raise _layout_error(source, split, "found no images")
    shapes = {img.shape for _, _, img in entries}
    if len(shapes) > 1:
        raise ValueError(f"{source}: images of several sizes {sorted(shapes)}; decode_image_folder "
                         "needs one size (use ImageFolderDataModule for varied sizes)")
    classes = sorted({cls for cls, _, _ in entries})
    class_to_idx = {c: i for i, c in enumerate(classes)}
    images = torch.stack([img for _, _, img in entries])
    labels = torch.tensor([class_to_idx[cls] for cls, _, _ in entries], dtype=torch.int64)

    # atomic, with a unique temporary name: concurrent writers (DDP ranks) never see or make a half-written cache
    atomic_torch_save({"images": images, "labels": labels, "classes": classes}, cache)
    return LabeledImages(images, labels, classes)


# --------------------------------------------------------------------------------------------
# Deterministic splits
# --------------------------------------------------------------------------------------------

def split_indices(
    labels: torch.Tensor, val_per_class: int = 500, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split into (train, val) indices with exactly ``val_per_class`` validation images per class.

    One ``torch.Generator`` seeded with ``seed`` draws a ``randperm`` of each class's images, in
    class order; the first ``val_per_class`` of each permutation go to validation, the rest to
    training.  Both index tensors are returned sorted.  For CIFAR-10 (5,000 per class) the
    defaults give the project's fixed 45,000 / 5,000 split.
    """
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for cls in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == cls).flatten()
        if len(members) <= val_per_class:
            raise ValueError(f"Class {cls} has {len(members)} images; need more than "
                             f"val_per_class={val_per_class} to keep some for training")
        members = members[torch.randperm(len(members), generator=generator)]
        val.append(members[:val_per_class])
        train.append(members[val_per_class:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def calibration_indices(
    labels: torch.Tensor, num: int, seed: int = 0, candidates: torch.Tensor | None = None
) -> torch.Tensor:
    """Draw ``num`` class-balanced calibration indices from ``candidates`` (default: all).

    Candidates are shuffled with ``seed`` and then taken round-robin over classes (the first image
    of every class, then the second, ...), so any prefix of the result is balanced as well.
    """
    if candidates is None:
        candidates = torch.arange(len(labels))
    if num > len(candidates):
        raise ValueError(f"Asked for {num} calibration images but only {len(candidates)} are available: set "
                         f"num_calib <= {len(candidates)} (CLI: --data.init_args.num_calib) or add images")
    generator = torch.Generator().manual_seed(seed)
    candidates = candidates[torch.randperm(len(candidates), generator=generator)]
    cand_labels = labels[candidates]
    by_class = torch.argsort(cand_labels, stable=True)  # grouped by class, shuffled within
    counts = torch.bincount(cand_labels)
    class_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(by_class)
    rank[by_class] = torch.arange(len(by_class)) - class_start[cand_labels[by_class]]
    round_robin = torch.argsort(rank * len(counts) + cand_labels)
    return candidates[round_robin[:num]]


# --------------------------------------------------------------------------------------------
# Offline bundle
# --------------------------------------------------------------------------------------------

def build_bundle(
    source: str | Path = DEFAULT_ARCHIVE,
    path: str | Path | None = None,
    num_calib: int = 1024,
    val_per_class: int = 500,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> Path:
    """Write the offline bundle: ``num_calib`` calibration images drawn (with ``seed``) from the
    training part and all validation images of the fixed :func:`split_indices` split, as uint8
    tensors + int64 labels + class names.

    Default ``path`` is ``adfq_lightning/assets/cifar10_bundle.pt`` in the source tree.
    """
    data = decode_image_folder(source, "train", cache_dir)
    train_idx, val_idx = split_indices(data.labels, val_per_class)
    calib_idx = calibration_indices(data.labels, num_calib, seed, candidates=train_idx)
    path = Path(path) if path else Path(__file__).parent / "assets" / "cifar10_bundle.pt"
    atomic_torch_save({
        "calib_images": data.images[calib_idx].clone(),
        "calib_labels": data.labels[calib_idx].clone(),
        "val_images": data.images[val_idx].clone(),
        "val_labels": data.labels[val_idx].clone(),
        "classes": list(data.classes),
        "calib_seed": seed,
        "val_per_class": val_per_class,
    }, path)
    return path


def load_bundle(path: str | Path | None = None) -> dict:
    """Load a bundle written by :func:`build_bundle` (default: the shipped one)."""
    source = Path(path) if path else default_bundle_path()
    if not source.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 bundle not found at {source}; build it with "
            "python -c 'from adfq_lightning.data import build_bundle; build_bundle()'"
        )
    with source.open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# Datasets and transforms
# --------------------------------------------------------------------------------------------

class TensorImageDataset(Dataset):
    """(transform(image), label) pairs over a uint8 (N, 3, H, W) image tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def _cifar10_data_config(data_config: dict | None) -> dict:
    return data_config or {"input_size": (3, 32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
                           "interpolation": "bicubic"}


def cifar10_eval_transform(data_config: dict | None = None) -> v2.Compose:
    """uint8 32x32 tensor -> normalised float with the model's mean/std (default CIFAR-10's);
    resized only when the model's ``input_size`` is not 32x32."""
    cfg = _cifar10_data_config(data_config)
    steps = []
    if tuple(cfg["input_size"][-2:]) != (32, 32):
        interpolation = timm.data.transforms.str_to_interp_mode(cfg.get("interpolation", "bicubic"))
        steps.append(v2.Resize(tuple(cfg["input_size"][-2:]), interpolation=interpolation, antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"])]
    return v2.Compose(steps)


def cifar10_train_transform(data_config: dict | None = None) -> v2.Compose:
    """Light training augmentation: random 32x32 crop with 4-pixel padding + horizontal flip."""
    return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                       cifar10_eval_transform(data_config)])


# --------------------------------------------------------------------------------------------
# LightningDataModules
# --------------------------------------------------------------------------------------------

class _CalibrationDataModule(L.LightningDataModule):
    """Shared loaders: train/calib = calibration images (unshuffled), val/test = evaluation images."""

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
        return self.calib_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class CIFAR10DataModule(_CalibrationDataModule):
    """CIFAR-10 calibration images (from the 45k training part) and the 5,000 validation images.

    ``source="bundle"`` (default) reads the shipped offline bundle and draws ``num_calib`` of its
    1,024 calibration images; ``source="archive"`` decodes ``archive_path`` and draws from all
    45,000 training images.  Validation images are identical for both sources.  ``seed`` selects
    the calibration images; the train/val split itself is fixed (:func:`split_indices`).
    """

    def __init__(
        self,
        source: Literal["bundle", "archive"] = "bundle",
        archive_path: str | Path = DEFAULT_ARCHIVE,
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
        self.source, self.archive_path = source, Path(archive_path)
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
            if not self.archive_path.exists():
                raise FileNotFoundError(f"CIFAR-10 archive not found: {self.archive_path}")
            data = decode_image_folder(self.archive_path, "train", self.cache_dir)
            train_idx, val_idx = split_indices(data.labels, self.val_per_class)
            calib_images, calib_labels = data.images, data.labels
            val_images, val_labels = data.images[val_idx], data.labels[val_idx]
            self.classes = data.classes
            calib_idx = calibration_indices(data.labels, self.num_calib, self.seed, candidates=train_idx)
        transform = cifar10_eval_transform(self.data_config)
        self.calib_set = TensorImageDataset(calib_images[calib_idx], calib_labels[calib_idx], transform)
        self.eval_set = TensorImageDataset(val_images, val_labels, transform)


def _load_image_file(path: str) -> Image.Image:
    """ImageFolder's loader, as RGB, with an error naming a corrupt file (see :func:`_decode_rgb`)."""
    return _decode_rgb(path, path)


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

    def _folder(self, split: str, transform) -> ImageFolder:
        layout = "expected root/train/<class>/<image> and root/val/<class>/<image>"
        if not (self.root / split).is_dir():
            raise FileNotFoundError(f"No '{split}' directory under {self.root}; {layout}")
        try:
            return ImageFolder(self.root / split, transform=transform, loader=_load_image_file)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.root / split}: {err}; {layout}") from err

    def setup(self, stage: str | None = None) -> None:
        # timm's PretrainedCfg defaults (ImageNet, 224, bicubic, crop 0.875) until a model is linked
        cfg = timm.data.resolve_data_config(pretrained_cfg=self.data_config or asdict(PretrainedCfg()))
        transform = timm.data.create_transform(**cfg, is_training=False)
        train, val = self._folder("train", transform), self._folder("val", transform)
        if train.classes != val.classes:
            raise ValueError(f"{self.root}: train and val have different class folders")
        self.classes = train.classes
        labels = torch.tensor(train.targets, dtype=torch.int64)
        calib = calibration_indices(labels, self.num_calib, self.seed).tolist()
        corrupt = []
        for i in calib:  # decode the calibration images now: a bad one stops the run before any model work
            try:
                _load_image_file(train.samples[i][0])
            except CorruptImageError as err:
                corrupt.append(str(err).split(": corrupt")[0])
        if corrupt:
            raise CorruptImageError(
                f"{len(corrupt)} of the {len(calib)} calibration images are corrupt or truncated: {corrupt[:5]}; "
                "delete or replace them (corrupt images are not skipped, so the image set stays the one the seed "
                "selects).")
        self.calib_set = Subset(train, calib)
        self.eval_set = val
