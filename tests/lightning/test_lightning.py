"""The three ways in (LightningCLI, a user's own LightningModule + ADFQCallback, Python) and checkpoints."""

from __future__ import annotations

import csv
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, TensorDataset

from adfq_lightning import ADFQCallback, ADFQConfig, ADFQModule
from adfq_lightning.export import load_exported, load_program, onnx_session
from adfq_lightning.lightning import CIFAR10DataModule, ExportQuantized, ReconstructionSteps, load_quantized_checkpoint
from adfq_lightning.lightning.export_cli import main as export_main
from adfq_lightning.lightning.cli import main as cli_main
from adfq_lightning.modules import QuantAttention, QuantWindowAttention
from adfq_lightning.quantizers import AdaRoundQuantizer
from adfq_lightning.lightning import ReconstructionProgressBar

from conftest import build_tiny, make_images
from lightning_helpers import UserClassifier

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                pretrained_cfg_overlay=dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3))


class RandomImages(pl.LightningDataModule):
    """Calibration images for train_dataloader, labelled images for validation/test."""

    def __init__(self, n_calib: int = 16, n_val: int = 20, batch_size: int = 8) -> None:
        super().__init__()
        self.calib = TensorDataset(make_images(n_calib, seed=3), torch.zeros(n_calib, dtype=torch.long))
        self.val = TensorDataset(make_images(n_val, seed=4), torch.arange(n_val) % 10)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.calib, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)

    def test_dataloader(self):
        return self.val_dataloader()


def tiny_config(**changes) -> ADFQConfig:
    return ADFQConfig(**{"iters": 4, "batch_size": 4, "init_samples": 8, **changes})


def trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, max_epochs=-1,
                      num_sanity_val_steps=0, check_val_every_n_epoch=1_000_000, enable_model_summary=False,
                      **kwargs)


def test_fit_reconstructs_every_stage_as_training_steps(tmp_path):
    module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, config=tiny_config(),
                        iters_per_step=3)
    t = trainer(tmp_path, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1)
    t.fit(module, datamodule=RandomImages())
    engine = module.engine
    assert engine.done and [s.name for s in engine.stages] == [
        "patch_embed.proj", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "head"]
    assert all(s.stats["iters"] == 4 for s in engine.stages)
    assert isinstance(module.model.blocks[0].attn, QuantAttention)
    assert all(not q.soft for q in module.model.modules() if isinstance(q, AdaRoundQuantizer))
    # every module's errors and last losses reach the logger, at steps that never go back
    rows = list(csv.DictReader((Path(t.log_dir) / "metrics.csv").open()))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[-1] == 6 * 4  # global_step counts reconstruction iterations
    for stage in engine.stages:
        for key in ("init_error", "final_error", "undecided", "reverted", "rec", "round"):
            assert any(r.get(f"recon/{stage.name}/{key}") for r in rows), (stage.name, key)
    assert any(r.get("recon/blocks.0.attn/kl") for r in rows)
    assert not any(k.startswith("recon/done") for k in rows[0])
    report = json.loads((Path(t.log_dir) / "adfq_report.json").read_text())
    assert [m["name"] for m in report["modules"]] == [s.name for s in engine.stages]
    assert {"config", "versions", "seed", "modules", "evaluation"} <= set(report)
    assert report["modules"][1]["seconds"] > 0 and "blocks.0.attn.qkv.qkv_input" in report["modules"][1]["outlier_ratio"]


def test_progress_bar_shows_the_whole_run_module_and_loss(tmp_path):
    module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, config=tiny_config(),
                        iters_per_step=3)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            bar = trainer.progress_bar_callback
            seen.append((bar.get_metrics(trainer, pl_module), bar.train_progress_bar.n, bar.train_progress_bar.total))

    bar = ReconstructionProgressBar()
    trainer(tmp_path, logger=pl.loggers.CSVLogger(tmp_path), callbacks=[bar, Spy()]).fit(
        module, datamodule=RandomImages())
    assert module.trainer.progress_bar_callback is bar
    metrics = [m for m, _, _ in seen]
    assert any(m["module"] == "2/6 blocks.0.attn" for m in metrics) and metrics[-1]["module"] == "6/6 done"
    assert all("v_num" not in m for m in metrics) and all("recon/loss" in m for m in metrics)
    # one bar for the whole run: 6 modules x 4 iterations, counted in iterations, ending full
    assert {total for _, _, total in seen} == {24}
    counts = [n for _, n, _ in seen]
    assert counts == sorted(counts) and counts[-1] == 24 and counts[0] == 3


def test_quantized_checkpoint_reloads_with_identical_outputs(tmp_path):
    module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, config=tiny_config())
    t = trainer(tmp_path, logger=False)
    t.fit(module, datamodule=RandomImages())
    ckpt = tmp_path / "quantized.ckpt"
    t.save_checkpoint(ckpt)
    x = make_images(4, seed=9)
    expected = module(x)

    blob = torch.load(ckpt, weights_only=True)  # plain tensors and containers only
    assert blob["hyper_parameters"]["config"]["w_bits"] == 4
    reloaded = ADFQModule.load_from_checkpoint(ckpt).eval()
    assert isinstance(reloaded.model.blocks[0].attn, QuantAttention)
    assert torch.equal(reloaded(x), expected)

    # test --ckpt_path: the callback only swaps modules, Lightning loads the quantized state
    fresh = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, config=tiny_config())
    out = trainer(tmp_path, logger=False).test(fresh, datamodule=RandomImages(), ckpt_path=ckpt, verbose=False)
    module.set_float_mode(False)
    ref = trainer(tmp_path, logger=False).test(module, datamodule=RandomImages(), verbose=False)
    assert out[0]["test/top1"] == ref[0]["test/top1"]
    assert torch.equal(fresh(x), expected)


def test_calibration_is_deterministic_for_a_seed(tmp_path):
    states = []
    for run in range(2):
        pl.seed_everything(0)
        module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, config=tiny_config())
        trainer(tmp_path / str(run), logger=False).fit(module, datamodule=RandomImages())
        states.append(module.model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_callback_quantizes_a_users_own_lightning_module(tmp_path):
    user = UserClassifier()
    reference = build_tiny("swin")
    x = make_images(4, seed=5)
    callback = ADFQCallback(tiny_config(w_bits=8, a_bits=8), num_calib=16)
    result = trainer(tmp_path, logger=False, callbacks=[callback]).validate(user, datamodule=RandomImages())
    assert torch.isfinite(torch.tensor(result[0]["val_loss"]))
    assert isinstance(user.net.layers[0].blocks[0].attn, QuantWindowAttention)
    assert [s.stats["iters"] for s in callback.stages] == [4] * len(callback.stages)
    out, ref = user(x), reference(x)
    assert not torch.equal(out, ref) and (out - ref).abs().mean() < 0.2 * ref.abs().mean()
    assert (tmp_path / "adfq_report.json").exists()


def test_example_script_quantizes_its_own_module(tmp_path):
    example = runpy.run_path(str(ROOT / "examples" / "quantize_my_lightning_module.py"))
    accuracy = example["main"](iters=2, num_calib=16, limit_val_batches=2, root=str(tmp_path))
    assert 0.0 <= accuracy <= 1.0
    report = json.loads((tmp_path / "adfq_report.json").read_text())
    assert len(report["modules"]) == 14 and report["config"]["iters"] == 2


def test_callback_needs_calibration_images(tmp_path):
    with pytest.raises(ValueError, match="calib_dataloader"):
        trainer(tmp_path, logger=False, callbacks=[ADFQCallback(tiny_config())]).validate(
            UserClassifier(), dataloaders=RandomImages().val_dataloader())


def test_cli_print_config_shows_the_recipe(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(ROOT / "configs/cifar10/vit_w4a4.yaml"), "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "w_bits: 4" in printed and "CIFAR10DataModule" in printed and "kl_temperature: 4.0" in printed


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml")))
def test_shipped_configs_parse(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(ROOT / path), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"].endswith(
        "CIFAR10DataModule" if path.startswith("configs/cifar10/") else "ImageFolderDataModule")
    config = printed["model"]["config"]
    # every recipe keeps QDrop; the CIFAR-10 W4A4 ones run the default budget of 1,000 it/module, DeiT's and Swin's
    # with step sizes at three times the paper's rate (as far in 1,000 iterations as in 3,000), the W6A6 ones 200,
    # the ImageNet ones the paper's 3,000 (docs/method.md)
    assert config["qdrop_prob"] == ADFQConfig().qdrop_prob, path
    budget = 3000 if path.startswith("configs/imagenet/") else 1000 if path.endswith(("w4a4.yaml", "_3.5.yaml")) \
        else 200
    assert config["iters"] == budget, path
    tripled = budget == 1000 and "/vit_" not in path
    assert config["scale_lr"] == pytest.approx(1.2e-4 if tripled else ADFQConfig().scale_lr), path
    # a checkpoint every quarter of a module or less often: every 100 iterations of the paper's 3,000 wrote a
    # ViT-B checkpoint 30 times per module
    (checkpoint,) = [c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert budget // checkpoint["init_args"]["every_n_train_steps"] <= 4, path
    if path.endswith("_3.5.yaml"):
        assert config["bit_budget"] == {"w_bits": 3.5, "a_bits": 3.5, "candidates": [3, 4, 6, 8]}, path


@pytest.mark.slow
def test_cli_fit_then_test_from_checkpoint(tmp_path, capsys):
    config = str(ROOT / "configs/cifar10/vit_w4a4.yaml")
    common = ["--config", config, "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
              "--data.init_args.num_calib", "32", "--data.init_args.batch_size", "16"]
    # 14 modules x 5 iterations = 70 iterations: ModelCheckpoint(every_n_train_steps=50) saves at 50 only
    cli_main(["fit", *common, "--model.config.iters", "5", "--model.config.init_samples", "16",
              "--trainer.callbacks.init_args.every_n_train_steps", "50"])
    log_dir = tmp_path / "vit_w4a4" / "version_0"
    last = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 70 and last["adfq_engine"]["stage"] == 14  # the finished model
    report = json.loads((log_dir / "adfq_report.json").read_text())
    printed = capsys.readouterr().out
    assert "FP Top-1" in printed and "W4A4 Top-1" in printed
    assert {"val", "val_fp"} <= set(report["evaluation"])
    cli_main(["test", *common, "--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt")])
    report = json.loads((tmp_path / "vit_w4a4" / "version_1" / "adfq_report.json").read_text())
    assert report["evaluation"]["test"]["top1"] == pytest.approx(
        json.loads((log_dir / "adfq_report.json").read_text())["evaluation"]["val"]["top1"])

    # adfq-vit-export: the finished checkpoint to every format, each reproducing the quantized model
    export_main(["--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt"), "--format", "safetensors", "onnx", "pt2",
                 "--output", str(tmp_path / "exports" / "vit_w4a4")])
    reference = ADFQModule.load_from_checkpoint(log_dir / "checkpoints" / "last.ckpt").eval()
    data = CIFAR10DataModule(num_calib=8)
    data.setup("test")
    x = next(iter(data.val_dataloader()))[0][:32]
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(load_exported(tmp_path / "exports" / "vit_w4a4.safetensors")(x), expected)
        assert torch.equal(load_program(tmp_path / "exports" / "vit_w4a4.pt2")(x), expected)
    # ONNX Runtime's float kernels (Log, Erf, LayerNorm...) differ from PyTorch's in the last bits, and a value
    # on a 4-bit grid's rounding edge then takes the next code: not bit-exact, the same predictions
    got = onnx_session(tmp_path / "exports" / "vit_w4a4.onnx").run(None, {"images": x.numpy()})[0]
    assert (got.argmax(1) == expected.argmax(1).numpy()).mean() >= 30 / 32


def test_export_refuses_an_unfinished_checkpoint(tmp_path, capsys):
    module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, config=tiny_config(),
                        iters_per_step=1)
    t = trainer(tmp_path, logger=False, max_steps=3)  # stops after 3 of 24 iterations
    t.fit(module, datamodule=RandomImages())
    t.save_checkpoint(tmp_path / "partial.ckpt")
    with pytest.raises(SystemExit):
        export_main(["--ckpt_path", str(tmp_path / "partial.ckpt"), "--output", str(tmp_path / "x")])
    assert "unfinished calibration" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_export_callback_writes_the_model_at_the_end_of_fit(tmp_path):
    module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, config=tiny_config())
    export = ExportQuantized(dirpath=str(tmp_path / "exports"), formats=["safetensors"])
    trainer(tmp_path, logger=False, callbacks=[export]).fit(module, datamodule=RandomImages())
    assert export.paths == [tmp_path / "exports" / "quantized.safetensors"]
    x = make_images(3, seed=8)
    with torch.no_grad():
        assert torch.equal(load_exported(export.paths[0])(x), module(x))


class CountingImages(Dataset):
    """Calibration images that count how often they are fetched."""

    def __init__(self, n: int) -> None:
        self.images, self.fetches = make_images(n, seed=3), 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        self.fetches += 1
        return self.images[i], 0


class CalibrationData(pl.LightningDataModule):
    """The shape of the package's datamodules: calibration images apart, training batches carrying no data."""

    def __init__(self) -> None:
        super().__init__()
        self.calib = CountingImages(16)

    def calib_dataloader(self):
        return DataLoader(self.calib, batch_size=8)

    def train_dataloader(self):
        return DataLoader(ReconstructionSteps(), batch_size=None)


def test_fit_fetches_each_calibration_image_once(tmp_path):
    data = CalibrationData()
    module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, config=tiny_config(),
                        iters_per_step=2)
    trainer(tmp_path, logger=False).fit(module, datamodule=data)
    assert module.engine.done and data.calib.fetches == 16


def test_package_datamodule_train_loader_carries_no_images():
    data = CIFAR10DataModule(num_calib=8)
    data.setup("fit")
    steps = iter(data.train_dataloader())
    assert [next(steps) for _ in range(3)] == [0, 1, 2]
    images, _ = next(iter(data.calib_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32


def _user_checkpoint(tmp_path, config):
    user, callback = UserClassifier(), ADFQCallback(config, num_calib=16)
    t = trainer(tmp_path, logger=False, callbacks=[callback])
    t.validate(user, datamodule=RandomImages(), verbose=False)
    path = tmp_path / "user.ckpt"
    t.save_checkpoint(path)
    return user, path


class NoCalibration(RandomImages):
    def train_dataloader(self):
        raise AssertionError("calibrated again instead of restoring the checkpoint")


def test_callback_restores_its_checkpoint_without_recalibrating(tmp_path):
    user, path = _user_checkpoint(tmp_path, tiny_config())
    fresh, x = UserClassifier(), make_images(4, seed=6)
    trainer(tmp_path, logger=False, callbacks=[ADFQCallback(tiny_config(), num_calib=16)]).validate(
        fresh, datamodule=NoCalibration(), ckpt_path=path, verbose=False)
    assert isinstance(fresh.net.layers[0].blocks[0].attn, QuantWindowAttention)
    assert torch.equal(fresh(x), user(x))


def test_callback_refuses_a_checkpoint_of_another_recipe(tmp_path):
    _, path = _user_checkpoint(tmp_path, tiny_config())
    other = trainer(tmp_path, logger=False, callbacks=[ADFQCallback(tiny_config(w_bits=6, a_bits=6))])
    with pytest.raises(ValueError, match=r"another recipe.*w_bits=4 in the file, 6 asked"):
        other.validate(UserClassifier(), datamodule=NoCalibration(), ckpt_path=path, verbose=False)


@pytest.mark.slow
def test_quantized_user_module_reloads_in_a_fresh_process(tmp_path):
    user, path = _user_checkpoint(tmp_path, tiny_config())
    x = make_images(4, seed=6)
    torch.save({"x": x, "out": user(x).detach()}, tmp_path / "expected.pt")
    with pytest.raises(RuntimeError, match="Unexpected key"):  # what load_from_checkpoint alone does
        UserClassifier.load_from_checkpoint(path)
    script = (
        "import sys, torch\n"
        "from adfq_lightning.lightning import load_quantized_checkpoint\n"
        "from lightning_helpers import UserClassifier\n"
        "module = load_quantized_checkpoint(UserClassifier, sys.argv[1])\n"
        "expected = torch.load(sys.argv[2], weights_only=True)\n"
        "assert torch.equal(module(expected['x']), expected['out'])\n"
        "print('reloaded', type(module.net.layers[0].blocks[0].attn).__name__)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "expected.pt")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reloaded QuantWindowAttention" in done.stdout


def test_reloading_a_checkpoint_without_adfq_state_names_the_fix(tmp_path):
    t = trainer(tmp_path, logger=False)
    t.validate(UserClassifier(), datamodule=RandomImages(), verbose=False)
    t.save_checkpoint(tmp_path / "float.ckpt")
    with pytest.raises(ValueError, match="holds no ADFQCallback state"):
        load_quantized_checkpoint(UserClassifier, tmp_path / "float.ckpt")
