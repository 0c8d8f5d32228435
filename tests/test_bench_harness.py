"""The benchmark's results file: a run asked for the unseen images' score runs again when its record lacks it,
and its new record takes the old one's place."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "bench" / "harness.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_a_run_scored_again_on_the_unseen_images_replaces_its_record(tmp_path):
    h = _harness()
    path = tmp_path / "accuracy.json"
    w3, w4 = h.make_spec("vit_cifar", "adfq", 3, iters=10), h.make_spec("vit_cifar", "adfq", 4, iters=10)
    h.add_result(path, dict(w3, top1=74.0))
    h.add_result(path, dict(w4, top1=77.0))
    data = h.load_results(path)
    assert h.pending([w3, w4], data) == []
    again = h.pending([dict(w3, unseen=True), dict(w4, unseen=True)], data)
    assert [s["w_bits"] for s in again] == [3, 4]
    h.add_result(path, dict(w3, unseen=True, top1=74.0, unseen_top1=80.0))
    runs = h.load_results(path)["runs"]
    assert [(r["w_bits"], r.get("unseen_top1")) for r in runs] == [(3, 80.0), (4, None)]  # in place, not added
    assert [s["w_bits"] for s in h.pending([dict(w3, unseen=True), dict(w4, unseen=True)], {"runs": runs})] == [4]
