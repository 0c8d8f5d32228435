"""Study, part 3: would choosing q, k, v and the attention probabilities' widths apart pay? Each attention's four
quantizers measured alone at 3, 4, 6 and 8 bits (as allocate_bits measures a choice), then the allocation at
BitBudget(3.5, 3.5) solved with the four together (as the library does) and apart: the summed cost of each."""
import copy
import json
import sys
from pathlib import Path

import timm.data
import torch

sys.path.insert(0, sys.argv[2])
from harness import calibration_and_scoring, make_spec  # noqa: E402

from adfq_lightning import ADFQConfig, quantize  # noqa: E402
from adfq_lightning.allocation import choose_widths  # noqa: E402
from adfq_lightning.allocation.allocate import MAX_INIT_IMAGES, MAX_SENSITIVITY_IMAGES  # noqa: E402
from adfq_lightning.allocation.sensitivity import _activation_elements, _kl, _own_activation_quantizers  # noqa: E402
from adfq_lightning.data import cifar10_eval_transform  # noqa: E402
from adfq_lightning.quantizers import set_quantization  # noqa: E402
from adfq_lightning.reconstruction.heldout import holdout_split  # noqa: E402
from adfq_lightning.zoo import create_reference_model  # noqa: E402

torch.set_num_threads(1)
name = sys.argv[1]
report = json.loads(Path(__file__).with_name(f"alloc_{name}.json").read_text())
calib_u8, _ = calibration_and_scoring(make_spec(name, "adfq", 4, seed=0, iters=1000))
model = create_reference_model(name, pretrained=True).eval()
images = cifar10_eval_transform(timm.data.resolve_data_config(model=model))(calib_u8)
config = ADFQConfig.preset("adfq", w_bits=4, a_bits=4, seed=0, iters=1000, batch_size=32)
held_ids, calib_ids = holdout_split(len(images), 0.25, config.seed)
held = images[held_ids[:MAX_SENSITIVITY_IMAGES]]
pick = torch.randperm(len(calib_ids), generator=torch.Generator().manual_seed(config.seed))[:MAX_INIT_IMAGES]
init = images[calib_ids[pick.sort().values]]
with torch.no_grad():
    reference = model(held)
attention = [u["name"] for u in report["layers"] if u["kind"] == "activations"
             and not any(v["name"] == u["name"] and v["kind"] == "weights" for v in report["layers"])]
widths = (3, 4, 6, 8)
split = {}  # (attention, index) -> {"size":, "kl": {bits: kl}}
for bits in widths:
    probe = copy.deepcopy(model)
    quantize(probe, init, config.replace(w_bits=bits, a_bits=bits, reconstruct=False), verbose=False)
    elements = _activation_elements(probe, images[:1])
    set_quantization(probe, False)
    for a in attention:
        for i, q in enumerate(_own_activation_quantizers(probe.get_submodule(a))):
            q.enabled = True
            with torch.no_grad():
                split.setdefault(f"{a}#{i}", {"size": elements[id(q)], "kl": {}})["kl"][str(bits)] = _kl(reference, probe(held))
            q.enabled = False
    print(name, bits, "measured", flush=True)

joint = report["layers"]
apart = [u for u in joint if u["name"] not in attention or u["kind"] == "weights"] + \
    [{"name": k, "kind": "activations", **v} for k, v in split.items()]


def solve(units, bits):
    groups = [0 if u["kind"] == "weights" else 1 for u in units]
    totals = [sum(u["size"] for u, g in zip(units, groups) if g == k) for k in (0, 1)]
    chosen = choose_widths([[u["kl"][str(b)] for b in widths] for u in units],
                           [[u["size"] * b for b in widths] for u in units], groups, [bits * t for t in totals])
    return sum(u["kl"][str(widths[k])] for u, k in zip(units, chosen)), {u["name"]: widths[k] for u, k in zip(units, chosen) if u["name"] in split or u["name"] in attention and u["kind"] == "activations"}


out = {"split": split, "attention": attention}
for label, units in (("together", joint), ("apart", apart)):
    cost, chosen = solve(units, 3.5)
    out[label] = {"cost_3.5": cost, "uniform_3": sum(u["kl"]["3"] for u in units),
                  "uniform_4": sum(u["kl"]["4"] for u in units), "attention_widths": chosen}
    print(label, {k: v for k, v in out[label].items() if k != "attention_widths"}, flush=True)
Path(__file__).with_name(f"per_quantizer_{name}.json").write_text(json.dumps(out, indent=1))
