"""The run report (``adfq_report.json``): what a Trainer run did, written by global rank 0."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Optional, Union

import torch

from ..config import ADFQConfig
from ..atomic import atomic_write

REPORT_NAME = "adfq_report.json"


def package_versions() -> dict[str, str]:
    import jsonargparse
    import lightning
    import timm
    import torchmetrics

    from .. import __version__

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
