"""The math of every fake-quantizer: grids, clipping, calibration, gradients, state round trips, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adfq_lightning.quantizers import (
    AdaRoundQuantizer,
    LogQuantizer,
    LogSqrt2Quantizer,
    PerPatchOutlierQuantizer,
    ShiftLog2Quantizer,
    UniformQuantizer,
    calibrating,
    check_bits,
    round_ste,
)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def grid_codes(q: UniformQuantizer, y: torch.Tensor) -> torch.Tensor:
    """Integer codes ``y / scale + zero_point`` of a uniform quantizer's output (should be integral)."""
    return y / q.scale.detach() + q.zero_point


def assert_on_grid(q: UniformQuantizer, y: torch.Tensor) -> None:
    codes = grid_codes(q, y)
    assert torch.allclose(codes, codes.round(), atol=1e-3), "output is not on the quantization grid"
    assert codes.round().min() >= 0 and codes.round().max() <= 2**q.bits - 1


# -- UniformQuantizer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_output_lies_on_grid(bits):
    x = randn(4, 50)
    q = UniformQuantizer(bits, search="minmax")
    q.calibrate(x)
    y = q(x)
    assert_on_grid(q, y)
    assert y.unique().numel() <= 2**bits
    # rounding to the nearest level: error at most half a step inside the range
    assert (y - x).abs().max() <= q.scale.item() / 2 + 1e-6


def test_uniform_clamps_outside_range():
    x = randn(200)
    q = UniformQuantizer(4, search="minmax")
    q.calibrate(x)
    scale, zp = q.scale.item(), q.zero_point.item()
    y = q(torch.tensor([-1e3, 1e3, x.min().item() - 5, x.max().item() + 5]))
    lowest, highest = -zp * scale, (15 - zp) * scale
    assert torch.allclose(y, torch.tensor([lowest, highest, lowest, highest]))
    assert highest == pytest.approx(x.max().item(), abs=scale / 2 + 1e-6)
    assert lowest == pytest.approx(x.min().item(), abs=scale / 2 + 1e-6)


@pytest.mark.parametrize(
    "granularity, shape, scale_shape",
    [
        ("tensor", (6, 5), ()),
        ("channel", (6, 5), (6, 1)),
        ("channel", (6, 3, 2, 2), (6, 1, 1, 1)),
        ("token", (2, 7, 5), (7, 1)),
        ("token", (2, 3, 7, 5), (7, 1)),
    ],
)
def test_uniform_scale_shapes(granularity, shape, scale_shape):
    x = randn(*shape)
    q = UniformQuantizer(4, granularity=granularity, search="minmax")
    q.calibrate(x)
    assert q.scale.shape == scale_shape
    assert q.zero_point.shape == scale_shape
    assert q(x).shape == x.shape


def test_uniform_minmax_reproduces_min_max_per_tensor():
    x = randn(1000) + 0.3
    q = UniformQuantizer(8, search="minmax")
    q.calibrate(x)
    lo, hi = x.min().item(), x.max().item()
    assert q.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-5)
    y = q(x)
    assert y.min().item() == pytest.approx(lo, abs=q.scale.item() / 2 + 1e-6)
    assert y.max().item() == pytest.approx(hi, abs=q.scale.item() / 2 + 1e-6)


def test_uniform_minmax_per_channel_and_per_token():
    w = randn(5, 40)
    q = UniformQuantizer(4, granularity="channel", search="minmax")
    q.calibrate(w)
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    assert torch.allclose(q.scale.flatten(), (hi - lo) / 15)

    a = randn(3, 6, 8, seed=1) * (4.0 ** torch.arange(6)).view(1, 6, 1)  # each token its own range
    qt = UniformQuantizer(4, granularity="token", search="minmax")
    qt.calibrate(a)
    lo, hi = a.amin((0, 2)).clamp(max=0), a.amax((0, 2)).clamp(min=0)
    assert torch.allclose(qt.scale.flatten(), (hi - lo) / 15)
    assert (qt.scale.flatten().diff() > 0).all()


def test_uniform_keeps_zero_exact_for_positive_data():
    x = randn(300).abs() + 1.0  # all positive: the range is widened down to 0
    q = UniformQuantizer(4, search="minmax")
    q.calibrate(x)
    assert q.zero_point.item() == 0
    assert q(torch.zeros(3)).eq(0).all()


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_uniform_mse_search_not_worse_than_minmax(granularity):
    x = randn(8, 256)
    x[torch.arange(8), torch.arange(8) * 3] = 12.0  # one outlier per row
    errs = {}
    for search in ("minmax", "mse"):
        q = UniformQuantizer(4, granularity=granularity, search=search)
        q.calibrate(x)
        errs[search] = (q(x) - x).pow(2).reshape(x.shape[0] if granularity == "channel" else 1, -1).mean(1)
    assert (errs["mse"] <= errs["minmax"] * (1 + 1e-6)).all()
    assert errs["mse"].sum() < 0.95 * errs["minmax"].sum()  # clipping the outliers pays off


def test_uniform_percentile_search_clips():
    x = randn(10_000)
    x[0] = 100.0
    q = UniformQuantizer(8, search="percentile", percentile=0.999)
    q.calibrate(x)
    assert q.scale.item() * 255 < 10  # the single 100 does not set the range
    assert q(torch.tensor([100.0])).item() < 10


def test_uniform_straight_through_gradients():
    x0 = randn(64)
    q = UniformQuantizer(4, search="mse")
    q.calibrate(x0)
    x = torch.cat([x0, torch.tensor([50.0, -50.0])]).requires_grad_(True)
    g = randn(66, seed=3)
    (q(x) * g).sum().backward()
    with torch.no_grad():
        codes = (x / q.scale).round() + q.zero_point
    inside, outside = (codes > 0) & (codes < 15), (codes < 0) | (codes > 15)
    assert outside[-2:].all() and inside.float().mean() > 0.9
    # identity gradient strictly inside the grid's range, zero gradient where the value is clamped
    # (at exactly the first/last level torch's clamp passes no gradient either: not asserted here)
    assert torch.allclose(x.grad[inside], g[inside], atol=1e-5)
    assert torch.equal(x.grad[outside], torch.zeros(int(outside.sum())))
    assert q.scale.grad is not None and q.scale.grad.abs().item() > 0


def test_round_ste_forward_exact_backward_identity():
    x = torch.tensor([-2.5, -1.49, 0.2, 0.5, 1.51, 1000.3], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, x.detach().round())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(6))


def test_per_token_quantizer_rejects_other_token_count():
    q = UniformQuantizer(4, granularity="token")
    q.name = "blocks.0.attn.qkv.qkv_input"
    q.calibrate(randn(2, 5, 8))
    q(randn(1, 5, 8))  # another batch size is fine
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.qkv_input: calibrated for 5 tokens but got 7"):
        q(randn(2, 7, 8))


def test_per_token_needs_two_dims():
    with pytest.raises(ValueError, match="per-token quantization needs"):
        UniformQuantizer(4, granularity="token").calibrate(randn(10))


@pytest.mark.parametrize("kwargs", [{"granularity": "row"}, {"search": "kl"}, {"percentile": 0.4}, {"percentile": 1.5}])
def test_uniform_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        UniformQuantizer(4, **kwargs)


# -- PerPatchOutlierQuantizer ---------------------------------------------------------------------------------------
def outlier_batch():
    x = randn(2, 6, 16, seed=4)
    x[0, 1, 3], x[1, 4, 0], x[1, 4, 9], x[0, 0, 15] = 12.0, -9.0, 30.0, -5.5
    return x


def test_ppoq_keeps_outliers_exactly_and_quantizes_the_rest():
    x = outlier_batch()
    q = PerPatchOutlierQuantizer(4, threshold=5.0)
    q.calibrate(x)
    y = q(x)
    outliers = x.abs() > 5.0
    assert outliers.sum() == 4
    assert torch.equal(y[outliers], x[outliers])  # bit-identical
    # every other element sits on its token's grid
    codes = y / q.scale + q.zero_point
    inliers = ~outliers
    assert torch.allclose(codes[inliers], codes[inliers].round(), atol=1e-3)
    assert (codes[inliers].round() >= 0).all() and (codes[inliers].round() <= 15).all()
    assert (y[inliers] != x[inliers]).float().mean() > 0.9
    # and outliers did not stretch the per-token ranges
    assert (q.scale.flatten() * 15 <= 2 * 5.0 + 1e-5).all()


def test_ppoq_outlier_ratio_and_scale_shape():
    x = outlier_batch()
    q = PerPatchOutlierQuantizer(4, threshold=5.0)
    q.calibrate(x)
    assert q.outlier_ratio.item() == pytest.approx(4 / x.numel())
    assert q.scale.shape == (6, 1)
    assert q.zero_point.shape == (6, 1)


def test_ppoq_runtime_outliers_pass_through():
    q = PerPatchOutlierQuantizer(4, threshold=5.0)
    q.calibrate(randn(2, 6, 16))
    x = randn(3, 6, 16, seed=9)
    x[2, 5, 5] = -1234.5
    assert q(x)[2, 5, 5].item() == -1234.5


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0, float("nan"), "5"])
def test_ppoq_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        PerPatchOutlierQuantizer(4, threshold=threshold)


# -- log quantizers -------------------------------------------------------------------------------------------------
def softmax_probs(seed=0):
    return F.softmax(randn(2, 2, 10, 10, seed=seed) * 3, dim=-1)


def log_exponents(y: torch.Tensor, delta: float, steps_per_octave: int) -> torch.Tensor:
    return -torch.log2(y / delta) * steps_per_octave


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log_sqrt2_levels(bits):
    p = softmax_probs()
    q = LogSqrt2Quantizer(bits)
    q.calibrate(p)
    y = q(p)
    delta = q.delta.item()
    nz = y[y != 0]
    k = log_exponents(nz, delta, 2)
    assert torch.allclose(k, k.round(), atol=1e-3)  # y = delta * 2**(-k/2)
    assert k.round().min() >= 0 and k.round().max() <= 2**bits - 1
    assert torch.allclose(nz, delta * torch.exp2(-k.round() / 2), rtol=1e-5)
    assert (y >= 0).all()
    assert y.unique().numel() <= 2**bits + 1  # levels and the exact zero


def test_log_base2_levels():
    p = softmax_probs(1)
    q = LogQuantizer(4, base="2")
    q.calibrate(p)
    y = q(p)
    nz = y[y != 0]
    k = log_exponents(nz, q.delta.item(), 1)
    assert torch.allclose(k, k.round(), atol=1e-3)  # y = delta * 2**(-k)
    assert k.round().min() >= 0 and k.round().max() <= 15


@pytest.mark.parametrize("cls, m", [(LogSqrt2Quantizer, 2), (lambda b: LogQuantizer(b, base="2"), 1)])
def test_log_values_below_smallest_level_become_zero(cls, m):
    q = cls(3)
    q.calibrate(softmax_probs())
    delta = q.delta.item()
    smallest = delta * 2 ** (-(8 - 1) / m)
    y = q(torch.tensor([0.0, smallest / 4, smallest / 100, 1e-30, smallest, delta, 10 * delta]))
    assert torch.equal(y[:4], torch.zeros(4))
    assert y[4].item() == pytest.approx(smallest, rel=1e-5)
    assert y[5].item() == pytest.approx(delta, rel=1e-6)
    assert y[6].item() == pytest.approx(delta, rel=1e-6)  # clipped at the top level


def test_log_quantizer_without_shift_rejects_negative_calibration():
    with pytest.raises(ValueError, match="non-negative"):
        LogSqrt2Quantizer(4).calibrate(torch.tensor([-0.1, 0.2, 0.5]))


def test_log_quantizer_rejects_unknown_base():
    with pytest.raises(ValueError, match="sqrt2"):
        LogQuantizer(4, base="e")


def test_slq_shift_is_a_calibrated_constant():
    pre = randn(4096, seed=5) * 2
    x = F.gelu(pre)
    q = ShiftLog2Quantizer(4)
    q.calibrate(x)
    assert q.shift.item() == -x.min().item()  # exactly the calibration minimum, negated
    assert 0.16 < q.shift.item() < 0.171  # GELU's minimum is about -0.17
    shift = q.shift.clone()

    # run time: a batch with a different minimum neither moves the shift nor changes any element's result
    batch = torch.cat([F.gelu(randn(100, seed=6)), torch.tensor([-3.0])])
    out = q(batch)
    assert torch.equal(q.shift, shift)
    alone = torch.stack([q(v.reshape(1)) for v in batch]).flatten()
    assert torch.equal(out, alone)


def test_slq_output_levels_and_floor():
    x = F.gelu(randn(4096, seed=5) * 2)
    for base, m in (("sqrt2", 2), ("2", 1)):
        q = ShiftLog2Quantizer(4, base=base)
        q.calibrate(x)
        shift, delta = q.shift.item(), q.delta.item()
        y = q(x)
        shifted = y + shift
        nz = shifted[shifted.abs() > 1e-6]
        k = log_exponents(nz, delta, m)
        assert torch.allclose(k, k.round(), atol=1e-3)
        smallest = delta * 2 ** (-15 / m)
        floor = q(torch.tensor([-shift + smallest / 8, -shift, -5.0]))
        assert torch.equal(floor, torch.full((3,), -shift))  # exactly -shift, not merely close


def test_log_quantizer_gradients():
    q = ShiftLog2Quantizer(4)
    q.calibrate(F.gelu(randn(1000)))
    x = F.gelu(randn(200, seed=1)).requires_grad_(True)
    g = randn(200, seed=2)
    (q(x) * g).sum().backward()
    assert torch.allclose(x.grad, g)  # straight through
    assert q.delta.grad is not None and q.delta.grad.abs().item() > 0
    assert q.shift.grad is None and not q.shift.requires_grad

    p = LogSqrt2Quantizer(4)
    p.calibrate(softmax_probs())
    probs = softmax_probs(2).requires_grad_(True)
    p(probs).sum().backward()
    assert torch.equal(probs.grad, torch.ones_like(probs))
    assert p.delta.grad.abs().item() > 0


# -- AdaRoundQuantizer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 12), (6, 3, 2, 2)])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_adaround_hard_init_equals_round_to_nearest(shape, granularity):
    w = randn(*shape, scale=0.05)
    q = AdaRoundQuantizer(4, granularity=granularity)
    q.calibrate(w)
    s, zp = q.grid.scale, q.grid.zero_point
    expected = ((w / s).round() + zp).clamp(0, 15).sub(zp).mul(s)
    assert torch.equal(q(w), expected)
    assert torch.equal(q(w), q.grid.fake_quantize(w))
    if granularity == "channel":
        assert s.shape == (shape[0],) + (1,) * (len(shape) - 1)
        assert q.alpha.shape == w.shape


def test_adaround_soft_rounding_and_regularizer():
    w = randn(8, 12, scale=0.05)
    q = AdaRoundQuantizer(4)
    q.calibrate(w)
    q.soft = True
    r = q.rounding()
    assert r.min() >= 0 and r.max() <= 1
    assert ((r > 0) & (r < 1)).float().mean() > 0.9  # soft right after init
    # soft right after init reproduces the fractional part of w / scale
    frac = (w / q.grid.scale - torch.floor(w / q.grid.scale)).clamp(1e-4, 1 - 1e-4)
    assert torch.allclose(r, frac, atol=1e-4)

    assert q.regularizer(2.0).item() > 0
    with torch.no_grad():
        q.alpha.fill_(0.0)  # rounding exactly 0.5: every term is 1
    assert q.regularizer(20.0).item() == pytest.approx(w.numel(), rel=1e-5)
    with torch.no_grad():
        q.alpha.copy_(torch.where(randn(8, 12, seed=1) > 0, 20.0, -20.0))
    assert set(q.rounding().unique().tolist()) <= {0.0, 1.0}
    assert q.regularizer(2.0).item() == 0.0
    assert q.regularizer(20.0).item() == 0.0


def test_adaround_hard_rounding_is_binary_and_grads_reach_alpha():
    w = randn(8, 12, scale=0.05)
    q = AdaRoundQuantizer(3)
    q.calibrate(w)
    q.soft = True
    (q(w) - w * 1.1).pow(2).sum().backward()
    assert q.alpha.grad is not None and q.alpha.grad.abs().sum() > 0
    with torch.no_grad():
        q.alpha.add_(randn(8, 12, seed=2))
    q.soft = False
    r = q.rounding()
    assert ((r == 0) | (r == 1)).all()
    codes = q(w) / q.grid.scale + q.grid.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    # hard rounding: every weight is the floor or the ceiling of its grid position
    lo = torch.floor(w / q.grid.scale).add(q.grid.zero_point).clamp(0, 7)
    assert ((codes.round() == lo) | (codes.round() == (lo + 1).clamp(max=7))).all()
    assert q.step_sizes() == []  # the grid is frozen


# -- state_dict round trips -----------------------------------------------------------------------------------------
def _calibrated_pairs():
    act = randn(2, 9, 16, seed=3)
    act[0, 2, 2] = 9.0
    probs = softmax_probs()
    gelu = F.gelu(randn(2, 9, 16, seed=5))
    w = randn(12, 16, scale=0.05)
    return [
        (lambda: UniformQuantizer(4, granularity="token"), act),
        (lambda: UniformQuantizer(3, granularity="channel", search="minmax"), w),
        (lambda: UniformQuantizer(5), act),
        (lambda: PerPatchOutlierQuantizer(4, threshold=5.0), act),
        (lambda: LogSqrt2Quantizer(4), probs),
        (lambda: ShiftLog2Quantizer(4), gelu),
        (lambda: ShiftLog2Quantizer(3, base="2"), gelu),
        (lambda: AdaRoundQuantizer(4), w),
        (lambda: AdaRoundQuantizer(2, granularity="tensor", search="percentile"), w),
    ]


@pytest.mark.parametrize("index", range(9))
def test_state_dict_round_trip_into_fresh_quantizer(index):
    make, x = _calibrated_pairs()[index]
    q = make()
    q.calibrate(x)
    if isinstance(q, AdaRoundQuantizer):
        with torch.no_grad():
            q.alpha.add_(randn(*q.alpha.shape, seed=7))  # a "learned" rounding, not the nearest one
    state = q.state_dict()
    fresh = make()
    assert not bool(fresh.calibrated)
    fresh.load_state_dict(state)
    assert bool(fresh.calibrated)
    assert torch.equal(fresh(x), q(x))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("make, x", [
    (lambda: UniformQuantizer(4), torch.zeros(2, 5, 8)),
    (lambda: UniformQuantizer(4, granularity="token"), torch.full((2, 5, 8), 3.0)),
    (lambda: PerPatchOutlierQuantizer(4), torch.full((2, 5, 8), 7.0)),  # every element an outlier
    (lambda: LogSqrt2Quantizer(4), torch.zeros(2, 5, 8)),
    (lambda: ShiftLog2Quantizer(4), torch.zeros(2, 5, 8)),
    (lambda: AdaRoundQuantizer(4), torch.zeros(5, 8)),
])
def test_constant_calibration_is_finite(make, x):
    q = make()
    q.calibrate(x)
    y = q(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, x, atol=1e-6)


# -- bad inputs -----------------------------------------------------------------------------------------------------
ALL_CLASSES = [
    UniformQuantizer,
    PerPatchOutlierQuantizer,
    LogQuantizer,
    LogSqrt2Quantizer,
    ShiftLog2Quantizer,
    AdaRoundQuantizer,
]


@pytest.mark.parametrize("bits", [0, 1, 9, 16, True, 4.0, -4, None])
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_bits_outside_range_raise(cls, bits):
    with pytest.raises(ValueError, match="from 2 to 8"):
        cls(bits)


@pytest.mark.parametrize("bits", range(2, 9))
def test_bits_in_range_accepted(bits):
    assert check_bits(bits) == bits
    assert UniformQuantizer(bits).levels == 2**bits


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("index", range(9))
def test_non_finite_calibration_raises(index, bad):
    make, x = _calibrated_pairs()[index]
    q = make()
    q.name = "some.quantizer"
    x = x.clone()
    x.view(-1)[3] = bad
    with pytest.raises(ValueError, match=r"some\.quantizer received NaN or Inf"):
        q.calibrate(x)
    assert not bool(q.calibrated)


def test_empty_calibration_tensor_raises():
    with pytest.raises(ValueError, match="empty"):
        UniformQuantizer(4).calibrate(torch.empty(0))


def test_uncalibrated_enabled_quantizer_raises_and_disabled_is_identity():
    for q in (UniformQuantizer(4), LogSqrt2Quantizer(4), PerPatchOutlierQuantizer(4), ShiftLog2Quantizer(4)):
        q.name = "blocks.3.mlp.fc2.fc2_input"
        x = torch.rand(2, 4, 8)
        with pytest.raises(RuntimeError, match=r"blocks\.3\.mlp\.fc2\.fc2_input is not calibrated"):
            q(x)
        q.enabled = False
        assert q(x) is x


def test_calibrating_context_calibrates_once_on_first_tensor():
    q = UniformQuantizer(4, search="minmax")
    module = torch.nn.Sequential(q)
    first, second = randn(100), randn(100, scale=10.0, seed=1)
    with calibrating(module):
        module(first)
        scale = q.scale.clone()
        module(second)  # already calibrated: not recalibrated by a later call
    assert torch.equal(q.scale, scale)
    assert q.scale.item() == pytest.approx((first.max() - first.min()).item() / 15, rel=1e-5)
    module(second)  # outside the context: plain quantization
    assert torch.equal(q.scale, scale)
    assert not q._calibrate_next


def test_calibrating_skips_disabled_and_weight_quantizers():
    act, off, weight = UniformQuantizer(4), UniformQuantizer(4), AdaRoundQuantizer(4)
    off.enabled = False
    module = torch.nn.ModuleList([act, off, weight])
    with calibrating(module):
        assert act._calibrate_next and not off._calibrate_next and not weight._calibrate_next
    assert not act._calibrate_next



@pytest.mark.parametrize("shape", [(3, 1), (2, 7), (4, 1000), (1, 20000)])
def test_order_statistics_equal_a_full_sort(shape):
    """The tails read by topk are the sorted row's values at every percentile position, ties included."""
    from adfq_lightning.quantizers.uniform import MSE_PERCENTILES, order_statistics

    torch.manual_seed(0)
    g = torch.randn(shape).round(decimals=1)  # many ties
    n = shape[1]
    positions = {min(max(int(round(p * (n - 1))), 0), n - 1) for q in MSE_PERCENTILES for p in (q, 1 - q)}
    ordered = g.sort(dim=1).values
    values = order_statistics(g, positions)
    assert set(values) == positions
    for p in positions:
        assert torch.equal(values[p], ordered[:, p]), p
