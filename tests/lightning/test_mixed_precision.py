"""A bit budget through Lightning: ``adfq-vit fit`` with ``model.config.bit_budget`` in YAML and ``ADFQCallback``
allocate the widths on the calibration images, keep them in checkpoints and the report, resume and evaluate."""

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

from adfq_lightning import ADFQCallback, ADFQConfig
from adfq_lightning.lightning.cli import main as cli_main
from adfq_lightning.modules import QuantLinear

from test_own_project import TINY, Images, _trainer
from lightning_helpers import UserClassifier
from test_robustness import cli_config

TESTS = Path(__file__).resolve().parents[1]
BUDGET = {"w_bits": 3.5, "a_bits": 4.5, "candidates": [3, 4, 6]}


def mixed_config(root: Path, **trainer) -> str:
    cfg = yaml.safe_load(Path(cli_config(root)).read_text())
    cfg["model"]["config"]["bit_budget"] = BUDGET
    cfg["trainer"].update(trainer)
    path = root / "mixed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def block_widths(state_or_model) -> dict:
    return {n: m.weight_quantizer.bits for n, m in state_or_model.named_modules()
            if isinstance(m, QuantLinear) and n.startswith("blocks.")}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_cli")
    cli_main(["fit", "--config", mixed_config(root)])
    return root


def test_cli_fit_allocates_and_keeps_the_widths_in_checkpoint_and_report(cli_run):
    report = json.loads((cli_run / "adfq_report.json").read_text())
    allocation = report["allocation"]
    assert allocation["budget"]["w_bits"] == 3.5 and allocation["reached"]["w_bits"] <= 3.5
    assert allocation["reached"]["a_bits"] <= 4.5
    assert {layer["bits"] for layer in allocation["layers"]} <= {3, 4, 6}
    assert all(set(layer["kl"]) == {"3", "4", "6"} for layer in allocation["layers"])
    saved = torch.load(cli_run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert saved["config"]["bit_budget"] is None  # the checkpoint holds the widths, not the budget
    chosen = {layer["name"] for layer in allocation["layers"] if layer["kind"] == "weights"}
    assert chosen <= set(saved["config"]["overrides"])


def test_validate_with_the_budget_config_takes_the_checkpoints_widths(cli_run):
    cli_main(["validate", "--config", str(cli_run / "mixed.yaml"), "--ckpt_path", str(cli_run / "ckpt" / "last.ckpt")])
    report = json.loads((cli_run / "adfq_report.json").read_text())
    assert "val" in report["evaluation"]
    assert report["config"]["bit_budget"] is None
    assert {layer["name"] for layer in report.get("allocation", {}).get("layers", [])} == set()  # not allocated again
    fit = torch.load(cli_run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert report["config"]["overrides"] == fit["config"]["overrides"]


@pytest.mark.slow
def test_resumed_mixed_fit_ends_where_the_uninterrupted_one_does(cli_run, tmp_path):
    """SIGKILLed inside module 1 and resumed from last.ckpt: the allocation runs again, gives the checkpoint's
    widths, and the result is bit-identical to the uninterrupted run's."""
    ready = tmp_path / "ready.json"
    pause = {"class_path": "robust_helpers.PauseAt", "init_args": {"stage": 1, "iteration": 1, "ready": str(ready)}}
    cfg = yaml.safe_load(Path(mixed_config(tmp_path)).read_text())
    cfg["trainer"]["callbacks"].append(pause)
    paused = tmp_path / "paused.yaml"
    paused.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "adfq_lightning.lightning.cli", "fit", "--config", str(paused)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    cli_main(["fit", "--config", mixed_config(tmp_path), "--ckpt_path", "last"])
    resumed = torch.load(tmp_path / "final.pt", weights_only=True)
    reference = torch.load(cli_run / "final.pt", weights_only=True)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_callback_allocates_under_its_configs_budget(tmp_path):
    user = UserClassifier()
    callback = ADFQCallback(ADFQConfig(**TINY, bit_budget=BUDGET), num_calib=16)
    _trainer(tmp_path, [callback]).validate(user, datamodule=Images(), verbose=False)
    widths = block_widths(user)
    assert set(widths.values()) <= {3, 4, 6}
    assert callback.config.bit_budget is None and set(widths) <= set(callback.config.overrides)
    report = json.loads((tmp_path / "adfq_report.json").read_text())
    assert report["allocation"]["reached"]["w_bits"] <= 3.5


def test_validate_with_a_budget_and_no_checkpoint_says_to_give_one(tmp_path):
    with pytest.raises(ValueError, match="--ckpt_path"):
        cli_main(["validate", "--config", mixed_config(tmp_path)])
