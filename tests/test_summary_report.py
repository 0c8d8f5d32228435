"""One report and one summary on every path: ``quantize(..., report=True)`` gives the dict the Lightning paths
write as ``adfq_report.json``, built by the same core function, and every run ends with the same summary."""

from __future__ import annotations

import subprocess
import sys

import torch

from adfq_lightning import ADFQConfig, quantize
from adfq_lightning.quantization_report import build_report, summarize

from conftest import build_tiny, make_images

CONFIG = ADFQConfig(iters=2, batch_size=4, init_samples=8)
MODULE_FIELDS = {"name", "init_error", "reconstructed_error", "final_error", "soft_error", "reverted", "iters",
                 "seconds", "cache_mb", "heldout_images"}
REPORT_FIELDS = {"model", "config", "seed", "world_size", "versions", "overview", "modules", "evaluation"}


def test_quantize_returns_the_per_module_report_on_request(capsys):
    model, report = quantize(build_tiny("swin"), make_images(16), CONFIG, report=True)
    assert isinstance(model, torch.nn.Module) and set(report) == REPORT_FIELDS
    assert report["model"] == "SwinTransformer" and report["config"] == CONFIG.to_dict()
    assert len(report["modules"]) == report["overview"]["modules"] == 11
    assert all(MODULE_FIELDS <= set(m) for m in report["modules"])
    reverted = [m["name"] for m in report["modules"] if m["reverted"]]
    assert report["overview"]["reverted"] == reverted
    worst = report["overview"]["worst_error_ratio"]
    assert worst["ratio"] == max(m["final_error"] / m["init_error"] for m in report["modules"])
    assert "torch" in report["versions"] and report["world_size"] == 1
    printed = capsys.readouterr().out
    assert printed.startswith("ADFQ W4A4 SwinTransformer: 11 modules quantized in ")
    assert "Worst held-out error after/before reconstruction" in printed and "returned by quantize" in printed


def test_the_summary_names_the_modules_the_safeguard_reverted(capsys):
    quantize(build_tiny("swin"), make_images(16), CONFIG)
    printed = capsys.readouterr().out
    _, report = quantize(build_tiny("swin"), make_images(16), CONFIG, report=True, verbose=False)
    assert capsys.readouterr().out == ""  # verbose=False prints nothing
    reverted = report["overview"]["reverted"]
    assert reverted, "a 2-iteration Swin reverts some modules: the summary must say which"
    assert f"The safeguard kept {len(reverted)} of 11 modules" in printed and reverted[0] in printed
    assert "quantize(..., report=True) returns it" in printed


def test_quantize_without_report_returns_the_model_only():
    model = build_tiny("vit")
    assert quantize(model, make_images(16), CONFIG, verbose=False) is model


def test_the_report_is_built_by_the_core_without_lightning():
    probe = ("import sys; from adfq_lightning.quantization_report import build_report; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torchmetrics', 'jsonargparse')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    report = build_report(CONFIG, [], "m")
    assert set(report) == REPORT_FIELDS and report["overview"]["modules"] == 0
    assert "Per-module report: there" in summarize(report, "there")
