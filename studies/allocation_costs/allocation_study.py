"""Study: each layer's measured cost at 2, 3, 4, 6 and 8 bits (allocate_bits' report) on the reference models and
their outlier variants, seed 0's calibration images, as the benchmark's mixed-precision runs measure it."""
import json
import sys
from pathlib import Path

import timm.data
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench") if len(sys.argv) < 3 else sys.argv[2])
from harness import calibration_and_scoring, make_spec  # noqa: E402

from adfq_lightning import ADFQConfig, BitBudget, allocate_bits  # noqa: E402
from adfq_lightning.data import cifar10_eval_transform  # noqa: E402
from adfq_lightning.zoo import create_reference_model  # noqa: E402

torch.set_num_threads(1)
name = sys.argv[1]
out = Path(__file__).with_name(f"alloc_{name}.json")
calib_u8, _ = calibration_and_scoring(make_spec(name, "adfq", 4, seed=0, iters=1000))
model = create_reference_model(name, pretrained=True).eval()
images = cifar10_eval_transform(timm.data.resolve_data_config(model=model))(calib_u8)
config = ADFQConfig.preset("adfq", w_bits=4, a_bits=4, seed=0, iters=1000, batch_size=32)
_, report = allocate_bits(model, images, BitBudget(3.0, 3.0, candidates=(2, 3, 4, 6, 8)), config, report=True)
out.write_text(json.dumps(report, indent=1))
print(name, f"{report['seconds']:.0f} s", flush=True)
