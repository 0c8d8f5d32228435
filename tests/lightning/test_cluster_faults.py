"""What a cluster does to a calibration job, on 1 and 2 CPU processes over gloo (127.0.0.1), through the real CLI.

* ``dead_rank`` / ``hung_rank``: rank 1 SIGKILLs / SIGSTOPs itself at one of three points; rank 0 stops within the
  collective timeout (30 s here) with one error naming the cause and the resume command, takes the rank it started
  down with it, and ``last.ckpt`` stays complete and resumable.
* ``preempt``: the SLURM requeue signal (a stand-in ``scontrol`` on PATH, SLURM variables as Lightning reads them)
  and SIGTERM stop the run at a training-step boundary, the same on every rank, with a checkpoint; the requeued
  job ends bit-identical to an uninterrupted one.
* ``other_world_size``: checkpointed on 2 ranks, resumed on 1, and the other way round: equal to the uninterrupted
  run within the documented 1e-5 relative.
* ``nnodes``: ``torchrun --nnodes 2 --nproc_per_node 1`` twice on this machine gives the 1-process result.

Each process runs under a wall-clock limit; whatever is left of a process group is SIGKILLed when a test ends.
Set ``ADFQ_FAULT_LOG=<file>`` to append each fault's measured stop time there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_distributed import RTOL, _ddp_env, _free_port, assert_state_dicts_match, needs_gloo
from test_robustness import cli_config

pytestmark = [pytest.mark.slow, needs_gloo]
TIMEOUT_S = 30  # collective timeout of these runs (the default is 120 s)
LIMIT_S = 240  # wall-clock limit of one process group
CLI = [sys.executable, "-m", "adfq_lightning.lightning.cli", "fit"]


def config(root: Path, devices: int, *extra_callbacks: dict) -> str:
    """test_robustness's run (4 modules x 3 iterations, one iteration per training step, ``last.ckpt`` after every
    step) on ``devices`` processes, rank 0 alone writing the final state, collectives timing out after 30 s."""
    cfg = yaml.safe_load(Path(cli_config(root, *extra_callbacks)).read_text())
    cfg["trainer"].update(devices=devices, strategy="ddp" if devices > 1 else "auto")
    cfg["trainer"]["callbacks"][1]["class_path"] = "fault_helpers.SaveFinalState"
    cfg["model"]["collective_timeout"] = TIMEOUT_S
    path = root / f"config_{devices}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def fault(root: Path, point: str, send: str, stage: int = 1, iteration: int = 1, rank: int = 1,
          hold: float = 0.0) -> dict:
    return {"class_path": "fault_helpers.FaultAt",
            "init_args": {"point": point, "rank": rank, "send": send, "stage": stage, "iteration": iteration,
                          "marker": str(root / "fault.json"), "hold": hold}}


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def launch(cmd: list[str], log: Path, env: dict | None = None,
           expect_rc: int | tuple | None = 0) -> tuple[int, float]:
    """Run ``cmd`` (rank 0; Lightning's launcher starts the other rank) to its end; (exit code, end time). The exit
    code must be ``expect_rc`` (one of them, a tuple)."""
    expected = expect_rc if isinstance(expect_rc, tuple) else (expect_rc,)
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, env=env or _ddp_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=LIMIT_S)
        ended = time.time()
    except subprocess.TimeoutExpired:
        rc, ended = None, time.time()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    if rc is None or (expect_rc is not None and rc not in expected):
        pytest.fail(f"{' '.join(cmd[2:6])}... rc={rc}, expected {expect_rc}:\n" + log.read_text(errors="replace")[-5000:])
    return rc, ended


def final_state(root: Path) -> dict:
    return torch.load(root / "final.pt", weights_only=True)


def engine_at(path: Path) -> tuple[int, int]:
    state = torch.load(path, map_location="cpu", weights_only=True)["adfq_engine"]
    return state["stage"], state["iteration"]


def assert_nothing_partial(root: Path) -> None:
    leftovers = [p.name for p in root.rglob("*") if p.name.endswith((".tmp", ".part")) or p.name.startswith(".")]
    assert not leftovers, leftovers


def uninterrupted(root: Path) -> dict:
    """The uninterrupted 1-process run's final state (same environment as the others: one thread per process)."""
    launch(CLI + ["--config", config(root, 1)], root / "log.txt")
    return final_state(root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return uninterrupted(tmp_path_factory.mktemp("reference"))


def _log_fault(row: str, seconds: float) -> None:
    if os.environ.get("ADFQ_FAULT_LOG"):
        with open(os.environ["ADFQ_FAULT_LOG"], "a") as f:
            f.write(json.dumps({"row": row, "stopped_after_s": round(seconds, 1)}) + "\n")


# -- a rank that dies or hangs ---------------------------------------------------------------------------------
#: how rank 0 ends when rank 1 dies: it reaches a collective first (1, its own report), or Lightning's launcher,
#: polling the rank it started every 5 s, finds it dead first and SIGKILLs rank 0 after the library's report (-9)
DEAD_RANK_EXITS = {1: "its connection closed",
                   -signal.SIGKILL: "rank 1 of 2 exited with code -9 (it died or was killed)"}


def assert_one_report(log_path: Path, rc: int, expected: str) -> None:
    log = log_path.read_text(errors="replace")
    errors = [line for line in log.splitlines() if line.startswith("adfq-vit: error:")]
    assert len(errors) == 1, log[-3000:]
    assert "--ckpt_path last" in errors[0]
    assert expected in errors[0], (rc, errors[0])
    assert "Traceback" not in log


@pytest.mark.parametrize("point", ["caching", "iteration", "safeguard"])
@pytest.mark.parametrize("send", ["SIGKILL", "SIGSTOP"], ids=["dead_rank", "hung_rank"])
def test_dead_or_hung_rank_stops_the_others_in_bounded_time(reference, tmp_path, send, point):
    rc, ended = launch(CLI + ["--config", config(tmp_path, 2, fault(tmp_path, point, send))], tmp_path / "log.txt",
                       expect_rc=tuple(DEAD_RANK_EXITS) if send == "SIGKILL" else 1)
    marker = json.loads((tmp_path / "fault.json").read_text())
    assert _gone(marker["pid"])  # rank 0 took the rank it started down with it (a stopped one too)
    stopped_after = ended - marker["time"]
    _log_fault(f"{send} rank 1 at {point}", stopped_after)
    assert stopped_after < (15 if send == "SIGKILL" else TIMEOUT_S + 30)
    assert_one_report(tmp_path / "log.txt", rc, DEAD_RANK_EXITS[rc] if send == "SIGKILL" else
                      "timed out: another rank stopped answering")
    # the last checkpoint is complete and holds the engine's state from before the fault
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    # the step before the fault: the last one of module 0, the first of module 1, the last of module 1
    assert engine_at(tmp_path / "ckpt" / "last.ckpt") == {"caching": (0, 3), "iteration": (1, 1), "safeguard": (1, 3)}[point]
    assert_nothing_partial(tmp_path)
    if point == "iteration":  # resume on the 2 ranks: the uninterrupted result
        launch(CLI + ["--config", config(tmp_path, 2), "--ckpt_path", "last"], tmp_path / "resume.txt")
        assert_state_dicts_match(reference, final_state(tmp_path), RTOL)


def test_dead_rank_found_by_lightnings_launcher_first_is_reported_before_its_kill(tmp_path):
    """Rank 0 busy for 8 s (past the launcher's 5 s poll) when rank 1 dies: the launcher SIGKILLs rank 0, and the
    one report with the resume command is printed before; the checkpoint is complete."""
    rc, ended = launch(CLI + ["--config", config(tmp_path, 2, fault(tmp_path, "iteration", "SIGKILL", hold=8.0))],
                       tmp_path / "log.txt", expect_rc=-signal.SIGKILL)
    marker = json.loads((tmp_path / "fault.json").read_text())
    _log_fault("SIGKILL rank 1 before an iteration, rank 0 busy 8 s", ended - marker["time"])
    assert ended - marker["time"] < 8
    assert_one_report(tmp_path / "log.txt", rc, DEAD_RANK_EXITS[rc])
    assert engine_at(tmp_path / "ckpt" / "last.ckpt") == (1, 1)
    assert_nothing_partial(tmp_path)


def _live_members(pgid: int) -> list[int]:
    """Processes of a process group that are still running (not zombies)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def test_dead_rank_0_the_rank_it_started_stops_with_one_report(tmp_path):
    """Rank 0 (which started rank 1) SIGKILLed before an iteration: rank 1 fails at its next collective and exits
    with the one-line report; the checkpoint rank 0 wrote before is complete."""
    log = tmp_path / "log.txt"
    cmd = CLI + ["--config", config(tmp_path, 2, fault(tmp_path, "iteration", "SIGKILL", rank=0))]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, env=_ddp_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.wait(timeout=LIMIT_S) == -signal.SIGKILL
        died = json.loads((tmp_path / "fault.json").read_text())["time"]
        while _live_members(proc.pid) and time.time() - died < 30:
            time.sleep(0.2)
        left = _live_members(proc.pid)
        stopped_after = time.time() - died
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"rank 1 still running {stopped_after:.0f} s after rank 0 died:\n" + log.read_text()[-3000:]
    _log_fault("SIGKILL rank 0 before an iteration", stopped_after)
    assert_one_report(log, 1, "its connection closed")
    assert engine_at(tmp_path / "ckpt" / "last.ckpt") == (1, 1)
    assert_nothing_partial(tmp_path)


@pytest.mark.parametrize("ckpt_path", ["last", "file"])
def test_corrupt_last_checkpoint_on_resume_is_one_clear_error(tmp_path, ckpt_path):
    """A truncated last.ckpt (Lightning's own writer can leave one when its temporary directory is on another
    filesystem; AtomicCheckpointIO cannot) is refused in one message naming the fix."""
    from adfq_lightning.lightning.cli import main as cli_main

    cfg = config(tmp_path, 1)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "last.ckpt").write_bytes(b"PK\x03\x04 half a checkpoint")
    arg = "last" if ckpt_path == "last" else str(tmp_path / "ckpt" / "last.ckpt")
    with pytest.raises(ValueError, match=f"--ckpt_path {arg}\\) is truncated or corrupt: resume from an earlier"):
        cli_main(["fit", "--config", cfg, "--ckpt_path", arg])


# -- preemption --------------------------------------------------------------------------------------------------
def slurm_env(root: Path) -> dict:
    """One SLURM task as Lightning reads it, and a stand-in scontrol that records its arguments."""
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {root / 'scontrol.txt'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = _ddp_env()
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NAME="adfq-vit", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
               SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost",
               PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    return env


def test_preempt_slurm_requeue_signal_checkpoints_requeues_and_resumes_bit_identical(reference, tmp_path):
    env = slurm_env(tmp_path)
    cmd = CLI + ["--config", config(tmp_path, 1, fault(tmp_path, "step_end", "SIGUSR1", rank=0))]
    launch(cmd, tmp_path / "log.txt", env, expect_rc=128 + signal.SIGUSR1)
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert engine_at(tmp_path / "hpc_ckpt_1.ckpt") == (1, 1) == engine_at(tmp_path / "ckpt" / "last.ckpt")
    assert not (tmp_path / "final.pt").exists()
    assert "requeued" in (tmp_path / "log.txt").read_text()
    # the requeued job runs the same command; Lightning resumes from the hpc checkpoint by itself
    launch(cmd, tmp_path / "requeued.txt", env)
    assert "Restored all states from the checkpoint at " + str(tmp_path / "hpc_ckpt_1.ckpt") in \
        (tmp_path / "requeued.txt").read_text()
    assert_state_dicts_match(reference, final_state(tmp_path), rtol=0)
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))  # removed once fit finished: later evaluations restore none


# -- another world size on resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_other_world_size_on_resume_equals_uninterrupted(reference, tmp_path, before, after):
    """Preempted (SIGTERM to one rank: every rank stops at the same step) on ``before`` ranks, resumed on
    ``after``."""
    launch(CLI + ["--config", config(tmp_path, before, fault(tmp_path, "step_end", "SIGTERM", rank=before - 1))],
           tmp_path / "log.txt", expect_rc=128 + signal.SIGTERM)
    assert engine_at(tmp_path / "ckpt" / "last.ckpt") == (1, 1)
    assert not (tmp_path / "final.pt").exists()
    launch(CLI + ["--config", config(tmp_path, after), "--ckpt_path", "last"], tmp_path / "resume.txt")
    assert_state_dicts_match(reference, final_state(tmp_path), RTOL)


# -- several nodes -------------------------------------------------------------------------------------------------
def test_nnodes_two_torchrun_nodes_on_loopback_equal_one_process(reference, tmp_path):
    env, port = _ddp_env(), _free_port()
    cfg = config(tmp_path, 1)
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "adfq_lightning.lightning.cli", "fit", "--config", cfg, "--trainer.strategy", "ddp",
               "--trainer.num_nodes", "2"]
        log = (tmp_path / f"node{node}.txt").open("wb")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    try:
        rcs = [p.wait(timeout=LIMIT_S) for p, _ in procs]
    finally:
        for p, log in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
            log.close()
    assert rcs == [0, 0], (tmp_path / "node0.txt").read_text(errors="replace")[-3000:]
    assert_state_dicts_match(reference, final_state(tmp_path), RTOL)
