"""``adfq-vit`` and ``adfq-vit-export`` print the library's own errors as one message with its fix; the traceback
only with ``ADFQ_DEBUG=1``. And the CLI says what it is, with no machine-specific default."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from adfq_lightning.lightning.cli import main as cli_main
from adfq_lightning.lightning.export_cli import main as export_main

ROOT = Path(__file__).resolve().parents[2]
VIT = str(ROOT / "configs/cifar10/vit_w4a4.yaml")


def _one_line_error(capsys, run, prog: str = "adfq-vit") -> str:
    with pytest.raises(SystemExit) as exit_:
        run()
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and err.strip().endswith("(set ADFQ_DEBUG=1 to see the traceback)"), err[-2000:]
    return lines[0]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("ADFQ_DEBUG", raising=False)


def test_bad_bits_are_one_line(capsys):
    line = _one_line_error(capsys, lambda: cli_main(["fit", "--config", VIT, "--model.config.w_bits", "9"]))
    assert "w_bits=9 is not supported: use an integer from 2 to 8." in line


def test_debug_switch_gives_the_traceback(monkeypatch):
    monkeypatch.setenv("ADFQ_DEBUG", "1")
    with pytest.raises(ValueError):  # the exception itself, as Python prints it with its traceback
        cli_main(["fit", "--config", VIT, "--model.model", "vit_nope_patch16"])


def test_unknown_model_is_one_line(capsys):
    line = _one_line_error(capsys, lambda: cli_main(["fit", "--config", VIT, "--model.model", "vit_nope_patch16"]))
    assert "unknown model 'vit_nope_patch16'" in line and "timm.list_models" in line


def test_missing_data_root_is_one_line(capsys, tmp_path):
    line = _one_line_error(capsys, lambda: cli_main([
        "fit", "--config", VIT, "--data", "adfq_lightning.lightning.ImageFolderDataModule",
        "--data.root", str(tmp_path / "nowhere"), "--trainer.logger", "false"]))
    assert "No 'train' directory under" in line and "root/train/<class>/<image>" in line


def test_a_callback_on_adfq_module_is_one_line(capsys, tmp_path):
    line = _one_line_error(capsys, lambda: cli_main([
        "fit", "--config", VIT, "--trainer.callbacks+=adfq_lightning.ADFQCallback", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path)]))
    assert "remove ADFQCallback" in line


def test_export_of_a_checkpoint_of_another_kind_is_one_line(capsys, tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = __import__("torch").nn.Linear(2, 2)

    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    trainer.strategy.connect(Plain())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    line = _one_line_error(capsys, lambda: export_main(["--ckpt_path", str(tmp_path / "plain.ckpt"), "--output",
                                                       str(tmp_path / "x")]), prog="adfq-vit-export")
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
