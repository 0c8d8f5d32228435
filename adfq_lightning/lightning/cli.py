"""``adfq-vit``: the LightningCLI of adfq-lightning (``fit`` quantizes, ``validate``/``test`` evaluate,
``predict`` writes the quantized model's predictions)."""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only

from ..quantization_report import widths_label
from .errors import DEBUG_ENV, run_reporting_errors
from .faults import RUNNING, ckpt_path_arg, stop_after_failure
from .module import ADFQModule
from .predictions import PredictionWriter
from .progress import ReconstructionProgressBar
from .run_report import REPORT_NAME
from .strategies import check_strategy_name

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

    def before_instantiate_classes(self) -> None:
        """Refuse a strategy calibration does not run under before the Trainer is built (on a CPU Lightning
        rejects 'fsdp' and 'deepspeed' while building it, with a message about devices)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_strategy_name(config["trainer"].get("strategy"))

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with the reconstruction progress bar unless the progress bar is switched off; a DDP
        strategy given by name gets the model's ``collective_timeout`` for Lightning's own collectives."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        strategy = config["trainer"].get("strategy")
        timeout = getattr(self.model, "hparams", {}).get("collective_timeout")
        if isinstance(strategy, str) and strategy.startswith("ddp") and timeout is not None:
            kwargs["strategy"] = DDPStrategy(timeout=timedelta(seconds=timeout),
                                             find_unused_parameters=strategy.endswith("_true"))
        if config["trainer"].get("enable_progress_bar", True) is not False:
            existing = config["trainer"].get("callbacks") or []
            kwargs["callbacks"] = [*(existing if isinstance(existing, list) else [existing]), ReconstructionProgressBar()]
        RUNNING["trainer"] = trainer = super().instantiate_trainer(**kwargs)
        return trainer

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
                f"{results['val_fp']['top5']:.2f} | {widths_label(cfg.to_dict(), self.model.driver.allocation)} Top-1 "
                f"{results['val']['top1']:.2f} / "
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


DESCRIPTION = (
    "adfq-vit: ADFQ-ViT post-training quantization of a timm ViT/DeiT/Swin. 'fit' quantizes (calibration and "
    "module-wise reconstruction), 'validate'/'test' evaluate a quantized checkpoint, 'predict' writes its "
    "predictions. Start from a shipped recipe: adfq-vit fit --config configs/cifar10/vit_w4a4.yaml. Errors print "
    f"one line; set {DEBUG_ENV}=1 for their traceback."
)


def _refuse_callback_checkpoint(args: list[str]) -> None:
    """A checkpoint of a user's own Trainer with ADFQCallback holds the user's LightningModule, not ADFQModule."""
    path = ckpt_path_arg(args)
    if not path or not Path(path).is_file():
        return
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if any(key.split("{")[0] == "ADFQCallback" for key in checkpoint.get("callbacks", {})):
        raise ValueError(f"{path} was saved by ADFQCallback in your own Trainer, and adfq-vit takes adfq-vit fit "
                         "checkpoints: evaluate it with your Trainer (trainer.test(MyModule(), ckpt_path=..., with "
                         "ADFQCallback in its callbacks)) or reload it with adfq_lightning.lightning."
                         "load_quantized_checkpoint(MyModule, path); adfq-vit-export --ckpt_path exports it.")


def main(args: Optional[list[str]] = None) -> None:
    """``adfq-vit``: on the command line (``args`` None) the library's errors print as one line; with ``args``
    given, as from Python, they raise."""
    for message in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)

    argv = sys.argv[1:] if args is None else list(args)

    def run() -> None:
        with stop_after_failure(argv, command_line=args is None):
            _refuse_callback_checkpoint(argv)
            ADFQCLI(
                ADFQModule,
                LightningDataModule,
                subclass_mode_data=True,
                # the writer acts in predict only
                trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [PredictionWriter()]},
                save_config_kwargs={"overwrite": True},
                parser_class=ConciseArgumentParser,
                parser_kwargs={"description": DESCRIPTION},
                args=args,
            )

    run_reporting_errors("adfq-vit", run, command_line=args is None)
    if dist.is_available() and dist.is_initialized():
        # Lightning leaves the DDP process group up. A gloo rank that exits without destroying it can abort at
        # interpreter shutdown ("terminate called without an active exception", pytorch/pytorch#190489), and
        # torchrun/srun then report a finished run as failed. Every rank gets here; the barrier lets none leave first.
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["ADFQCLI", "main"]


if __name__ == "__main__":
    main()
