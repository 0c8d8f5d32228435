"""The run report (``adfq_report.json``) and crash-safe file writing."""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .config import ADFQConfig

REPORT_NAME = "adfq_report.json"


def atomic_write(path: Union[str, Path], data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it.

    A crash or a full disk leaves the previous file intact and never a truncated one that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: object, path: Union[str, Path]) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written like every other adfq-lightning file: temp file beside it, fsync, rename.

    Lightning's own writer (``_atomic_save``) stages the bytes in a temporary file of the *system* temp
    directory and ``shutil.move``-s it into place: an atomic rename only when that directory is on the same
    filesystem as the checkpoint, else a plain copy that a kill or a full disk can leave half written, and
    never fsync-ed. Use ``Trainer(plugins=[AtomicCheckpointIO()])`` (CLI: ``--trainer.plugins
    adfq_lightning.report.AtomicCheckpointIO``). Remote (``scheme://``) paths go through Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict, path: Union[str, Path], storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def package_versions() -> dict[str, str]:
    import jsonargparse
    import lightning
    import timm
    import torchmetrics

    from . import __version__

    return {"adfq_lightning": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "lightning": lightning.__version__, "torchmetrics": torchmetrics.__version__,
            "jsonargparse": jsonargparse.__version__, "python": platform.python_version()}


def build_report(config: ADFQConfig, stages: list, model_name: str, world_size: int,
                 evaluation: Optional[dict] = None) -> dict:
    """Everything needed to reproduce and judge a run: config, versions, seeds, per-module results, accuracy."""
    global_seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything / LightningCLI
    return {
        "model": model_name,
        "config": config.to_dict(),
        "seed": {"reconstruction": config.seed, "global": None if global_seed is None else int(global_seed)},
        "world_size": world_size,
        "versions": package_versions(),
        "modules": [{"name": s.name, **s.stats} for s in stages],
        "evaluation": evaluation or {},
    }


def write_report(report: dict, log_dir: Union[str, Path]) -> Path:
    path = Path(log_dir) / REPORT_NAME
    atomic_write(path, json.dumps(report, indent=2, default=float).encode())
    return path


def write_run_report(trainer, config: ADFQConfig, stages: list, model_name: str,
                     evaluation: Optional[dict] = None) -> Optional[Path]:
    """Write a Trainer run's report into its log directory from global rank 0 (None on other ranks).

    Every rank must call it: ``trainer.log_dir`` is a broadcast under DDP.
    """
    log_dir = trainer.log_dir or trainer.default_root_dir
    if not trainer.is_global_zero:
        return None
    return write_report(build_report(config, stages, model_name, trainer.world_size, evaluation), log_dir)
