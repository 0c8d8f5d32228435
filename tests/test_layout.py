"""The architecture rule a newcomer can check: the pure-PyTorch core never imports Lightning or torchmetrics."""

import subprocess
import sys
import warnings

import pytest

CORE_IMPORTS = (
    "import adfq_lightning; "
    "from adfq_lightning import ADFQConfig, quantize, prepare, set_quantization, save_quantized, load_quantized; "
    "import adfq_lightning.api, adfq_lightning.checkpoint, adfq_lightning.config, adfq_lightning.data, "
    "adfq_lightning.modules, adfq_lightning.quantizers, adfq_lightning.reconstruction, adfq_lightning.zoo"
)


def test_importing_the_core_imports_neither_lightning_nor_torchmetrics():
    probe = CORE_IMPORTS + "; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
                           "('lightning', 'pytorch_lightning', 'torchmetrics', 'jsonargparse')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lightning_names_at_the_top_level_load_the_lightning_face():
    import adfq_lightning
    from adfq_lightning.lightning import ADFQCallback, ADFQModule

    assert adfq_lightning.ADFQCallback is ADFQCallback and adfq_lightning.ADFQModule is ADFQModule
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        adfq_lightning.Nope


def test_pre_0_2_datamodule_class_paths_still_resolve_with_a_deprecation_warning():
    import adfq_lightning.data as data
    from adfq_lightning.lightning import CIFAR10DataModule, ImageFolderDataModule

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert data.CIFAR10DataModule is CIFAR10DataModule
        assert data.ImageFolderDataModule is ImageFolderDataModule
    assert all(issubclass(w.category, DeprecationWarning) and "adfq_lightning.lightning" in str(w.message)
               for w in caught) and len(caught) == 2
