"""Your own model and data: timm checkpoints in their usual layouts, offline runs, ImageNet-shaped models."""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from adfq_lightning import ADFQConfig, load_quantized, quantize, save_quantized
from adfq_lightning.export import export_quantized, load_exported
from adfq_lightning.lightning import ADFQModule
from adfq_lightning.lightning.cli import main as cli_main
from adfq_lightning.models import RandomWeightsWarning, create_model

from conftest import make_images

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
FAST = ADFQConfig(iters=2, batch_size=4, init_samples=8)


@pytest.fixture
def trained(tmp_path):
    """A timm model 'trained' elsewhere (random but fixed weights) and its float outputs."""
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    x = make_images(4, seed=2)
    with torch.no_grad():
        return model, x, model(x)


@pytest.mark.parametrize("layout", ["bare", "deit_official", "lightning_ddp", "ema"])
def test_local_checkpoint_layouts_load_through_timm(trained, tmp_path, layout):
    model, x, expected = trained
    state = model.state_dict()
    blob = {"bare": state,
            "deit_official": {"model": state, "optimizer": {}, "epoch": 299},  # facebookresearch/deit layout
            "lightning_ddp": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
            "ema": {"state_dict": {k: torch.zeros_like(v) for k, v in state.items()}, "state_dict_ema": state}}[layout]
    torch.save(blob, tmp_path / "ckpt.pth")
    loaded = create_model("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "ckpt.pth"), **TINY)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_local_copy_of_pretrained_weights_through_pretrained_cfg_overlay(trained, tmp_path):
    model, x, expected = trained
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    overlay = {"file": str(tmp_path / "weights.pth"), "num_classes": 10}
    loaded = create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **TINY)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_checkpoint_of_another_shape_names_the_fix(trained, tmp_path):
    torch.save({"model": trained[0].state_dict()}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="does not fit 'vit_tiny_patch16_224'.*model_kwargs"):
        create_model("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "ckpt.pth"), **{**TINY, "embed_dim": 64})
    with pytest.raises(FileNotFoundError, match="is not a file"):
        create_model("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "missing.pth"), **TINY)


def test_random_weights_are_announced():
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights.*checkpoint_path"):
        create_model("vit_tiny_patch16_224", **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        create_model("vit_cifar", pretrained=True)  # shipped weights: no warning


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="unknown model 'deit_smol'.*deit_small_patch16_224"):
        create_model("deit_smol")
    with pytest.raises(ValueError, match="did you mean vit_cifar"):
        create_model("vit_cifr")


def test_data_config_follows_the_built_model_size():
    module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY)
    assert module.data_config["input_size"] == (3, 32, 32)


def test_num_calib_stops_reading_the_calibration_iterable(trained):
    model, _, _ = trained
    pulled = []

    def loader():  # an endless stream, like an ImageNet train loader that would exhaust memory
        for i in range(10_000):
            pulled.append(i)
            yield make_images(4, seed=i), torch.zeros(4)

    quantize(copy.deepcopy(model), loader(), FAST, num_calib=8)
    assert pulled == [0, 1]
    with pytest.raises(ValueError, match="num_calib=0"):
        quantize(copy.deepcopy(model), loader(), FAST, num_calib=0)


def test_forward_loop_calibrates_on_the_images_reaching_the_model(trained):
    model, _, _ = trained
    images = make_images(12, seed=5)
    reference = quantize(copy.deepcopy(model), images[:8], FAST)

    def forward_loop(m):  # a pipeline with its own batching and preprocessing, calling the model itself
        for batch in ({"pixels": images[i : i + 3] * 2.0} for i in range(0, 12, 3)):
            m(batch["pixels"] / 2.0)

    looped = quantize(copy.deepcopy(model), config=FAST, forward_loop=forward_loop, num_calib=8)
    state, expected = looped.state_dict(), reference.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="calib_data or from forward_loop"):
        quantize(copy.deepcopy(model), images, FAST, forward_loop=forward_loop)


def test_unnormalised_calibration_images_are_warned_about(trained):
    model, _, _ = trained
    raw = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    with pytest.warns(UserWarning, match="look unnormalised.*resolve_data_config"):
        quantize(copy.deepcopy(model), raw, FAST.replace(reconstruct=False))


def test_a_yaml_typo_is_reported_in_a_few_lines(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  config:\n    w_bitz: 4\ndata:\n  class_path: adfq_lightning.lightning.CIFAR10DataModule\n")
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(bad)])
    assert exit_.value.code == 2
    text = err.getvalue()
    assert "w_bitz" in text and len(text.splitlines()) <= 15, text


def _synthetic_imagenet(root: Path, size: int = 224, per_class: int = 2) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{i}.JPEG")
    return root


@pytest.mark.parametrize("name, kwargs", [
    ("deit_tiny_patch16_224", {}),
    # Swin-T's blocks, windows and patch merging at 224 px, one block per stage to stay within seconds
    ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}),
])
@pytest.mark.slow
def test_imagenet_architectures_quantize_at_224_and_reload(name, kwargs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = create_model(name, **kwargs)
        fresh = create_model(name, **kwargs)
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    config = ADFQConfig(iters=1, batch_size=2, init_samples=4)
    quantize(model, images, config)
    with torch.no_grad():
        out = model(images[:2])
        assert out.shape == (2, 1000) and torch.isfinite(out).all()
        save_quantized(model, tmp_path / "q.pt", config)
        assert torch.equal(load_quantized(copy.deepcopy(fresh), tmp_path / "q.pt", config=config)(images[:2]), out)
        artifact = export_quantized(model, tmp_path / "q.safetensors", config, model_kwargs=kwargs)
        assert torch.equal(load_exported(artifact)(images[:2]), out)


@pytest.mark.slow
def test_imagenet_config_runs_on_an_imagenet_style_folder(tmp_path, capsys):
    root = _synthetic_imagenet(tmp_path / "imagenet")
    cli_main(["fit", "--config", str(ROOT / "configs/imagenet/deit_t_w4a4.yaml"), "--model.pretrained", "false",
              "--data.init_args.root", str(root), "--data.init_args.num_calib", "4", "--data.init_args.batch_size", "2",
              "--data.init_args.num_workers", "0", "--model.config.iters", "1", "--model.config.batch_size", "2",
              "--model.config.init_samples", "4", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
              "--trainer.enable_progress_bar", "false"])
    printed = capsys.readouterr().out
    assert "deit_tiny_patch16_224: FP Top-1" in printed and "W4A4 Top-1" in printed
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    # evaluation needs only root/val: take train away and test the checkpoint
    (root / "train").rename(tmp_path / "train_elsewhere")
    cli_main(["test", "--config", str(ROOT / "configs/imagenet/deit_t_w4a4.yaml"), "--model.pretrained", "false",
              "--data.init_args.root", str(root), "--data.init_args.num_workers", "0", "--ckpt_path", str(ckpt),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"])


@pytest.mark.slow
def test_predict_writes_the_quantized_models_predictions(tmp_path):
    common = ["--config", str(ROOT / "configs/cifar10/vit_w4a4.yaml"), "--trainer.logger.init_args.save_dir",
              str(tmp_path), "--data.init_args.num_calib", "16", "--trainer.limit_val_batches", "1",
              "--trainer.limit_predict_batches", "2", "--trainer.enable_progress_bar", "false"]
    with pytest.raises(RuntimeError, match="predict needs a quantized model.*--ckpt_path"):
        cli_main(["predict", *common])
    cli_main(["fit", *common, "--model.config.iters", "1", "--model.config.init_samples", "16"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    cli_main(["predict", *common, "--ckpt_path", str(ckpt)])
    written = torch.load(next(tmp_path.rglob("predictions.pt")), weights_only=True)
    assert written["probs"].shape == (256, 10) and written["pred"].shape == written["labels"].shape == (256,)
    assert torch.allclose(written["probs"].sum(1), torch.ones(256), atol=1e-5)
