"""Distributed calibration and evaluation: DDP over 2 processes (gloo, CPU) gives what 1 process gives.

The 2-process run goes through Lightning's own DDP launcher (``Trainer(strategy="ddp", devices=2)`` re-runs
``tests/ddp_worker.py`` as rank 1, as ``adfq-vit fit --trainer.devices 2`` does) on 127.0.0.1, in its own process
group, with a 60 s collective timeout inside and a wall-clock limit outside; whatever is left of the group is
killed when the test ends. The 1-process reference runs the same worker code in this process.

Why a tolerance at all: each rank sums the loss over its own samples and the gradients are then summed over
ranks by one all-reduce, so the 2-process gradient is ``g(rank 0 samples) + g(rank 1 samples)`` while one
process accumulates all samples in one backward pass: the same terms in another floating-point summation order.
The rounding differences (~1e-7 relative) then pass through Adam, so quantizer parameters agree to ~1e-7, not
bitwise; 1e-5 relative leaves room for that. Ranks agree with *each other* bitwise: every rank receives the same
all-reduced gradient and runs the same update.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ddp_worker
from adfq_lightning import ADFQConfig
from adfq_lightning.lightning import sharding
from adfq_lightning.reconstruction import Reconstructor, reconstructor
from adfq_lightning.api import prepare
from conftest import build_tiny, make_images

pytestmark = pytest.mark.slow  # every test here starts processes
TESTS = Path(__file__).resolve().parents[1]
WORKER = TESTS / "ddp_worker.py"
TIMEOUT_S = 300
RTOL = 1e-5

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_env() -> dict:
    """This environment minus anything that would make Lightning think a cluster launched us; 127.0.0.1 only."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))
           and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _run_process_group(cmd: list[str], log: Path, done: list[Path] = ()) -> None:
    """Run ``cmd`` (rank 0; Lightning starts the other ranks in its process group) until it exits and every
    ``done`` file exists; fail on an error or after ``TIMEOUT_S``; kill whatever of the group is left."""
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, env=_ddp_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while proc.poll() is None or not all(p.exists() for p in done):
            if proc.poll() not in (None, 0) or time.monotonic() > deadline:
                pytest.fail(f"{' '.join(cmd[1:4])}... failed or timed out (rc={proc.poll()}):\n"
                            + log.read_text(errors="replace")[-6000:])
            time.sleep(0.5)
        time.sleep(1.0)  # the other ranks leave right after rank 0 (they meet it at a final barrier)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers only
        except ProcessLookupError:
            pass
        proc.wait()


def _launch_ddp(out: Path, devices: int) -> None:
    _run_process_group([sys.executable, str(WORKER), str(out), str(devices)], out / "log.txt",
                       [out / f"done_rank{r}.json" for r in range(devices)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Results of the 2-process DDP run (rank 0 and rank 1) and of the 1-process run, for both paths."""
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
    _launch_ddp(two, 2)
    with torch.random.fork_rng(devices=[]):  # the worker seeds the global generator
        ddp_worker.main([str(one), "1"])
    load = lambda d, name: torch.load(d / f"{name}.pt", weights_only=False)  # noqa: E731 - our own files
    return {path: {"one": load(one, f"{path}_rank0"), "rank0": load(two, f"{path}_rank0"),
                   "rank1": load(two, f"{path}_rank1")} for path in ("module", "callback")}


def assert_state_dicts_match(ref: dict, other: dict, rtol: float) -> None:
    assert ref.keys() == other.keys()
    for name, a in ref.items():
        b = other[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if rtol == 0 or not a.is_floating_point():
            assert torch.equal(a, b), name
        else:
            err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)
            assert err <= rtol, f"{name}: relative difference {err:.2e} > {rtol:.0e}"


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    assert (a - b).abs().max().item() <= rtol * a.abs().max().item()


@needs_gloo
@pytest.mark.parametrize("path", ["module", "callback"])
def test_ddp_quantizer_state_and_outputs_equal_one_process(runs, path):
    """ADFQModule through Trainer(strategy='ddp', devices=2).fit, and a user module with ADFQCallback."""
    r = runs[path]
    assert_state_dicts_match(r["rank0"]["state_dict"], r["rank1"]["state_dict"], rtol=0)  # ranks agree exactly
    assert_state_dicts_match(r["one"]["state_dict"], r["rank0"]["state_dict"], rtol=RTOL)
    assert any(k.endswith("input_quantizer.scale") for k in r["one"]["state_dict"])  # the learned step sizes
    if path == "callback":  # its config corrects biases: from means over both ranks' shards
        assert any(k.endswith("bias_correction") for k in r["one"]["state_dict"])
    assert torch.equal(r["rank0"]["logits"], r["rank1"]["logits"])
    assert_close_rel(r["one"]["logits"], r["rank0"]["logits"])
    # per-module errors are global (all-reduced) values; the cache a rank holds is its shard: about half
    for s1, s2 in zip(r["one"]["stats"], r["rank0"]["stats"], strict=True):
        assert s2["init_error"] == pytest.approx(s1["init_error"], rel=RTOL)
        assert s2["final_error"] == pytest.approx(s1["final_error"], rel=RTOL)
        assert 0.4 < s2["cache_mb"] / s1["cache_mb"] < 0.6


@needs_gloo
def test_ddp_top1_top5_equal_one_process_with_padded_validation_set(runs):
    """21 validation images over 2 ranks: the DistributedSampler's padding duplicate is not counted."""
    r = runs["module"]
    assert ddp_worker.N_VAL % 2 == 1
    logits, labels = r["one"]["val_logits"], r["one"]["val_labels"]
    top1 = (logits.argmax(1) == labels).float().mean().item() * 100
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item() * 100
    assert 0 < top1 < 100 and 0 < top5 < 100  # else k/21 could equal a count over the padded 22
    for run in ("one", "rank0", "rank1"):
        for split in ("val", "test"):
            assert r[run]["evaluation"][split] == pytest.approx({"top1": top1, "top5": top5}, abs=1e-4), (run, split)
        # test(ckpt_path=last.ckpt) in a fresh module, on 1 and on 2 processes
        assert r[run]["reloaded_evaluation"]["test"] == pytest.approx({"top1": top1, "top5": top5}, abs=1e-4)
        assert torch.equal(r[run]["reloaded_logits"], r[run]["logits"])


@needs_gloo
def test_ddp_report_written_once_by_rank_zero(runs):
    import json

    r = runs["module"]["rank0"]
    root = Path(r["log_dir"]).parents[1]  # <out>/module/logs/version_0 -> <out>/module
    reports = sorted(root.rglob("adfq_report.json"))
    fit_report = Path(r["log_dir"]) / "adfq_report.json"
    assert fit_report in reports and len([p for p in reports if "reload" not in p.parts]) == 1
    report = json.loads(fit_report.read_text())
    assert report["world_size"] == 2 and report["evaluation"]["val"]["top1"] == pytest.approx(
        r["evaluation"]["val"]["top1"])
    assert [m["cache_mb"] for m in report["modules"]] == [s["cache_mb"] for s in r["stats"]]


@needs_gloo
def test_cli_fit_and_test_with_ddp(tmp_path):
    """``adfq-vit fit --trainer.strategy ddp --trainer.devices 2`` then ``test --ckpt_path``: exits 0, no hang.

    Covers what the Trainer-level runs do not: the CLI's evaluation after ``fit`` and its summary (``log_dir`` is
    a broadcast under DDP, so every rank must ask for it), and a clean process-group shutdown (exit code 0).
    """
    import json

    import yaml
    from robust_helpers import TINY_TIMM_VIT

    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "root"),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "logs"}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True,
                                                 "save_top_k": 0}}]},
        "model": {"model": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": TINY_TIMM_VIT,
                  "iters_per_step": 4, "config": {"iters": 2, "batch_size": 4, "init_samples": 8}},
        "data": {"class_path": "ddp_worker.Data"},  # 23 calibration, 21 validation/test images
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "adfq_lightning.lightning.cli"]
    _run_process_group(cli + ["fit", "--config", str(tmp_path / "config.yaml")], tmp_path / "fit.txt")
    assert "W4A4 Top-1" in (tmp_path / "fit.txt").read_text()
    fit = json.loads((tmp_path / "logs" / "version_0" / "adfq_report.json").read_text())
    assert fit["world_size"] == 2 and {"val", "val_fp"} <= set(fit["evaluation"])
    _run_process_group(cli + ["test", "--config", str(tmp_path / "config.yaml"), "--ckpt_path",
                              str(tmp_path / "ckpt" / "last.ckpt")], tmp_path / "test.txt")
    test = json.loads((tmp_path / "logs" / "version_1" / "adfq_report.json").read_text())
    assert test["evaluation"]["test"] == pytest.approx(fit["evaluation"]["val"])  # the same 21 images


# -- the pieces, without processes -------------------------------------------------------------------------------
def test_rank_without_samples_in_the_global_batch_steps():
    """A rank that draws none of an iteration's global batch skips the forward but still steps (and all-reduces).

    Before the rounding term starts (``warmup``) such a rank's loss has no gradient at all.
    """
    model, cfg = build_tiny("vit"), ADFQConfig(iters=3, batch_size=2, init_samples=2, warmup=0.5)
    prepare(model, cfg)
    # this "rank" holds samples 0 and 1 of 1000: almost every draw of 2 misses both
    engine_ = Reconstructor(model, cfg, make_images(2), torch.tensor([0, 1]), 1000)
    engine_.run()
    assert engine_.done and all(s["iters"] == 3 for s in engine_.state_dict()["stats"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unsharded_loader_under_ddp_is_split_by_rank(monkeypatch):
    """An un-sharded loader (calibration, or Trainer(use_distributed_sampler=False)): every rank iterates
    everything, each keeps (and counts) id % W."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(make_images(5), torch.zeros(5)), batch_size=2)
    monkeypatch.setattr(sharding, "world", lambda: (1, 2))
    ids, owned, n = sharding.global_positions(loader)
    assert n == 5 and ids[owned].tolist() == [1, 3]
    images, ids, n = sharding.shard_by_rank(loader, rank=1, world_size=2)
    assert n == 5 and ids.tolist() == [1, 3] and torch.equal(images, make_images(5)[[1, 3]])


def test_fewer_images_than_ranks_fails_on_every_rank(monkeypatch):
    monkeypatch.setattr(reconstructor, "world", lambda: (0, 4))
    model, cfg = build_tiny("vit"), ADFQConfig(batch_size=2)
    prepare(model, cfg)
    with pytest.raises(ValueError, match="cannot be sharded over 4 ranks"):
        Reconstructor(model, cfg, make_images(2), torch.tensor([0, 2]), 3)
