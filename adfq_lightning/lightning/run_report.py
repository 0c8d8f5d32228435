"""The run report (``adfq_report.json``) of a Trainer run, written by global rank 0; built by the core's
:func:`~adfq_lightning.quantization_report.build_report`, as ``quantize(..., report=True)`` builds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from ..atomic import atomic_write
from ..config import ADFQConfig
from ..quantization_report import build_report

REPORT_NAME = "adfq_report.json"

__all__ = ["REPORT_NAME", "build_report", "write_report", "write_run_report"]


def write_report(report: dict, log_dir: Union[str, Path]) -> Path:
    path = Path(log_dir) / REPORT_NAME
    atomic_write(path, json.dumps(report, indent=2, default=float).encode())
    return path


def write_run_report(trainer, config: ADFQConfig, stages: list, model_name: str, evaluation: Optional[dict] = None,
                     allocation: Optional[dict] = None) -> tuple[Optional[Path], dict]:
    """Write a Trainer run's report into its log directory from global rank 0; returns (its path, None on other
    ranks; the report).

    Every rank must call it: ``trainer.log_dir`` is a broadcast under DDP.
    """
    log_dir = trainer.log_dir or trainer.default_root_dir
    report = build_report(config, stages, model_name, trainer.world_size, evaluation, allocation)
    if not trainer.is_global_zero:
        return None, report
    return write_report(report, log_dir), report
