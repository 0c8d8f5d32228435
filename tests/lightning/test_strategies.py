"""Every Lightning strategy name either runs calibration or is refused by this library, naming what works, before
anything is built (the CLI) or swapped (``ADFQModule.setup``, ``ADFQCallback.setup``)."""

from __future__ import annotations

import pytest
import yaml
from lightning.pytorch.strategies import StrategyRegistry

from adfq_lightning.lightning.cli import main as cli_main
from adfq_lightning.lightning.strategies import WORKING_NAMES, check_strategy, check_strategy_name

REFUSED = sorted(set(StrategyRegistry.keys()) - set(WORKING_NAMES))


def test_every_registered_name_is_answered():
    assert set(WORKING_NAMES) - {"auto"} <= set(StrategyRegistry.keys())
    for name in WORKING_NAMES:
        check_strategy_name(name)
    assert {"fsdp", "deepspeed", "ddp_spawn", "ddp_notebook", "ddp_fork", "xla"} <= set(REFUSED)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_name_says_why_and_what_works(name):
    with pytest.raises(ValueError, match=rf"strategy '{name}' is not supported for ADFQ-ViT calibration: .*Use 'auto'.*'ddp'"):
        check_strategy_name(name)


@pytest.mark.parametrize("path", ["lightning.pytorch.strategies.FSDPStrategy",
                                  "lightning.pytorch.strategies.ModelParallelStrategy"])
def test_refused_class_path(path):
    with pytest.raises(ValueError, match="not supported for ADFQ-ViT calibration"):
        check_strategy_name({"class_path": path})


@pytest.mark.parametrize("name", ["fsdp", "deepspeed", "ddp_spawn", "ddp_notebook"])
def test_cli_refuses_before_lightning_builds_the_trainer(tmp_path, capsys, name):
    """On a CPU Lightning rejects fsdp/deepspeed while building the Trainer, with a message about devices:
    adfq-vit answers first, in one line."""
    cfg = {"model": {"model": "vit_cifar", "pretrained": False},
           "data": {"class_path": "adfq_lightning.lightning.CIFAR10DataModule"},
           "trainer": {"accelerator": "cpu", "strategy": name}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=f"strategy '{name}' is not supported"):
        cli_main(["fit", "--config", str(tmp_path / "c.yaml")])


def test_setup_refuses_a_spawned_ddp_strategy_object():
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match="spawn/fork launcher.*quantized model would be lost"):
        check_strategy(trainer.strategy)
    check_strategy(L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False).strategy)
    check_strategy(L.Trainer(accelerator="cpu", devices=1, logger=False).strategy)


def test_callback_setup_refuses_before_swapping(tiny_vit):
    import lightning as L

    from adfq_lightning import ADFQCallback
    from adfq_lightning.modules import is_converted

    class Holder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_vit

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match="not supported for ADFQ-ViT calibration"):
        ADFQCallback().setup(trainer, Holder(), "validate")
    assert not is_converted(tiny_vit)
