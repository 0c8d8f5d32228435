"""Decode an ImageFolder tree (tar archive or directory) once into a uint8 tensor cache; refuse corrupt images."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2.functional import pil_to_tensor

from ..atomic import atomic_torch_save

__all__ = ["CorruptImageError", "LabeledImages", "decode_image_folder", "default_cache_dir", "load_image_file"]

_LAYOUT_HELP = "expected ImageFolder layout '{split}/<class>/<image>' (image suffixes: {exts})"


class LabeledImages(NamedTuple):
    """Decoded images (N, 3, H, W) uint8, labels (N,) int64, and class names (index = label)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


def default_cache_dir() -> Path:
    """``$ADFQ_CACHE_DIR`` if set, else ``~/.cache/adfq_lightning``."""
    return Path(os.environ.get("ADFQ_CACHE_DIR", Path.home() / ".cache" / "adfq_lightning"))


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


def load_image_file(path: str) -> Image.Image:
    """ImageFolder's loader, as RGB, with an error naming a corrupt file (see :func:`_decode_rgb`)."""
    return _decode_rgb(path, path)
