"""How ``adfq-vit`` ends when a rank dies or hangs, or when the job is preempted: one message naming the cause and
what to run next, and a bounded stop (rank 0 of Lightning's own launcher takes the ranks it started down with it)."""

from __future__ import annotations

import logging
import re
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch.distributed as dist

from ..reconstruction.cross_rank import CollectiveError, cause, world
from .preemption import Preempted

#: the Trainer of the running command, so that a failing rank 0 can stop the ranks its launcher started
RUNNING: dict = {"trainer": None}
#: the logger of Lightning's launcher, which logs a started rank's death just before it SIGKILLs every rank
LAUNCHER_LOGGER = "lightning.fabric.strategies.launchers.subprocess_script"

#: what torch's backends say when a peer's connection closed or a collective timed out
_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting", "timed out",
            "Application timeout caused pair closure", "Socket Timeout", "NCCL communicator was aborted")


class RankFailure(RuntimeError):
    """Another rank died or stopped answering; the run stopped."""


def rank_failure(err: Optional[BaseException]) -> Optional[str]:
    """What went wrong between the ranks, if ``err`` (or an error it came from) is such a failure."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, CollectiveError):
            return str(err)
        if (isinstance(err, getattr(dist, "DistError", ())) or isinstance(err, RuntimeError)) and \
                any(m in str(err) for m in _MARKERS):
            rank, size = world()
            return (f"rank {rank} of {size}: a collective of Lightning's failed: {cause(err, bounded=False)} "
                    f"({str(err).splitlines()[0][:160]})")
        err = err.__cause__ or err.__context__
    return None


def _corrupt_checkpoint(err: Optional[BaseException]) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if "PytorchStreamReader failed" in str(err) or "failed finding central directory" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def ckpt_path_arg(argv: list[str]) -> Optional[str]:
    """The value of ``--ckpt_path`` among command-line arguments, if given."""
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


def resume_command(argv: list[str]) -> str:
    """The command that resumes this ``fit``: the same arguments, ``--ckpt_path last``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["adfq-vit", *kept, "--ckpt_path", "last"])


class _LauncherStopReport(logging.Handler):
    """Lightning's launcher polls the ranks it started every few seconds; when one has died, it logs so and SIGKILLs
    every rank, rank 0 included, which can come before rank 0 reaches a collective and reports the failure itself.
    This prints the same one-line report, with the resume command, before that kill."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__(logging.INFO)
        self.argv = argv
        self.reported = threading.Lock()  # one report of a failure between ranks, whichever thread notices first

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"\[rank: (\d+)\].*terminated with code (-?\d+)", record.getMessage())
        if found is None or not self.reported.acquire(blocking=False):
            return
        rank, code = found.groups()
        sys.stderr.write(f"adfq-vit: error: rank {rank} of {world()[1]} exited with code {code} (it died or was "
                         "killed); Lightning's launcher now stops every rank with SIGKILL (exit status 137). The "
                         f"calibration stopped; the checkpoints written before are complete. Resume with: "
                         f"{resume_command(self.argv)}\n")
        sys.stderr.flush()


def _stop_started_ranks() -> None:
    trainer = RUNNING["trainer"]
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if launcher is not None and hasattr(launcher, "procs"):  # Lightning's own launcher: rank 0 started the others
        launcher.kill(signal.SIGKILL)  # a stopped (SIGSTOP) rank only goes away with SIGKILL


def _leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def stop_after_failure(argv: list[str], command_line: bool) -> Iterator[None]:
    """Around the CLI: a failure between ranks becomes a :class:`RankFailure` naming its cause and the resume
    command (one line on the command line); a preemption prints where the checkpoint is and exits with
    ``128 + signal`` (as a process stopped by that signal) after the ranks left the process group together."""
    report = _LauncherStopReport(argv)
    if command_line:
        logging.getLogger(LAUNCHER_LOGGER).addHandler(report)
    try:
        yield
    except Preempted as stop:
        if not command_line:
            raise
        rank = world()[0]
        _leave_process_group()
        if rank == 0:
            sys.stderr.write(f"adfq-vit: {stop}\n")
        raise SystemExit(128 + stop.signum) from None
    except BaseException as err:
        if _corrupt_checkpoint(err):
            raise ValueError(f"the checkpoint to resume from (--ckpt_path {ckpt_path_arg(argv)}) is truncated or corrupt: "
                             "resume from an earlier checkpoint file with --ckpt_path <file>. A checkpoint written "
                             "with --trainer.plugins adfq_lightning.lightning.AtomicCheckpointIO is either complete "
                             "or not there") from err
        cause = rank_failure(err)
        if cause is None:
            raise
        if command_line and not report.reported.acquire(blocking=False):  # the launcher reported; its kill follows
            raise SystemExit(1) from None
        _stop_started_ranks()
        raise RankFailure(f"{cause}. The calibration stopped; the checkpoints written before are complete. Resume "
                          f"with: {resume_command(argv)}") from err
    finally:
        logging.getLogger(LAUNCHER_LOGGER).removeHandler(report)
