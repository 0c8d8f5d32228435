"""Callbacks that a CLI subprocess of tests/lightning/test_cluster_faults.py imports (``PYTHONPATH=tests``): a rank
that signals itself at a known point of the calibration, and the final state written by rank 0."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from adfq_lightning.reconstruction import Reconstructor


class FaultAt(Callback):
    """Rank ``rank`` sends itself the signal ``send`` (SIGKILL, SIGSTOP, SIGTERM, SIGUSR1...) at ``point`` of module
    ``stage``:

    * ``caching``: as the module's stage starts (the other ranks cache its inputs, then wait in the gather of the
      initialisation inputs);
    * ``iteration``: before iteration ``iteration`` (the others wait in the gradient all-reduce);
    * ``safeguard``: as the module's reconstruction ends (the others wait in the held-out error all-reduce the
      safeguard decides on);
    * ``step_end``: at the end of the training step after which the engine is at (``stage``, ``iteration``).

    Just before, it writes ``marker`` (time and pid). It fires once: not again if ``marker`` exists. With ``hold``
    seconds, the other ranks stay busy that long at the same point, past a poll of Lightning's launcher.
    """

    def __init__(self, point: str, rank: int, send: str, stage: int, iteration: int, marker: str,
                 hold: float = 0.0) -> None:
        self.point, self.rank, self.signum = point, rank, int(getattr(signal, send))
        self.stage, self.iteration, self.marker, self.hold = stage, iteration, Path(marker), hold
        self.global_rank = None
        if point in ("caching", "iteration", "safeguard"):
            self._patch()

    def _fire(self) -> None:
        if self.global_rank != self.rank:
            time.sleep(self.hold)
        elif not self.marker.exists():
            self.marker.write_text(json.dumps({"time": time.time(), "pid": os.getpid()}))
            os.kill(os.getpid(), self.signum)

    def _patch(self) -> None:
        name = {"caching": "prepare_stage", "iteration": "step", "safeguard": "finish_stage"}[self.point]
        original, fault = getattr(Reconstructor, name), self

        def patched(engine, *args, **kwargs):
            if engine.stage == fault.stage and (fault.point != "iteration" or engine.iteration == fault.iteration):
                fault._fire()
            return original(engine, *args, **kwargs)

        setattr(Reconstructor, name, patched)

    def setup(self, trainer, pl_module, stage) -> None:
        self.global_rank = trainer.global_rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine = pl_module.engine
        if self.point == "step_end" and (engine.stage, engine.iteration) == (self.stage, self.iteration):
            self._fire()


class SaveFinalState(Callback):
    """Rank 0 writes the quantized model's state_dict when fit ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save(pl_module.model.state_dict(), self.path)

