"""Resume after a kill, crash-safe files, bad data and bad input: each refused early with a message naming the fix.

The kill tests run the real CLI (``python -m adfq_lightning.lightning.cli fit``) in a subprocess, SIGKILL it at a known
checkpoint and resume in this process with ``--ckpt_path last``; the final quantized state_dict must equal,
tensor for tensor, the one of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image

from adfq_lightning import ADFQConfig, UnsupportedModuleError, load_quantized, prepare, quantize, save_quantized
from adfq_lightning import atomic as io_module
from adfq_lightning.modules import is_converted
from adfq_lightning.lightning.cli import main as cli_main
from adfq_lightning.data import CorruptImageError, decode_image_folder
from adfq_lightning.atomic import atomic_torch_save
from adfq_lightning.lightning import AtomicCheckpointIO, ImageFolderDataModule
from adfq_lightning.quantizers import PerPatchOutlierQuantizer, UniformQuantizer
from adfq_lightning.lightning.run_report import write_report
from adfq_lightning.models import create_model

from conftest import build_tiny, make_images
from robust_helpers import TINY_TIMM_VIT

TESTS = Path(__file__).resolve().parent
FAST = ADFQConfig(iters=3, batch_size=4, init_samples=8)
W4A4 = ADFQConfig(reconstruct=False, init_samples=8)
W6A6 = W4A4.replace(w_bits=6, a_bits=6)


# ---------------------------------------------------------------------------------------------------------------
# 1. SIGKILL mid-calibration, resume with --ckpt_path last: bit-identical to an uninterrupted run
# ---------------------------------------------------------------------------------------------------------------

def cli_config(root: Path, *extra_callbacks: dict) -> str:
    """A tiny CLI run: 4 stages x 3 iterations, one iteration per training step, a checkpoint after every step
    (a stage is finished at the start of the step after its last iteration: (1, 3) is between two modules).
    Bias correction is on, so a resume also restores the corrections of the modules already finished.

    20 images in batches of 4 make 5 training steps an epoch, so the kills below land mid-epoch.
    """
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 1, "save_last": True,
                               "save_top_k": 0}},
                {"class_path": "robust_helpers.SaveFinalState", "init_args": {"path": str(root / "final.pt")}},
                *extra_callbacks,
            ],
        },
        "model": {"model": "vit_tiny_patch16_224", "pretrained": False, "model_kwargs": TINY_TIMM_VIT,
                  "iters_per_step": 1, "config": {"iters": 3, "batch_size": 4, "init_samples": 8,
                                                  "bias_correction": True}},
        "data": {"class_path": "robust_helpers.RandomImages", "init_args": {"num": 20, "batch_size": 4}},
    }
    (root / "config.in.yaml").write_text(yaml.safe_dump(cfg))
    return str(root / "config.in.yaml")


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    cli_main(["fit", "--config", cli_config(root)])
    return torch.load(root / "final.pt", weights_only=True)


def test_fit_path_same_seed_same_model(uninterrupted, tmp_path):
    cli_main(["fit", "--config", cli_config(tmp_path)])
    assert_same_state(torch.load(tmp_path / "final.pt", weights_only=True), uninterrupted)


def test_fit_path_under_deterministic_algorithms(uninterrupted, tmp_path, monkeypatch):
    """``trainer.deterministic: true`` (torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG) runs and
    gives the same bits: no op of the recipe lacks a deterministic implementation on this device."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # Lightning sets it; monkeypatch restores it
    try:
        cli_main(["fit", "--config", cli_config(tmp_path), "--trainer.deterministic", "true"])
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert_same_state(torch.load(tmp_path / "final.pt", weights_only=True), uninterrupted)


def test_fit_path_equals_quantize_api(uninterrupted):
    """The Lightning fit (reconstruction as training steps) and quantize() run the same bits."""
    import lightning as L

    from robust_helpers import RandomImages

    L.seed_everything(0)
    model = create_model("vit_tiny_patch16_224", **TINY_TIMM_VIT)
    images = torch.cat([x for x, _ in RandomImages(num=20).train_dataloader()])
    quantize(model, images, FAST.replace(bias_correction=True))
    assert_same_state(model.state_dict(), uninterrupted)
    assert any(k.endswith("bias_correction") for k in uninterrupted)


@pytest.mark.parametrize("stage, iteration", [(1, 1), (1, 3)], ids=["inside_a_module", "between_two_modules"])
@pytest.mark.slow
def test_sigkill_then_resume_from_last_is_bit_identical(uninterrupted, tmp_path, stage, iteration):
    ready = tmp_path / "ready.json"
    pause = {"class_path": "robust_helpers.PauseAt",
             "init_args": {"stage": stage, "iteration": iteration, "ready": str(ready)}}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "adfq_lightning.lightning.cli", "fit", "--config",
                             cli_config(tmp_path, pause)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc={proc.returncode}) before the kill: {proc.stderr.read()[-2000:]!r}")
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)  # plain types only
    assert (checkpoint["adfq_engine"]["stage"], checkpoint["adfq_engine"]["iteration"]) == (stage, iteration)
    assert checkpoint["global_step"] == 3 * stage + iteration  # global_step counts reconstruction iterations
    assert checkpoint["global_step"] % 5 != 0  # killed mid-epoch (5 training steps of one iteration per epoch)
    assert not (tmp_path / "final.pt").exists()

    cli_main(["fit", "--config", cli_config(tmp_path), "--ckpt_path", "last"])
    assert_same_state(torch.load(tmp_path / "final.pt", weights_only=True), uninterrupted)


# ---------------------------------------------------------------------------------------------------------------
# 2. Save and load outside Lightning; crash-safe writes
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def w4a4_file(tiny_vit, images, tmp_path) -> Path:
    quantize(tiny_vit, images, W4A4)
    path = tmp_path / "vit_w4a4.pt"
    save_quantized(tiny_vit, path, W4A4)
    return path


def test_saved_file_loads_weights_only_and_with_matching_config(w4a4_file, tiny_vit, images):
    blob = torch.load(w4a4_file, weights_only=True)
    assert blob["config"]["w_bits"] == 4 and blob["model_name"] == "VisionTransformer"
    loaded = load_quantized(build_tiny("vit", seed=5), w4a4_file, config=ADFQConfig(w_bits=4, a_bits=4))
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny_vit(images))


def test_file_of_other_bit_width_is_refused(tiny_vit, images, tmp_path):
    quantize(tiny_vit, images, W6A6)
    save_quantized(tiny_vit, tmp_path / "w6a6.pt", W6A6)
    fresh = build_tiny("vit")
    with pytest.raises(ValueError, match=r"W6A6.*W4A4.*w_bits=6 in the file, 4 asked") as err:
        load_quantized(fresh, tmp_path / "w6a6.pt", config=ADFQConfig(w_bits=4, a_bits=4))
    assert "drop config=" in str(err.value)
    assert not is_converted(fresh)  # refused before any module was swapped
    # A model already converted for W4A4 cannot silently take W6A6 scales either.
    with pytest.raises(ValueError, match="6-bit in the file"):
        load_quantized(prepare(build_tiny("vit"), W4A4), tmp_path / "w6a6.pt")


def test_file_of_other_model_size_is_a_clear_value_error(w4a4_file):
    from timm.models.vision_transformer import VisionTransformer

    wider = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=10).eval()
    with pytest.raises(ValueError, match=r"does not fit this VisionTransformer \(cls_token: \(1, 1, 32\) in the file, \(1, 1, 48\) here"):
        load_quantized(wider, w4a4_file)
    assert not is_converted(wider)
    other_head = build_tiny("vit")
    other_head.reset_classifier(5)
    with pytest.raises(ValueError, match="another size of the architecture"):
        load_quantized(other_head, w4a4_file)


def test_non_finite_or_truncated_file_is_refused(w4a4_file, tmp_path):
    blob = torch.load(w4a4_file, weights_only=True)
    blob["state_dict"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(blob, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"NaN/Inf values in \['blocks.0.attn.qkv.weight'\]"):
        load_quantized(build_tiny("vit"), tmp_path / "nan.pt")
    data = w4a4_file.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        load_quantized(build_tiny("vit"), tmp_path / "cut.pt")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FailingFile:
    """A file object whose write runs out of space half way."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        _enospc()

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, failing):
    path = tmp_path / "out" / "model.pt"
    atomic_torch_save({"version": torch.tensor(1)}, path)
    before = path.read_bytes()
    if failing == "write":
        fdopen = os.fdopen
        monkeypatch.setattr(io_module.os, "fdopen", lambda *a, **k: _FailingFile(fdopen(*a, **k)))
    else:
        monkeypatch.setattr(io_module.os, failing, _enospc)
    with pytest.raises(OSError) as err:
        atomic_torch_save({"version": torch.tensor(2)}, path)
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    atomic_torch_save({"version": torch.tensor(1)}, tmp_path / "model.pt")  # mkstemp alone would give 0o600
    assert (tmp_path / "model.pt").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_save_quantized_and_report_are_crash_safe(w4a4_file, tiny_vit, tmp_path, monkeypatch):
    before = w4a4_file.read_bytes()
    report = write_report({"model": "a"}, tmp_path)
    report_before = report.read_bytes()
    monkeypatch.setattr(io_module.os, "replace", _enospc)
    with pytest.raises(OSError):
        save_quantized(tiny_vit, w4a4_file, W6A6)
    with pytest.raises(OSError):
        write_report({"model": "b"}, tmp_path)
    assert w4a4_file.read_bytes() == before and report.read_bytes() == report_before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_checkpoint_io_for_lightning_checkpoints(tmp_path, monkeypatch):
    import lightning as L

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], logger=False, accelerator="cpu")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    io = trainer.strategy.checkpoint_io
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(io_module.os, "fsync", _enospc)
    with pytest.raises(OSError):
        io.save_checkpoint({"global_step": 2}, path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(path)["global_step"] == 1


def test_atomic_checkpoint_io_from_the_cli(tmp_path):
    from lightning.pytorch import LightningDataModule

    from adfq_lightning.lightning.cli import ADFQCLI, TRAINER_DEFAULTS
    from adfq_lightning.lightning.module import ADFQModule

    cli = ADFQCLI(ADFQModule, LightningDataModule, subclass_mode_data=True, trainer_defaults=TRAINER_DEFAULTS,
                  args=["fit", "--config", cli_config(tmp_path), "--trainer.plugins",
                        "adfq_lightning.lightning.AtomicCheckpointIO"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]


# ---------------------------------------------------------------------------------------------------------------
# 3. Bad input
# ---------------------------------------------------------------------------------------------------------------

def _image(path: Path, mode: str = "RGB", size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"L": 128, "1": 1, "P": 3, "RGBA": (10, 20, 30, 128), "CMYK": (10, 20, 30, 40), "LA": (100, 200)}
    Image.new(mode, (size, size), color.get(mode, (10, 20, 30))).save(path, "TIFF" if mode == "CMYK" else None)


def _tree(root: Path, per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(per_class):
                _image(root / split / cls / f"{i}.png")
    return root


def test_data_root_without_images_or_with_wrong_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No 'train' directory .* reads root/train/<class>/<image>"):
        ImageFolderDataModule(tmp_path / "empty").setup()
    flat = tmp_path / "flat"
    for split in ("train", "val"):
        _image(flat / split / "0.png")  # images straight in train/, no class folders
    with pytest.raises(FileNotFoundError, match="expected root/train/<class>/<image>"):
        ImageFolderDataModule(flat).setup()
    no_images = tmp_path / "no_images"
    for split in ("train", "val"):
        (no_images / split / "cat").mkdir(parents=True)
        (no_images / split / "cat" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="expected root/train/<class>/<image>"):
        ImageFolderDataModule(no_images).setup()
    with pytest.raises(ValueError, match="found no images; expected ImageFolder layout 'train/<class>/<image>'"):
        decode_image_folder(flat, cache_dir=tmp_path / "cache")


def test_corrupt_calibration_images_stop_the_run_naming_every_file(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "train" / "a" / "1.png").write_bytes(b"not an image")
    data = (root / "train" / "b" / "2.png").read_bytes()
    (root / "train" / "b" / "2.png").write_bytes(data[: len(data) // 2])  # truncated
    dm = ImageFolderDataModule(root, num_workers=0, num_calib=6)
    with pytest.raises(CorruptImageError, match=r"2 of the 6 calibration images are corrupt or truncated") as err:
        dm.setup()
    assert "a/1.png" in str(err.value) and "b/2.png" in str(err.value) and "delete or replace" in str(err.value)


def test_corrupt_evaluation_image_is_named_when_read(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "val" / "b" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dm = ImageFolderDataModule(root, num_workers=0, num_calib=6)
    dm.setup()  # only the calibration images are decoded up front
    with pytest.raises(CorruptImageError, match=r"val/b/0.png: corrupt or truncated image"):
        list(dm.val_dataloader())


def test_corrupt_image_in_archive_is_named(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "train" / "a" / "0.png").write_bytes(b"garbage")
    with pytest.raises(CorruptImageError, match="train/a/0.png: corrupt or truncated image"):
        decode_image_folder(root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("mode", ["L", "1", "P", "LA", "RGBA", "CMYK"])
def test_grayscale_palette_rgba_cmyk_images_become_rgb(tmp_path, mode):
    root = _tree(tmp_path / "data", per_class=2)
    suffix = ".tif" if mode == "CMYK" else ".png"
    for split in ("train", "val"):
        _image(root / split / "a" / f"odd{suffix}", mode=mode)
    dm = ImageFolderDataModule(root, num_workers=0, num_calib=5,
                               data_config={"input_size": (3, 8, 8), "crop_pct": 1.0, "interpolation": "bilinear",
                                            "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_mode": "center"})
    dm.setup()
    x, _ = next(iter(dm.calib_dataloader()))
    assert x.shape == (5, 3, 8, 8)
    decoded = decode_image_folder(root, cache_dir=tmp_path / "cache")
    assert decoded.images.shape == (5, 3, 8, 8)


@pytest.mark.parametrize("channels", [1, 4])
def test_quantize_refuses_non_rgb_tensors_before_swapping(tiny_vit, channels):
    with pytest.raises(ValueError, match=r"convert grayscale/RGBA images to RGB"):
        quantize(tiny_vit, torch.randn(4, channels, 32, 32), W4A4)
    assert not is_converted(tiny_vit)


def test_more_calibration_images_than_exist(tmp_path):
    root = _tree(tmp_path / "data")
    with pytest.raises(ValueError, match=r"Asked for 100 calibration images but only 6 are available: set num_calib <= 6"):
        ImageFolderDataModule(root, num_calib=100).setup()


def test_batch_larger_than_calibration_set_is_clamped_with_a_warning(make_tiny):
    images = make_images(4)
    with pytest.warns(UserWarning, match=r"batch_size=32 is larger than the 4 calibration images: .*batches of 4"):
        clamped = quantize(make_tiny("vit"), images, FAST.replace(batch_size=32, iters=2))
    exact = quantize(make_tiny("vit"), images, FAST.replace(batch_size=4, iters=2))
    assert_same_state(clamped.state_dict(), exact.state_dict())


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
@pytest.mark.parametrize("where", ["w_bits", "a_bits", "override"])
def test_unsupported_bit_widths(bits, where):
    changes = {"overrides": {"head": {"w_bits": bits}}} if where == "override" else {where: bits}
    with pytest.raises(ValueError, match=r"=%d is not supported: use an integer from 2 to 8" % bits):
        ADFQConfig(**changes)
    with pytest.raises(ValueError, match="from 2 to 8"):
        UniformQuantizer(bits)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, math.nan])
@pytest.mark.parametrize("field", ["qkv_outlier_threshold", "fc1_outlier_threshold"])
def test_bad_outlier_threshold(field, threshold):
    with pytest.raises(ValueError, match=f"{field}=.* must be a positive number"):
        ADFQConfig(**{field: threshold})
    with pytest.raises(ValueError, match="must be a positive number"):
        PerPatchOutlierQuantizer(4, threshold=threshold)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_in_a_checkpoint(tmp_path, value):
    state = build_tiny("vit").state_dict()
    state["blocks.1.mlp.fc2.weight"][3, 3] = value
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"NaN/Inf values in \['blocks.1.mlp.fc2.weight'\]: the checkpoint is corrupt"):
        create_model("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "bad.pt"), img_size=32, patch_size=8,
                     embed_dim=32, depth=2, num_heads=2, num_classes=10)


def test_checkpoint_of_other_shape_names_model_kwargs(tmp_path):
    torch.save(build_tiny("vit").state_dict(), tmp_path / "vit.pt")
    with pytest.raises(ValueError, match="does not fit 'vit_tiny_patch16_224'.*model_kwargs"):
        create_model("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "vit.pt"), img_size=32, patch_size=8,
                     embed_dim=32, depth=2, num_heads=2, num_classes=7)


def test_resnet_is_refused_before_anything_is_swapped(images):
    resnet = timm.create_model("resnet18", num_classes=10).eval()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    types = [type(m) for m in resnet.modules()]
    for call in (lambda: quantize(resnet, images, W4A4), lambda: prepare(resnet, W4A4)):
        with pytest.raises(UnsupportedModuleError, match="VisionTransformer.*SwinTransformer"):
            call()
    assert [type(m) for m in resnet.modules()] == types
    assert_same_state(resnet.state_dict(), before)


def test_pretrained_without_network_says_how_to_work_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)could not fetch pretrained weights.*HF_HUB_OFFLINE=1.*checkpoint_path"):
        create_model("vit_tiny_patch16_224", pretrained=True, cache_dir=str(tmp_path / "hf"))
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("unknown, where", [
    ({"model": {"config": {"w_bitz": 4}}}, "w_bitz"),
    ({"model": {"itres_per_step": 3}}, "model.itres_per_step"),
    ({"trainer": {"max_epoch": 3}}, "trainer.max_epoch"),
])
def test_cli_yaml_with_unknown_key_exits_non_zero_naming_it(tmp_path, capsys, unknown, where):
    cfg = {"model": {"model": "vit_cifar", "pretrained": False},
           "data": {"class_path": "adfq_lightning.lightning.CIFAR10DataModule"}}
    for section, values in unknown.items():
        for key, value in values.items():
            cfg.setdefault(section, {})[key] = value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(tmp_path / "bad.yaml")])
    assert exit_.value.code != 0
    assert where in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 4. Determinism of the quantize() API (the fit path: test_fit_path_same_seed_same_model above)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_quantize_same_seed_same_state_dict(make_tiny, more_images, arch):
    runs = [quantize(make_tiny(arch), more_images, FAST).state_dict() for _ in range(2)]
    assert_same_state(*runs)
    other = quantize(make_tiny(arch), more_images, FAST.replace(seed=1)).state_dict()
    assert any(not torch.equal(other[k], runs[0][k]) for k in other)  # the seed does steer reconstruction
