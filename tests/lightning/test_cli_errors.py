"""``adfq-vit`` and ``adfq-vit-export`` print the library's own errors as one message with its fix; the traceback
only with ``ADFQ_DEBUG=1``. And the CLI says what it is, with no machine-specific default."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from adfq_lightning.lightning.cli import main as cli_main
from adfq_lightning.lightning.export_cli import main as export_main

ROOT = Path(__file__).resolve().parents[2]
VIT = str(ROOT / "configs/cifar10/vit_w4a4.yaml")


def _one_line_error(capsys, monkeypatch, args: list[str], prog: str = "adfq-vit") -> str:
    """Run ``prog`` as the command line does (arguments from ``sys.argv``) and return its one error line."""
    monkeypatch.setattr(sys, "argv", [prog, *args])
    with pytest.raises(SystemExit) as exit_:
        (cli_main if prog == "adfq-vit" else export_main)()
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and err.strip().endswith("(set ADFQ_DEBUG=1 to see the traceback)"), err[-2000:]
    return lines[0]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("ADFQ_DEBUG", raising=False)


def test_bad_bits_are_one_line(capsys, monkeypatch):
    line = _one_line_error(capsys, monkeypatch, ["fit", "--config", VIT, "--model.config.w_bits", "9"])
    assert "w_bits=9 is not supported: use an integer from 2 to 8." in line


def test_debug_switch_gives_the_traceback(monkeypatch):
    monkeypatch.setenv("ADFQ_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["adfq-vit", "fit", "--config", VIT, "--model.model", "vit_nope_patch16"])
    with pytest.raises(ValueError, match="unknown model"):  # the exception itself: Python prints its traceback
        cli_main()


def test_called_from_python_the_tools_raise():
    with pytest.raises(ValueError, match="unknown model"):
        cli_main(["fit", "--config", VIT, "--model.model", "vit_nope_patch16"])


def test_unknown_model_is_one_line(capsys, monkeypatch):
    line = _one_line_error(capsys, monkeypatch, ["fit", "--config", VIT, "--model.model", "vit_nope_patch16"])
    assert "unknown model 'vit_nope_patch16'" in line and "timm.list_models" in line


def test_missing_data_root_is_one_line(capsys, monkeypatch, tmp_path):
    line = _one_line_error(capsys, monkeypatch, [
        "fit", "--config", VIT, "--data", "adfq_lightning.lightning.ImageFolderDataModule",
        "--data.root", str(tmp_path / "nowhere"), "--trainer.logger", "false"])
    assert "No 'train' directory under" in line and "root/train/<class>/<image>" in line


def test_a_callback_on_adfq_module_is_one_line(capsys, monkeypatch, tmp_path):
    line = _one_line_error(capsys, monkeypatch, [
        "fit", "--config", VIT, "--trainer.callbacks+=adfq_lightning.ADFQCallback", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path)])
    assert "remove ADFQCallback" in line


def test_export_of_a_checkpoint_of_another_kind_is_one_line(capsys, monkeypatch, tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = __import__("torch").nn.Linear(2, 2)

    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    trainer.strategy.connect(Plain())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    line = _one_line_error(capsys, monkeypatch, ["--ckpt_path", str(tmp_path / "plain.ckpt"), "--output",
                                                 str(tmp_path / "x")], prog="adfq-vit-export")
    assert "neither by adfq-vit fit nor by a Trainer with ADFQCallback" in line and "export_quantized()" in line


def test_help_says_what_the_tool_does(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert "Lightning Trainer command line tool" not in out
    assert "post-training quantization" in out and "ADFQ_DEBUG" in out


def test_print_config_has_no_machine_specific_default(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", VIT, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["archive_path"] is None


def test_a_missing_cifar_archive_names_the_fix(tmp_path, monkeypatch):
    from adfq_lightning.lightning import CIFAR10DataModule

    monkeypatch.setenv("ADFQ_CIFAR10_ARCHIVE", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(FileNotFoundError, match=r"archive not found: .*absent.tar.gz.*archive_path=.*source='bundle'"):
        CIFAR10DataModule("archive").setup()


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path):
    import os
    import shutil
    import subprocess

    command = shutil.which("adfq-vit")
    args = [command] if command else [sys.executable, "-m", "adfq_lightning.lightning.cli"]
    env = {k: v for k, v in os.environ.items() if k != "ADFQ_DEBUG"}
    done = subprocess.run([*args, "fit", "--config", VIT, "--model.config.w_bits", "9"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "adfq-vit: error: w_bits=9 is not supported: use an integer from 2 to 8." in done.stderr


def test_a_rank_lightnings_launcher_found_dead_is_reported_once_with_the_resume_command(capsys):
    """Lightning's launcher logs a started rank's death, then SIGKILLs every rank: the report comes first, once,
    even when rank 0 also reaches the failed collective before the kill."""
    import logging

    from adfq_lightning.lightning.faults import LAUNCHER_LOGGER, stop_after_failure

    launcher_log = logging.getLogger(LAUNCHER_LOGGER)
    handlers_before = list(launcher_log.handlers)
    with pytest.raises(SystemExit) as exit_:
        with stop_after_failure(["fit", "--config", "c.yaml"], command_line=True):
            launcher_log.info("[rank: 1] Child process with PID 7 terminated with code -9. Forcefully terminating "
                              "all other processes to avoid zombies")
            raise RuntimeError("Connection closed by peer")
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("adfq-vit: error: rank 1 of 1 exited with code -9 (it died or was killed)")
    assert err[0].endswith("Resume with: adfq-vit fit --config c.yaml --ckpt_path last")
    assert launcher_log.handlers == handlers_before
