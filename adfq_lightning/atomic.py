"""Atomic file writes: every file adfq-lightning writes is complete or absent, never half written."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Union

import torch

__all__ = ["atomic_torch_save", "atomic_write"]

_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def atomic_write(path: Union[str, Path], data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it.

    A crash or a full disk leaves the previous file intact and never a truncated one that looks complete.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path} ({err.strerror or err}): choose a writable path") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; the file gets the mode open() would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: object, path: Union[str, Path]) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())
