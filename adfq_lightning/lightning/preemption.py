"""Preemption of ``ADFQModule.fit``: a requeue signal becomes a checkpoint at the next training-step boundary, the
same on every rank, then the run stops so that the job can be requeued and resumed where it left off.

Lightning's own SLURM handler saves a checkpoint from inside the signal handler, wherever the run is (in the middle
of an optimizer step, of a module's calibration), and only on the rank that got the signal. Here the handler only
takes note; at the end of each training step the ranks agree (one scalar all-reduce) whether any got a signal, and
then every rank takes part in the same checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

from ..reconstruction.cross_rank import all_reduce_sum


class Preempted(Exception):
    """The run stopped at a requeue/termination signal after writing a resumable checkpoint."""

    def __init__(self, signum: int, paths: list[str], requeued: Optional[str]) -> None:
        self.signum, self.paths, self.requeued = signum, paths, requeued
        then = (f"the SLURM job {requeued} was requeued and resumes from the checkpoint by itself" if requeued else
                "resume with the same command and --ckpt_path last (or the path above)")
        super().__init__(f"stopped at {signal.Signals(signum).name}: checkpoint written at a training-step boundary "
                         f"to {', '.join(paths)}; {then}.")


def _requeue_signal(trainer: pl.Trainer) -> tuple[int, bool]:
    """(the signal that asks for a requeue, whether this library requeues the job itself on it)."""
    env = getattr(trainer.strategy, "cluster_environment", None)  # a single-device strategy holds none
    if env is None and SLURMEnvironment.detect():
        env = SLURMEnvironment()
    if isinstance(env, SLURMEnvironment):
        return int(env.requeue_signal or signal.SIGUSR1), bool(env.auto_requeue)
    return int(signal.SIGUSR1), False


def _next_hpc_path(folder: str) -> str:
    """``hpc_ckpt_<n+1>.ckpt``: the name Lightning resumes from by itself in a requeued SLURM job."""
    numbers = [int(m.group(1)) for p in Path(folder).glob("hpc_ckpt_*.ckpt")
               if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return os.path.join(folder, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def _job_id() -> str:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_-]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return job


class PreemptionHandler:
    """Installed at the start of training (after Lightning registered its handlers, which it restores at the end)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.requeue_signal, self.requeues = int(signal.SIGUSR1), False

    def _note(self, signum: int, frame) -> None:
        self.received = signum

    def install(self, trainer: pl.Trainer) -> None:
        self.received = None
        self.requeue_signal, self.requeues = _requeue_signal(trainer)
        for signum in {self.requeue_signal, int(signal.SIGTERM)}:
            signal.signal(signum, self._note)

    def stop_if_signalled(self, trainer: pl.Trainer) -> None:
        """At a training-step boundary, on every rank: if any rank got a signal, write the checkpoint (every rank
        takes part, rank 0 writes), requeue the SLURM job on the requeue signal, and raise :class:`Preempted`."""
        got = torch.tensor([float(self.received == self.requeue_signal), float(self.received is not None)],
                           device=trainer.strategy.root_device)
        requeue_asked, any_signal = all_reduce_sum(got, "agreement on a stop signal").tolist()
        if not any_signal:
            return
        signum = self.requeue_signal if requeue_asked else int(signal.SIGTERM)
        requeue = bool(requeue_asked) and self.requeues
        paths = [os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
                 for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath]
        if requeue or not paths:
            paths.append(_next_hpc_path(str(trainer.default_root_dir)))
        for path in paths:
            trainer.save_checkpoint(path)
        requeued = None
        if requeue and trainer.is_global_zero:
            requeued = _job_id()
            subprocess.call(["scontrol", "requeue", requeued])
        raise Preempted(signum, paths, requeued if requeue else None)

    @staticmethod
    def finished(trainer: pl.Trainer) -> None:
        """Once ``fit`` finished, rank 0 removes the ``hpc_ckpt_*.ckpt`` of earlier preemptions: Lightning restores the
        newest one into any later ``validate``/``test`` of a SLURM job that passes no ``ckpt_path``, which would put
        a mid-run state back into the finished model. Every rank must call this."""
        if trainer.is_global_zero:
            for path in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"):
                path.unlink(missing_ok=True)
        trainer.strategy.barrier("adfq_preemption_checkpoints_removed")
