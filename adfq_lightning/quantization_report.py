"""The report of a quantization run, the same on every path (``quantize(..., report=True)``, ``ADFQCallback``,
``ADFQModule``), and its one-paragraph summary."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Optional

from .config import ADFQConfig

__all__ = ["build_report", "summarize"]

#: distributions whose versions a report names (those installed)
_DISTRIBUTIONS = ("torch", "timm", "lightning", "torchmetrics", "jsonargparse")


def package_versions() -> dict[str, str]:
    """Versions of the packages a run depends on, read from their metadata (nothing is imported)."""
    from . import __version__

    versions = {"adfq_lightning": __version__}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    return versions


def _overview(modules: list[dict]) -> dict:
    """The numbers a summary states: modules, time, modules reverted by the safeguard, worst held-out error ratio."""
    ratios = [(m["final_error"] / m["init_error"], m["name"]) for m in modules
              if m.get("init_error") and m.get("final_error") is not None]
    worst = max(ratios, default=None)
    return {"modules": len(modules), "seconds": sum(float(m.get("seconds", 0.0)) for m in modules),
            "reverted": [m["name"] for m in modules if m.get("reverted")],
            "undecided": sum(int(m.get("undecided", 0) or 0) for m in modules),
            "iterations": sum(int(m.get("iters", 0)) for m in modules),
            "worst_error_ratio": None if worst is None else {"module": worst[1], "ratio": worst[0]}}


def build_report(config: ADFQConfig, stages: list, model_name: str, world_size: int = 1,
                 evaluation: Optional[dict] = None, allocation: Optional[dict] = None) -> dict:
    """Everything needed to reproduce and judge a run: config, versions, seeds, an overview, per-module results
    (held-out error before/after reconstruction, soft error, undecided rounding, reverted...), accuracy, and
    under a bit budget the allocation (``allocate_bits(..., report=True)``)."""
    global_seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything / LightningCLI
    modules = [{"name": s.name, **s.stats} for s in stages]
    return {
        "model": model_name,
        "config": config.to_dict(),
        "seed": {"reconstruction": config.seed, "global": None if global_seed is None else int(global_seed)},
        "world_size": world_size,
        "versions": package_versions(),
        "overview": _overview(modules),
        "modules": modules,
        "evaluation": evaluation or {},
        **({"allocation": allocation} if allocation else {}),
    }


def widths_label(config: dict, allocation: Optional[dict] = None) -> str:
    """``W4A4``, or under a bit budget the averages the allocation reached: ``mixed W3.50 A3.50``."""
    if allocation:
        return "mixed " + " ".join(f"{k[0].upper()}{v:.2f}" for k, v in allocation["reached"].items() if v)
    return f"W{config['w_bits']}A{config['a_bits']}"


def summarize(report: dict, where: str) -> str:
    """A short account of a run: modules, time, what the safeguard reverted, the worst held-out error ratio, and
    ``where`` the full report is."""
    overview, config = report["overview"], report["config"]
    iters = f"{config['iters']} it/module" if config["reconstruct"] else "no reconstruction"
    if config["reconstruct"] and config.get("adaptive_iters"):
        iters = (f"adaptive: {overview['iterations']:,} of {overview['modules'] * config['iters']:,} iterations, "
                 "each module's in the report")
    allocation = report.get("allocation")
    lines = [f"ADFQ {widths_label(config, allocation)} {report['model']}: {overview['modules']} modules quantized in "
             f"{overview['seconds']:.1f} s ({iters})."]
    if allocation:
        budget = " ".join(f"{k[0].upper()}{v:g}" for k, v in allocation["budget"].items() if k != "candidates" and v)
        lines.append(f"  Widths allocated under a budget of {budget or 'no average'} (candidates "
                     f"{', '.join(map(str, allocation['budget']['candidates']))}) in {allocation['seconds']:.1f} s; "
                     "each layer's width and measured cost are under 'allocation' in the report.")
    reverted = overview["reverted"]
    if reverted:
        names = ", ".join(reverted[:5]) + (", ..." if len(reverted) > 5 else "")
        lines.append(f"  The safeguard kept {len(reverted)} of {overview['modules']} modules at their "
                     f"pre-reconstruction state (their held-out error got worse): {names}. More iterations "
                     "(ADFQConfig(iters=...)) or calibration images usually help.")
    worst = overview["worst_error_ratio"]
    if worst is not None:
        lines.append(f"  Worst held-out error after/before reconstruction: {worst['ratio']:.3f} ({worst['module']}).")
    lines.append(f"  Per-module report: {where}")
    return "\n".join(lines)
