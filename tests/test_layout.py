"""The architecture rules a newcomer can check: the pure-PyTorch core never imports Lightning or torchmetrics,
imports flow one way, and no file does so many jobs that it runs past 350 lines."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

CORE_IMPORTS = (
    "import adfq_lightning; "
    "from adfq_lightning import ADFQConfig, quantize, prepare, set_quantization, save_quantized, load_quantized; "
    "import adfq_lightning.api, adfq_lightning.checkpoint, adfq_lightning.config, adfq_lightning.data, "
    "adfq_lightning.modules, adfq_lightning.quantizers, adfq_lightning.reconstruction, adfq_lightning.zoo"
)


@pytest.mark.slow
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


PACKAGE = Path(__import__("adfq_lightning").__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports when it is imported (imports inside functions are deferred on purpose)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:  # "from . import lightning" names a module, not an attribute
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adfq_lightning"):
            found.add(node.module)
    return {m for m in found if _exists(m)}


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    root = PACKAGE / relative
    return root.with_suffix(".py").is_file() or (root / "__init__.py").is_file()


def test_no_file_in_the_package_is_over_350_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 350}
    assert not long, f"split these by job: {long}"


def test_package_imports_flow_one_way():
    graph = {_module_name(p): _top_level_imports(p) for p in PACKAGE.rglob("*.py")}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
