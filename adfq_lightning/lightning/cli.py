"""``adfq-vit``: the LightningCLI of adfq-lightning (``fit`` quantizes, ``validate``/``test`` evaluate,
``predict`` writes the quantized model's predictions)."""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from .module import ADFQModule
from .predictions import PredictionWriter
from .progress import ReconstructionProgressBar
from .run_report import REPORT_NAME

TRAINER_DEFAULTS = {
    "max_epochs": -1,  # the module stops the loop once every stage is reconstructed
    "num_sanity_val_steps": 0,
    "check_val_every_n_epoch": 1_000_000,  # evaluation runs after fit, on the FP and the quantized model
}


class ConciseArgumentParser(LightningArgumentParser):
    """A bad option or YAML key is reported in a few lines (the error and where to look for the options),
    not under the full usage text of every Trainer, model and data argument."""

    def print_usage(self, file=None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} --config <config.yaml> [--<section>.<key> <value> ...]\n")


class ADFQCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Eval transforms come from timm's data config of the model (input size, mean/std, interpolation).
        parser.link_arguments("model.data_config", "data.init_args.data_config", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with the reconstruction progress bar unless the progress bar is switched off."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config["trainer"].get("enable_progress_bar", True) is not False:
            existing = config["trainer"].get("callbacks") or []
            kwargs["callbacks"] = [*(existing if isinstance(existing, list) else [existing]), ReconstructionProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Evaluate the full-precision and the quantized model on the validation set and print both."""
        for float_mode in (True, False):
            self.model.set_float_mode(float_mode)
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self.model.set_float_mode(False)
        self._print_summary(self.trainer.log_dir)  # log_dir is a broadcast under DDP: every rank asks for it

    @rank_zero_only
    def _print_summary(self, log_dir: Optional[str]) -> None:
        cfg, results = self.model.config, self.model.evaluation
        if "val_fp" in results and "val" in results:
            print(
                f"\n{self.model.hparams.model}: FP Top-1 {results['val_fp']['top1']:.2f} / Top-5 "
                f"{results['val_fp']['top5']:.2f} | W{cfg.w_bits}A{cfg.a_bits} Top-1 {results['val']['top1']:.2f} / "
                f"Top-5 {results['val']['top5']:.2f}\nreport: {log_dir}/{REPORT_NAME}"
            )


#: Lightning messages that do not apply to reconstruction: its training batches carry no data (so resuming
#: mid-epoch is exact), the engine saves state after, not before, the optimizer step, and a pytree deprecation
#: inside Lightning itself.
IRRELEVANT_WARNINGS = (
    "Using ModelCheckpoint with manual optimization and every_n_train_steps",
    "You're resuming from a checkpoint that ended before the epoch ended",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def main(args: Optional[list[str]] = None) -> None:
    for message in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    ADFQCLI(
        ADFQModule,
        LightningDataModule,
        subclass_mode_data=True,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [PredictionWriter()]},  # the writer acts in predict only
        save_config_kwargs={"overwrite": True},
        parser_class=ConciseArgumentParser,
        args=args,
    )
    if dist.is_available() and dist.is_initialized():
        # Lightning leaves the DDP process group up. A gloo rank that exits without destroying it can abort at
        # interpreter shutdown ("terminate called without an active exception", pytorch/pytorch#190489), and
        # torchrun/srun then report a finished run as failed. Every rank gets here; the barrier lets none leave first.
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["ADFQCLI", "main"]


if __name__ == "__main__":
    main()
