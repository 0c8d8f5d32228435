"""``AtomicCheckpointIO``: Lightning checkpoints written like every other adfq-lightning file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Temp file beside the checkpoint, fsync, rename.

    Lightning's own writer (``_atomic_save``) stages the bytes in a temporary file of the *system* temp
    directory and ``shutil.move``-s it into place: an atomic rename only when that directory is on the same
    filesystem as the checkpoint, else a plain copy that a kill or a full disk can leave half written, and
    never fsync-ed. Use ``Trainer(plugins=[AtomicCheckpointIO()])`` (CLI: ``--trainer.plugins
    adfq_lightning.lightning.AtomicCheckpointIO``). Remote (``scheme://``) paths go through Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict, path: Union[str, Path], storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
