"""Mixed precision: the exact solver, the budget, and ``allocate_bits`` on a tiny model."""

from __future__ import annotations

import itertools

import pytest
import torch

from adfq_lightning import ADFQConfig, BitBudget, allocate_bits, quantize
from adfq_lightning.allocation import choose_widths
from adfq_lightning.modules import QuantLinear, QuantMatMul
from adfq_lightning.quantizers import Quantizer
from conftest import build_tiny, make_images


def brute_force(cost, size, group, capacity):
    best, best_choice = float("inf"), None
    for choice in itertools.product(*[range(len(c)) for c in cost]):
        fits = all(cap is None or sum(size[i][k] for i, k in enumerate(choice) if group[i] == g) <= cap
                   for g, cap in enumerate(capacity))
        total = sum(cost[i][k] for i, k in enumerate(choice))
        if fits and total < best - 1e-12:
            best, best_choice = total, choice
    return best, best_choice


@pytest.mark.parametrize("seed", range(12))
def test_solver_is_exact_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    items, widths = 6, (2, 3, 4, 6, 8)
    sizes = torch.randint(1, 50, (items,), generator=g).tolist()
    cost = [sorted(torch.rand(len(widths), generator=g).tolist(), reverse=True) for _ in range(items)]
    size = [[s * w for w in widths] for s in sizes]
    group = [i % 2 for i in range(items)]
    totals = [sum(s for s, gr in zip(sizes, group) if gr == k) for k in (0, 1)]
    budgets = torch.empty(2).uniform_(2.0, 8.0, generator=g).tolist()
    capacity = [b * t for b, t in zip(budgets, totals)]
    best, _ = brute_force(cost, size, group, capacity)
    chosen = choose_widths(cost, size, group, capacity)
    assert sum(cost[i][k] for i, k in enumerate(chosen)) == pytest.approx(best, abs=1e-9)
    for gr, cap in enumerate(capacity):  # never exceeded
        assert sum(size[i][k] for i, k in enumerate(chosen) if group[i] == gr) <= cap


def test_solver_says_when_nothing_fits():
    with pytest.raises(ValueError, match="no choice of widths fits"):
        choose_widths([[1.0, 0.5]], [[3, 4]], [0], [2])


@pytest.mark.parametrize("kwargs, match", [
    ({"w_bits": 2.5}, "from the narrowest to the widest candidate"),
    ({"a_bits": 9}, "from the narrowest to the widest candidate"),
    ({"candidates": ()}, "candidates is empty"),
    ({"candidates": (1, 4)}, "2 to 8|from 2 to 8"),
    ({"w_bits": True}, "must be a number"),
])
def test_bad_budgets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BitBudget(**kwargs)


def averages(model, overrides, config):
    """Weight bits by parameters, activation bits by elements per image, over the allocated modules."""
    model = quantize(model, make_images(8), config.replace(overrides={**config.overrides, **overrides}),
                     verbose=False)
    elements = {}
    hooks = [q.register_forward_pre_hook(lambda q, a: elements.__setitem__(q.name, a[0].numel()))
             for q in model.modules() if isinstance(q, Quantizer) and q.observes_activations]
    with torch.no_grad():
        model(make_images(1))
    for h in hooks:
        h.remove()
    w = [(m.weight.numel(), m.weight_quantizer.bits) for n, m in model.named_modules()
         if isinstance(m, QuantLinear) and n in overrides]
    a = [(elements[m.input_quantizer.name], m.input_quantizer.bits) for n, m in model.named_modules()
         if isinstance(m, QuantLinear) and n in overrides]
    a += [(elements[q.name], q.bits) for n, m in model.named_modules() if isinstance(m, QuantMatMul)
          for q in (m.a_quantizer, m.b_quantizer) if n.rsplit(".", 1)[0] in overrides]
    mean = lambda pairs: sum(s * b for s, b in pairs) / sum(s for s, _ in pairs)  # noqa: E731
    return mean(w), mean(a)


@pytest.fixture(scope="module")
def allocated():
    config = ADFQConfig(reconstruct=False, seed=0)
    budget = BitBudget(w_bits=3.5, a_bits=5.0, candidates=(3, 4, 6))
    return config, budget, allocate_bits(build_tiny("vit"), make_images(16), budget, config)


def test_allocation_names_every_layer_and_meets_the_budget(allocated):
    config, budget, overrides = allocated
    linears = [n for n, m in quantize(build_tiny("vit"), make_images(8), config, verbose=False).named_modules()
               if isinstance(m, QuantLinear) and not n.startswith("head")]
    assert set(linears) <= set(overrides)  # every Linear of the blocks (patch embed and head are fixed at 8)
    assert all(set(overrides[n]) == {"w_bits", "a_bits"} for n in linears)
    assert all(set(b.values()) <= set(budget.candidates) for b in overrides.values())
    w, a = averages(build_tiny("vit"), overrides, config)
    assert w <= budget.w_bits and a <= budget.a_bits
    assert w > 3.0  # the budget is used, not left on the table


def test_allocation_is_deterministic_for_a_seed(allocated):
    config, budget, overrides = allocated
    assert allocate_bits(build_tiny("vit"), make_images(16), budget, config) == overrides


def test_explicit_overrides_win_and_stay_outside_the_budget():
    fixed = {**ADFQConfig().overrides, "blocks.0.*": {"w_bits": 8, "a_bits": 8}}
    config = ADFQConfig(reconstruct=False, overrides=fixed)
    overrides = allocate_bits(build_tiny("vit"), make_images(16), BitBudget(w_bits=3.0, a_bits=3.0), config)
    assert overrides and not any(name.startswith("blocks.0.") for name in overrides)
    assert all(b == {"w_bits": 3, "a_bits": 3} or b == {"a_bits": 3} for b in overrides.values())


def test_a_budget_that_is_no_budget_is_refused_before_anything_runs(tiny_vit):
    with pytest.raises(TypeError, match="BitBudget"):
        allocate_bits(tiny_vit, make_images(16), {"w_bits": 3.5})
    everything = {**ADFQConfig().overrides, "blocks.*": {"w_bits": 4}}
    with pytest.raises(ValueError, match="no layer is left to allocate"):
        allocate_bits(tiny_vit, make_images(16), BitBudget(w_bits=3.5), ADFQConfig(overrides=everything))


def test_quantize_allocates_under_the_configs_budget_and_the_export_round_trips(tmp_path):
    from adfq_lightning.export import deploy, export_quantized, load_exported

    config = ADFQConfig(iters=2, batch_size=4, seed=0, bit_budget={"w_bits": 3.5, "a_bits": 4.5,
                                                                      "candidates": [3, 4, 6]})
    model, report = quantize(build_tiny("vit"), make_images(16), config, verbose=False, report=True)
    widths = {n: m.weight_quantizer.bits for n, m in model.named_modules()
              if isinstance(m, QuantLinear) and n.startswith("blocks.")}
    assert set(widths.values()) <= {3, 4, 6} and len(set(widths.values())) > 1  # a mix, not one width everywhere
    allocation = report["allocation"]  # the report says what was chosen, under which budget, at what cost
    assert {(layer["name"], layer["bits"]) for layer in allocation["layers"] if layer["kind"] == "weights"} \
        == set(widths.items())
    assert allocation["reached"]["w_bits"] <= 3.5 and allocation["reached"]["a_bits"] <= 4.5
    assert report["config"]["bit_budget"] is None and set(widths) <= set(report["config"]["overrides"])
    x = make_images(2)
    path = export_quantized(model, tmp_path / "mixed.safetensors")
    with torch.no_grad():
        assert torch.equal(load_exported(path)(x), deploy(model)(x))


@pytest.mark.parametrize("bit_budget, match", [
    ({"w_bits": 1.5}, "from the narrowest to the widest"),
    ({"bits": 4}, "keys are w_bits, a_bits, candidates"),
    (3.5, "must be a mapping"),
])
def test_a_bad_budget_in_the_config_is_refused_when_the_config_is_made(bit_budget, match):
    with pytest.raises(ValueError, match=match):
        ADFQConfig(bit_budget=bit_budget)


def test_a_budget_where_no_calibration_images_are_at_hand_is_refused_naming_allocate_bits(tiny_vit):
    from adfq_lightning import prepare

    with pytest.raises(ValueError, match="allocate_bits"):
        prepare(tiny_vit, ADFQConfig(bit_budget={"w_bits": 3.5}))
