"""A quantized model carries its recipe: the ADFQConfig, the architecture and the arguments that build it again,
so that ``export_quantized(model, path)`` needs nothing else."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from adfq_lightning import ADFQConfig, quantize
from adfq_lightning.export import export_quantized, load_exported
from adfq_lightning.models import RandomWeightsWarning, create_model
from adfq_lightning.recipe import model_recipe

from conftest import make_images

CONFIG = ADFQConfig(w_bits=4, a_bits=4, iters=2, batch_size=4, init_samples=8)

#: each architecture built from its timm class with non-default arguments (image size 48, patch 8/4...)
BUILDERS = {
    "vit": lambda: VisionTransformer(img_size=48, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=7,
                                     mlp_ratio=2.0, global_pool="avg"),
    "deit": lambda: VisionTransformerDistilled(img_size=(32, 48), patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                               num_classes=5, qkv_bias=False),
    "swin": lambda: SwinTransformer(img_size=48, patch_size=4, window_size=6, embed_dim=16, depths=(1, 2),
                                    num_heads=(1, 2), num_classes=3, mlp_ratio=2.0),
}


def _images(model: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    size = tuple(model.patch_embed.img_size)
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _quantized(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[arch]().eval()
    quantize(model, _images(model, 12, 1), CONFIG, verbose=False)
    return model


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_export_needs_neither_config_nor_model_kwargs(arch, tmp_path):
    model = _quantized(arch)
    recipe = model_recipe(model)
    assert recipe.config == CONFIG and recipe.architecture
    path = export_quantized(model, tmp_path / "q.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        loaded = load_exported(path)
    x = _images(model, 3, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_recipe_stays_off_the_state_dict():
    model = _quantized("vit")
    assert not any("recipe" in k for k in model.state_dict())
    assert "adfq_recipe" not in dict(model.named_modules()) and "adfq_recipe" not in dict(model.named_buffers())


def test_a_model_built_by_create_model_records_its_arguments(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = create_model("deit_tiny_distilled_patch16_224", **kwargs)
    quantize(model, make_images(12), CONFIG, verbose=False)
    recipe = model_recipe(model)
    assert recipe.recorded and recipe.architecture == "deit_tiny_distilled_patch16_224"
    assert recipe.model_kwargs == kwargs
    x = make_images(2, seed=3)
    with torch.no_grad():
        assert torch.equal(load_exported(export_quantized(model, tmp_path / "q.safetensors"))(x), model(x))


def test_a_timm_model_keeps_its_timm_name(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              num_classes=6)
    quantize(model, make_images(12), CONFIG, verbose=False)
    recipe = model_recipe(model)
    assert recipe.architecture == "vit_tiny_patch16_224" and recipe.model_kwargs["img_size"] == 32
    path = export_quantized(model, tmp_path / "q.safetensors")
    assert load_exported(path).num_classes == 6


def test_given_config_and_kwargs_are_checked_against_the_recipe(tmp_path):
    model = _quantized("vit")
    with pytest.raises(ValueError, match=r"config= differs.*w_bits=4 in the model, 6 asked"):
        export_quantized(model, tmp_path / "q.safetensors", CONFIG.replace(w_bits=6))
    export_quantized(model, tmp_path / "same.safetensors", CONFIG)  # the same recipe is fine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        built = create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    quantize(built, make_images(12), CONFIG, verbose=False)
    with pytest.raises(ValueError, match=r"model_kwargs\['img_size'\]=64 but this model was built with img_size=32"):
        export_quantized(built, tmp_path / "q.safetensors", model_kwargs={"img_size": 64})
    with pytest.raises(ValueError, match="built as 'vit_tiny_patch16_224'"):
        export_quantized(built, tmp_path / "q.safetensors", model_name="vit_small_patch16_224")
    assert not (tmp_path / "q.safetensors").exists()


def test_an_export_that_could_not_be_loaded_back_is_refused(tmp_path):
    model = _quantized("vit")  # its arguments were read off its structure: a wrong one given is believed...
    with pytest.raises(ValueError, match=r"export refused.*could not be loaded back.*pos_embed.*model_kwargs="):
        export_quantized(model, tmp_path / "q.safetensors", model_kwargs={"img_size": 64})
    assert not (tmp_path / "q.safetensors").exists()  # ...and caught before any file is written


def test_a_model_without_a_recipe_asks_for_the_config(tmp_path):
    model = _quantized("vit")
    del model.adfq_recipe
    with pytest.raises(ValueError, match="needs config="):
        export_quantized(model, tmp_path / "q.safetensors")
