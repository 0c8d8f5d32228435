"""Your own Lightning project, end to end: quantize with ADFQCallback, see how it went, reload, export, and the
mistakes refused in one line."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from adfq_lightning import ADFQCallback, ADFQConfig, ADFQModule, quantize
from adfq_lightning.export import load_exported
from adfq_lightning.lightning import load_quantized_checkpoint
from adfq_lightning.lightning.cli import main as cli_main
from adfq_lightning.lightning.export_cli import main as export_main

from conftest import build_tiny, make_images
from lightning_helpers import UserClassifier

TINY = dict(iters=2, batch_size=4, init_samples=8)
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                pretrained_cfg_overlay=dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3))


class Images(pl.LightningDataModule):
    """Calibration images as the training loader, labelled images for validation/test."""

    def __init__(self) -> None:
        super().__init__()
        self.calib = TensorDataset(make_images(16, seed=3), torch.zeros(16, dtype=torch.long))
        self.val = TensorDataset(make_images(8, seed=4), torch.arange(8) % 10)

    def train_dataloader(self):
        return DataLoader(self.calib, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=8)

    test_dataloader = val_dataloader


class NoCalibration(Images):
    def train_dataloader(self):
        raise AssertionError("a refused setup must stop before calibration")


def _trainer(tmp_path: Path, callbacks: list) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                      enable_model_summary=False, enable_progress_bar=False, callbacks=callbacks)


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    """A user's Swin classifier quantized by ADFQCallback in ``validate``, its checkpoint saved."""
    root = tmp_path_factory.mktemp("own_project")
    user, callback = UserClassifier(), ADFQCallback(ADFQConfig(**TINY), num_calib=16)
    trainer = _trainer(root, [callback])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.validate(user, datamodule=Images(), verbose=False)
    trainer.save_checkpoint(root / "quantized.ckpt")
    return user, root, out.getvalue()


def test_callback_says_the_cost_an_eta_and_ends_with_a_summary(quantized_run):
    _, root, printed = quantized_run
    assert "ADFQCallback: 11 modules x 2 iterations = 22 reconstruction iterations" in printed
    assert "first module took" in printed and "for the other 10" in printed
    assert "ADFQ W4A4 SwinTransformer: 11 modules quantized in" in printed
    assert f"Per-module report: {root / 'adfq_report.json'}" in printed


def test_every_path_gives_the_same_report(quantized_run, tmp_path, capsys):
    _, root, _ = quantized_run
    callback_report = json.loads((root / "adfq_report.json").read_text())
    _, python_report = quantize(build_tiny("swin"), make_images(16, seed=3), ADFQConfig(**TINY), report=True)
    module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, config=ADFQConfig(**TINY))
    pl.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, max_epochs=-1,
               num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False).fit(
        module, datamodule=Images())
    module_report = json.loads((tmp_path / "adfq_report.json").read_text())
    printed = capsys.readouterr().out
    assert "ADFQModule: 6 modules x 2 iterations" in printed
    assert "ADFQ W4A4 vit_tiny_patch16_224: 6 modules quantized" in printed
    assert f"Per-module report: {tmp_path / 'adfq_report.json'}" in printed
    assert set(callback_report) == set(python_report) == set(module_report)
    fields = [{k for m in r["modules"] for k in m} for r in (callback_report, python_report, module_report)]
    assert fields[0] == fields[1] == fields[2]
    assert callback_report["modules"] == [json.loads(json.dumps(m, default=float)) for m in callback_report["modules"]]


def test_reloading_the_callback_checkpoint_is_silent_and_exact(quantized_run):
    user, root, _ = quantized_run
    x = make_images(4, seed=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = load_quantized_checkpoint(UserClassifier, root / "quantized.ckpt")
    assert not [w for w in caught if "Found keys" in str(w.message)], [str(w.message)[:200] for w in caught]
    assert torch.equal(module(x), user(x))


def test_adfq_vit_export_takes_a_callback_checkpoint(quantized_run, capsys):
    user, root, _ = quantized_run
    export_main(["--ckpt_path", str(root / "quantized.ckpt"), "--output", str(root / "exports" / "user")])
    assert "exported" in capsys.readouterr().out
    x = make_images(4, seed=7)
    with torch.no_grad():
        assert torch.equal(load_exported(root / "exports" / "user.safetensors")(x), user(x))


def test_an_older_callback_checkpoint_is_refused_in_one_line_naming_the_python_call(quantized_run, tmp_path,
                                                                                  capsys, monkeypatch):
    _, root, _ = quantized_run
    checkpoint = torch.load(root / "quantized.ckpt", weights_only=True)
    for state in checkpoint["callbacks"].values():
        state.pop("model", None)  # written before the callback stored the architecture
    torch.save(checkpoint, tmp_path / "old.ckpt")
    monkeypatch.setattr(sys, "argv", ["adfq-vit-export", "--ckpt_path", str(tmp_path / "old.ckpt"), "--output",
                                      str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exit_:
        export_main()  # as on the command line
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert "load_quantized_checkpoint(MyModule, path)" in err and "export_quantized(" in err


def test_adfq_vit_test_refuses_a_callback_checkpoint_in_one_line(quantized_run, capsys, monkeypatch):
    _, root, _ = quantized_run
    monkeypatch.setattr(sys, "argv", ["adfq-vit", "test", "--config", str(Path(__file__).resolve().parents[2] /
                                      "configs/cifar10/vit_w4a4.yaml"), "--ckpt_path", str(root / "quantized.ckpt")])
    with pytest.raises(SystemExit) as exit_:
        cli_main()  # as on the command line
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err and "does not accept option" not in err
    assert "saved by ADFQCallback in your own Trainer" in err and "load_quantized_checkpoint(MyModule, path)" in err


def test_callback_on_an_adfq_module_is_refused_before_calibrating(tmp_path):
    module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, config=ADFQConfig(**TINY))
    with pytest.raises(ValueError, match="ADFQModule quantizes itself: remove ADFQCallback"):
        _trainer(tmp_path, [ADFQCallback(ADFQConfig(**TINY))]).fit(module, datamodule=NoCalibration())


def test_two_callbacks_are_refused_before_calibrating(tmp_path):
    callbacks = [ADFQCallback(ADFQConfig(**TINY)), ADFQCallback(ADFQConfig(**TINY))]
    with pytest.raises((RuntimeError, ValueError), match="more than one (stateful callback of type .)?ADFQCallback"):
        _trainer(tmp_path, callbacks).validate(UserClassifier(), datamodule=NoCalibration(), verbose=False)


def test_the_own_project_example_runs_end_to_end(tmp_path, capsys):
    import runpy

    example = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "quantize_my_lightning_module.py"))
    accuracy = example["main"](iters=2, num_calib=16, limit_val_batches=2, root=str(tmp_path))
    printed = capsys.readouterr().out
    assert 0.0 <= accuracy <= 1.0 and "FP accuracy" in printed and "W4A4 accuracy" in printed
    assert "the export agrees with the reloaded model" in printed and (tmp_path / "vit_w4a4.safetensors").is_file()
    assert "ADFQCallback: 14 modules x 2 iterations" in printed and "Per-module report:" in printed
