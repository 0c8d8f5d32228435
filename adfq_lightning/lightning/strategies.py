"""Which Lightning strategies calibration runs under, checked where ``adfq-vit`` and ``ADFQCallback`` first see
the strategy: the CLI before it builds the Trainer (Lightning itself rejects some strategies on a CPU while the
Trainer is built), ``ADFQModule.setup`` and ``ADFQCallback.setup`` for a Trainer built in Python."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                          SingleDeviceStrategy, SingleDeviceXLAStrategy, Strategy, XLAStrategy)
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

#: the strategy names that work, and what each is for
SUPPORTED = ("'auto' or 'single_device' (one process), 'ddp' (one process per device, started by adfq-vit "
             "--trainer.devices N, srun or torchrun) or 'ddp_find_unused_parameters_false'/'_true'")
WORKING_NAMES = ("auto", "single_device", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true")

_SHARDED = ("shards the float weights (and optimizer state) over the ranks, while ADFQ-ViT swaps and calibrates whole "
            "modules on their full weights; its memory is the activation cache, which 'ddp' already splits over the "
            "ranks (docs/distributed.md)")
_REASONS = {
    "fsdp": f"FSDP {_SHARDED}",
    "deepspeed": f"DeepSpeed ZeRO {_SHARDED}",
    "ddp_spawn": ("it starts the ranks with multiprocessing and hands only rank 0's weights back to the main process, "
                  "whose model was never swapped for quantized modules: the quantized model would be lost after fit"),
    "xla": "calibration runs on CPU and CUDA devices; XLA/TPU strategies are not supported",
    "model_parallel": ("tensor parallelism splits the Linear weights, and every weight quantizer calibrates on a whole "
                       "weight"),
}
_FAMILIES = (("fsdp", "fsdp"), ("deepspeed", "deepspeed"), ("ddp_spawn", "ddp_spawn"), ("ddp_fork", "ddp_spawn"),
             ("ddp_notebook", "ddp_spawn"), ("xla", "xla"), ("single_xla", "xla"), ("single_tpu", "xla"),
             ("model_parallel", "model_parallel"))


def _refusal(name: str, family: Optional[str]) -> ValueError:
    reason = _REASONS.get(family, "it is not one ADFQ-ViT's calibration was built and tested for") if family else \
        "it is not one ADFQ-ViT's calibration was built and tested for"
    return ValueError(f"strategy {name!r} is not supported for ADFQ-ViT calibration: {reason}. Use {SUPPORTED}.")


def check_strategy_name(strategy: Any) -> None:
    """Refuse, before a Trainer is built, a strategy given by name (or as a class path) that calibration does not
    run under. A Strategy object is checked by :func:`check_strategy` once the Trainer holds it."""
    if isinstance(strategy, Strategy) or strategy is None:
        return
    if not isinstance(strategy, str):  # a class_path from a YAML config
        path = strategy.get("class_path", "") if hasattr(strategy, "get") else getattr(strategy, "class_path", "")
        name = str(path).rsplit(".", 1)[-1].lower().replace("strategy", "")
        if name in ("fsdp", "deepspeed", "xla", "singledevicexla", "modelparallel"):
            family = {"singledevicexla": "xla", "modelparallel": "model_parallel"}.get(name, name)
            raise _refusal(str(path), family)
        return
    if strategy in WORKING_NAMES:
        return
    family = next((f for prefix, f in _FAMILIES if strategy.startswith(prefix)), None)
    raise _refusal(strategy, family)


def check_strategy(strategy: Strategy) -> None:
    """Refuse a Trainer's strategy that calibration does not run under (in ``setup``, before anything is swapped)."""
    refused = ((FSDPStrategy, "fsdp"), (DeepSpeedStrategy, "deepspeed"), (ModelParallelStrategy, "model_parallel"),
               (XLAStrategy, "xla"), (SingleDeviceXLAStrategy, "xla"))
    for kind, family in refused:
        if isinstance(strategy, kind):
            raise _refusal(type(strategy).__name__, family)
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.launcher, _MultiProcessingLauncher):
        raise _refusal(f"{type(strategy).__name__} with a spawn/fork launcher", "ddp_spawn")
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise _refusal(type(strategy).__name__, None)
