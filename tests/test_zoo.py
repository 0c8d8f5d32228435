"""Reference models: build, 32x32 forward, timm block types the quantizer wraps, data config."""

import pytest
import timm.data
import torch
from timm.layers import Mlp
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Attention

from adfq_lightning.zoo import CIFAR10_MEAN, REFERENCE_MODELS, create_reference_model

ATTENTION = {"vit_cifar": Attention, "deit_cifar": Attention, "swin_cifar": WindowAttention}


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_reference_model_forward_and_blocks(name):
    model = create_reference_model(name)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    types = {type(m) for m in model.modules()}
    assert ATTENTION[name] in types and Mlp in types
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == CIFAR10_MEAN


def test_unknown_model_and_missing_asset(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="vit_cifar"):
        create_reference_model("resnet")
    monkeypatch.setattr("adfq_lightning.zoo.reference_asset_path", lambda name: tmp_path / f"{name}.pt")
    with pytest.raises(FileNotFoundError, match="recipes/train_reference.py --model vit_cifar"):
        create_reference_model("vit_cifar", pretrained=True)


def test_pretrained_loads_fp16_asset_as_float32(monkeypatch, tmp_path):
    reference = create_reference_model("vit_cifar")
    torch.save({k: v.half() for k, v in reference.state_dict().items()}, tmp_path / "vit_cifar.pt")
    monkeypatch.setattr("adfq_lightning.zoo.reference_asset_path", lambda name: tmp_path / f"{name}.pt")
    model = create_reference_model("vit_cifar", pretrained=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.allclose(model.pos_embed, reference.pos_embed.half().float())
