"""``torch.export`` of a deployed model to a ``.pt2`` program (dynamic batch size)."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..atomic import atomic_write
from .deployed import deploy, is_deployed

__all__ = ["export_program", "load_program"]


@torch.no_grad()
def export_program(model: nn.Module, path: Union[str, Path], example: torch.Tensor, dynamic_batch: bool = True) -> Path:
    """Trace ``model`` (quantized, or already deployed) with ``torch.export.export`` (non-strict) and save it.

    The program calls the ``adfq::`` operators: load it in a process that imported ``adfq_lightning``.
    """
    deployed = model if is_deployed(model) else deploy(copy.deepcopy(model))
    shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    # a copy: the program stores its example input, and a view would drag the whole tensor it views along
    program = torch.export.export(deployed.eval(), (example.clone(),), dynamic_shapes=shapes, strict=False)
    for node in program.graph.nodes:  # source lines of every op: a quarter of the file, and local paths leak
        node.meta.pop("stack_trace", None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    path = Path(path)
    atomic_write(path, buffer.getvalue())
    return path


def load_program(path: Union[str, Path]) -> nn.Module:
    """The callable module of a program written by :func:`export_program`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported program at {path}")
    try:
        return torch.export.load(path).module()
    except Exception as err:  # a truncated zip, a file of another kind...: torch raises many types
        raise ValueError(f"{path} is not a readable torch.export program ({type(err).__name__}: {err}): it is "
                         "truncated or corrupt; export it again with export_program().") from err
