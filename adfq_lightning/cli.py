"""``adfq-vit``: the LightningCLI of adfq-lightning (``fit`` quantizes, ``validate``/``test`` evaluate)."""

from __future__ import annotations

from typing import Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from .reconstruction.module import ADFQModule
from .report import REPORT_NAME

TRAINER_DEFAULTS = {
    "max_epochs": -1,  # the module stops the loop once every stage is reconstructed
    "num_sanity_val_steps": 0,
    "check_val_every_n_epoch": 1_000_000,  # evaluation runs after fit, on the FP and the quantized model
}


class ADFQCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Eval transforms come from timm's data config of the model (input size, mean/std, interpolation).
        parser.link_arguments("model.data_config", "data.init_args.data_config", apply_on="instantiate")

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


def main(args: Optional[list[str]] = None) -> None:
    ADFQCLI(
        ADFQModule,
        LightningDataModule,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


__all__ = ["ADFQCLI", "main"]


if __name__ == "__main__":
    main()
