"""The documented SLURM recipe on a real one-node SLURM cluster (``.ci/slurm-up`` starts one where it can):
``sbatch`` with ``--requeue --signal=USR1@...``, ``srun`` starting one rank per task, and a real requeue by
``scontrol`` after the requeue signal; the requeued job resumes from Lightning's ``hpc_ckpt`` and ends where an
uninterrupted run ends. Skipped where no SLURM controller answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_cluster_faults import (CLI, RTOL, assert_state_dicts_match, config, engine_at, fault, final_state,
                                 uninterrupted)
from test_distributed import needs_gloo

TESTS = Path(__file__).resolve().parents[1]


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(state.strip() in ("idle", "mix", "alloc") for state in out.split())


pytestmark = [pytest.mark.slow, needs_gloo,
              pytest.mark.skipif(not _slurm_up(), reason="no SLURM controller answers (.ci/slurm-up starts one)")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return uninterrupted(tmp_path_factory.mktemp("reference"))


def _job_state(job: str) -> tuple[str, int]:
    """(state, restarts) of a job SLURM still knows."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=10).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", "GONE"), int(fields.get("Restarts", 0))


def test_sbatch_srun_recipe_with_a_real_requeue_ends_where_an_uninterrupted_run_ends(reference, tmp_path):
    cfg = config(tmp_path, 2, fault(tmp_path, "step_end", "SIGUSR1", rank=0))  # rank 0 gets the requeue signal
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=adfq-vit-test\n#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=2\n"
        "#SBATCH --cpus-per-task=1\n#SBATCH --signal=USR1@120\n#SBATCH --requeue\n"
        f"#SBATCH --output={tmp_path}/slurm-%j.out\n#SBATCH --open-mode=append\n"
        f"srun {' '.join(CLI)} --config {cfg} --trainer.strategy ddp --trainer.devices 2 --trainer.num_nodes 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "PL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    job = subprocess.run(["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True,
                         timeout=30, check=True).stdout.strip().split(";")[0]
    deadline, state, restarts = time.monotonic() + 420, "PENDING", 0
    try:
        while time.monotonic() < deadline:
            state, restarts = _job_state(job)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE"):
                break
            time.sleep(2)
    finally:
        if state not in ("COMPLETED", "FAILED", "CANCELLED", "GONE"):
            subprocess.run(["scancel", job], timeout=30)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("slurm-*.out")))
    assert state == "COMPLETED", f"job {job} ended {state}:\n{logs[-4000:]}"
    assert restarts == 1, logs[-4000:]  # rank 0's scontrol requeue put the job back once
    assert "requeued" in logs and "Restored all states from the checkpoint at " in logs
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert engine_at(tmp_path / "ckpt" / "last.ckpt")[0] == 4  # the run went to its end
    assert_state_dicts_match(reference, final_state(tmp_path), RTOL)
