"""The C++ CPU kernels of the training BatchNorm ops (torch.ops.resnet_fused.bn_stats, bn_act_apply,
bn_act_backward_reduce, bn_act_backward_apply, bn_update_running_stats_) against their spec, the
plain-torch functions at the end of reference.py.

Every case is computed three ways: the op, the reference on float64 copies of the same inputs
("exact"), and the reference in the inputs' own dtypes ("unfused"). fp32 must be within 1e-5 of
exact, fp64 within 1e-12; bf16 activations follow the 2x rule of helpers.assert_low_precision_close,
while per-channel outputs (float32 even for bf16 input) are held to the fp32 bound.
"""

from __future__ import annotations

import pytest
import torch

from helpers import act_args, assert_low_precision_close, max_rel_error
from resnet_fused import _extension
from resnet_fused.ops import reference

ops = torch.ops.resnet_fused
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# (N, K, H, W): odd everything; K = 67 leaves a partial vector of channels in channels_last.
SHAPES = {"odd": (3, 5, 7, 9), "k67": (2, 67, 5, 3)}
EPS = 1e-5


def test_extension_is_built():
    assert _extension.has_cpu_ops(), _extension.LOAD_ERROR


def layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def activation(shape, dtype, channels_last, seed, offset=0.0, spread=1.0):
    """Per-channel offsets and spreads, so a kernel that mixed up channels could not pass."""
    g = torch.Generator().manual_seed(seed)
    k = shape[1]
    mean = offset + torch.randn(k, generator=g, dtype=torch.float64) * 0.5
    std = spread * (torch.rand(k, generator=g, dtype=torch.float64) + 0.5)
    y = torch.randn(shape, generator=g, dtype=torch.float64) * std[:, None, None] + mean[:, None, None]
    return layout(y.to(dtype), channels_last)


def channel_params(k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(k, generator=g) + 0.5).to(dtype), (torch.randn(k, generator=g) * 0.3).to(dtype)


def double(args):
    return [a.double() if isinstance(a, torch.Tensor) else a for a in args]


def assert_close(actual, exact, unfused):
    """The module docstring's rule, chosen by the result's dtype."""
    assert actual.dtype == unfused.dtype and actual.shape == exact.shape
    if actual.dtype == torch.float64:
        assert max_rel_error(actual, exact) < 1e-12
    elif actual.dtype == torch.float32:
        assert max_rel_error(actual, exact) < 1e-5
    else:
        assert_low_precision_close(actual, unfused, exact)


def assert_format(t, channels_last):
    assert t.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_stats(y):
    """Per-channel fp32/fp64 mean and var, exact up to their own rounding."""
    mean, var = reference.bn_stats(y.double())
    return mean.to(acc(y.dtype)), var.to(acc(y.dtype))


# ------------------------------------------------------------------------------------- bn_stats


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_stats(shape, dtype, channels_last):
    y = activation(shape, dtype, channels_last, seed=1, offset=2.0)
    mean, var = ops.bn_stats(y)
    exact = reference.bn_stats(y.double())
    for actual, e in zip((mean, var), exact):
        assert actual.dtype == acc(dtype) and actual.shape == (shape[1],)
        assert max_rel_error(actual, e) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_stats_large_mean_small_spread(dtype, channels_last):
    """mean 1000, std 0.01: E[y^2] - E[y]^2 in fp32 loses every digit of var (relative error ~1e2),
    a single long fp32 running sum is biased by ~1e-5; chunked two-pass + Chan merging is not."""
    g = torch.Generator().manual_seed(2)
    y = layout((torch.randn(1, 3, 200, 150, generator=g) * 0.01 + 1000.0).to(dtype), channels_last)
    mean, var = ops.bn_stats(y)
    # Two passes in fp64 as the oracle: torch.var_mean's fp64 Welford is itself 7e-12 off here.
    exact_mean = y.double().mean(dim=(0, 2, 3), keepdim=True)
    exact_var = ((y.double() - exact_mean) ** 2).mean(dim=(0, 2, 3))
    exact_mean = exact_mean.flatten()
    bound = 1e-12 if dtype == torch.float64 else 1e-5
    assert max_rel_error(var, exact_var) < bound
    assert max_rel_error(mean, exact_mean) < bound


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 5)], ids=["n0", "hw0"])
def test_empty_input(shape):
    """No values: stats are NaN (what torch.var_mean returns), sums are 0, outputs are empty."""
    y = torch.randn(shape)
    mean, var = ops.bn_stats(y)
    assert mean.shape == var.shape == (3,) and mean.isnan().all() and var.isnan().all()
    with pytest.warns(UserWarning):  # torch warns about the zero degrees of freedom; the op does not
        assert reference.bn_stats(y)[1].isnan().all()
    m, v = torch.zeros(3), torch.ones(3)
    assert ops.bn_act_apply(y, m, v, None, None, EPS, y, *act_args(True)).shape == shape
    sum_g, sum_g_xhat = ops.bn_act_backward_reduce(y, y, y, m, v, None, None, EPS, *act_args(True))
    assert sum_g.tolist() == sum_g_xhat.tolist() == [0.0] * 3
    args = (y, y, y, m, v, None, None, EPS, sum_g, sum_g_xhat, 1, True, *act_args(True))
    dy, d_res = ops.bn_act_backward_apply(*args, True)
    assert dy.shape == d_res.shape == shape
    _, d_res = ops.bn_act_backward_apply(*args, False)
    assert d_res.shape == (0,)


# ------------------------------------------------------------------------------------- bn_act_apply


@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma", "nogamma"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_apply(dtype, channels_last, with_residual, relu, with_gamma):
    shape = SHAPES["k67" if with_gamma and relu else "odd"]
    y = activation(shape, dtype, channels_last, seed=3, offset=1.0)
    mean, var = batch_stats(y)
    gamma, beta = channel_params(shape[1], 4) if with_gamma else (None, None)
    residual = activation(shape, dtype, channels_last, seed=5) if with_residual else None
    args = (y, mean, var, gamma, beta, EPS, residual, *act_args(relu))
    out = ops.bn_act_apply(*args)
    assert_close(out, reference.bn_act_apply(*double(args)), reference.bn_act_apply(*args))
    assert_format(out, channels_last)


def test_apply_nan_propagates():
    y = torch.randn(2, 3, 4, 5)
    y[1, 2, 3, 4] = float("nan")
    y[0, 0, 0, 0] = float("-inf")
    out = ops.bn_act_apply(y, torch.zeros(3), torch.ones(3), None, None, EPS, None, *act_args(True))
    assert out[1, 2, 3, 4].isnan() and out[0, 0, 0, 0] == 0  # relu(NaN) = NaN, relu(-inf) = 0
    assert out.isnan().sum() == 1


def test_per_channel_tensors_of_other_dtypes():
    """Per-channel inputs of any floating dtype (fp16 buffers of a .half() model, bf16, fp64) are
    converted to the acc type first: the result is that of passing their float32 conversions."""
    y = activation(SHAPES["odd"], torch.bfloat16, True, seed=6)
    grad_out = activation(SHAPES["odd"], torch.bfloat16, True, seed=7)
    mean, var = batch_stats(y)
    gamma, beta = channel_params(5, 8)
    mixed = dict(mean=mean.bfloat16(), var=var.half(), gamma=gamma.double(), beta=beta.half())
    fp32 = {name: t.float() for name, t in mixed.items()}

    def run(mean, var, gamma, beta):
        out = ops.bn_act_apply(y, mean, var, gamma, beta, EPS, None, *act_args(True))
        sums = ops.bn_act_backward_reduce(grad_out, out, y, mean, var, None, None, EPS, *act_args(True))
        return out, *sums, *ops.bn_act_backward_apply(grad_out, out, y, mean, var, gamma, None, EPS, sums[0].half(),
                                                      sums[1].double(), 315, True, *act_args(True), False)

    for a, e in zip(run(**mixed), run(**fp32)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- backward


def backward_case(shape, dtype, channels_last, relu, seed):
    """y, the forward output (with exact zeros where the ReLU clipped) and a gradient."""
    y = activation(shape, dtype, channels_last, seed, offset=0.5)
    mean, var = batch_stats(y)
    gamma, beta = channel_params(shape[1], seed + 1)
    out = ops.bn_act_apply(y, mean, var, gamma, beta, EPS, None, *act_args(relu))
    grad_out = activation(shape, dtype, channels_last, seed + 2)
    return grad_out, out, y, mean, var, gamma


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_backward_reduce(shape, dtype, channels_last, relu):
    grad_out, out, y, mean, var, _ = backward_case(shape, dtype, channels_last, relu, seed=10)
    args = (grad_out, out, y, mean, var, None, None, EPS, *act_args(relu))
    sums = ops.bn_act_backward_reduce(*args)
    for actual, exact in zip(sums, reference.bn_act_backward_reduce(*double(args))):
        assert actual.dtype == acc(dtype) and actual.shape == (shape[1],)
        assert max_rel_error(actual, exact) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma", "nogamma"])
@pytest.mark.parametrize("residual_grad", [True, False], ids=["dres", "nodres"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_backward_apply(dtype, channels_last, relu, training, residual_grad, with_gamma):
    shape = SHAPES["k67" if training and with_gamma else "odd"]
    grad_out, out, y, mean, var, gamma = backward_case(shape, dtype, channels_last, relu, seed=20)
    gamma = gamma if with_gamma else None
    sum_g, sum_g_xhat = (s.to(acc(dtype)) for s in reference.bn_act_backward_reduce(
        *double((grad_out, out, y, mean, var, None, None, EPS, *act_args(relu)))))
    count = y.numel() // shape[1]
    args = (grad_out, out, y, mean, var, gamma, None, EPS, sum_g, sum_g_xhat, count, training, *act_args(relu),
            residual_grad)
    dy, d_res = ops.bn_act_backward_apply(*args)
    exact, unfused = reference.bn_act_backward_apply(*double(args)), reference.bn_act_backward_apply(*args)
    assert_close(dy, exact[0], unfused[0])
    assert_format(dy, channels_last)
    if residual_grad:
        assert_format(d_res, channels_last)
        torch.testing.assert_close(d_res, unfused[1], rtol=0, atol=0)  # g itself: exact
    else:
        assert d_res.shape == (0,) and d_res.dtype == dtype


def test_backward_count_from_argument():
    """Under SyncBatchNorm the statistics cover more values than this tensor holds: count wins."""
    grad_out, out, y, mean, var, gamma = backward_case(SHAPES["odd"], torch.float64, False, True, seed=30)
    sum_g, sum_g_xhat = ops.bn_act_backward_reduce(grad_out, out, y, mean, var, None, None, EPS, *act_args(True))
    args = (grad_out, out, y, mean, var, gamma, None, EPS, sum_g * 3, sum_g_xhat * 3, 3 * y.numel() // 5, True,
            *act_args(True), False)
    assert max_rel_error(ops.bn_act_backward_apply(*args)[0], reference.bn_act_backward_apply(*args)[0]) < 1e-12


def test_relu_mask_and_eval_ignores_sums():
    """g is 0 where out <= 0 and passes where out is NaN (torch's threshold_backward), whatever
    grad_out holds; in eval the sums are unread."""
    y = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    out = torch.randn_like(y)
    out[0, 0, 0, :2] = float("nan")
    out[0, 1, 0, 0] = 0.0
    grad_out = torch.randn_like(y)
    grad_out[0, 1, 1, 1] = float("nan")
    m, v = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    sums = torch.full((2,), float("nan"), dtype=torch.float64)
    dy, d_res = ops.bn_act_backward_apply(grad_out, out, y, m, v, None, None, 0.0, sums, sums, 24, False,
                                          *act_args(True), True)
    expected = torch.ops.aten.threshold_backward(grad_out, out, 0.0)
    torch.testing.assert_close(d_res, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(dy, expected, rtol=0, atol=0, equal_nan=True)
    assert d_res[0, 0, 0, :2].equal(grad_out[0, 0, 0, :2]) and d_res[0, 1, 0, 0] == 0


# ------------------------------------------------------------------------------------- running stats


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_update_running_stats(running_dtype):
    g = torch.Generator().manual_seed(40)
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
    running_mean = (torch.randn(6, generator=g) * 0.3).to(running_dtype)
    running_var = (torch.rand(6, generator=g) + 0.5).to(running_dtype)
    expected = [t.double() for t in (running_mean, running_var)]
    reference.update_running_stats(*expected, mean.double(), var.double(), 50, 0.1)
    ptrs = running_mean.data_ptr(), running_var.data_ptr()
    ops.bn_update_running_stats_(running_mean, running_var, mean, var, 50, 0.1)
    assert (running_mean.data_ptr(), running_var.data_ptr()) == ptrs and running_mean.dtype == running_dtype
    for actual, exact in zip((running_mean, running_var), expected):
        # Rounded once from the acc type: within one ulp of the running dtype.
        tol = 1e-12 if running_dtype == torch.float64 else torch.finfo(running_dtype).eps
        assert ((actual.double() - exact).abs() <= tol * exact.abs()).all()


def test_running_stats_match_batch_norm_module():
    """bn_stats + bn_update_running_stats_ move the buffers as nn.BatchNorm2d's train step does."""
    y = activation(SHAPES["k67"], torch.float32, True, seed=41, offset=3.0)
    bn = torch.nn.BatchNorm2d(67, momentum=0.3).train()
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    bn(y)
    mean, var = ops.bn_stats(y)
    ops.bn_update_running_stats_(running_mean, running_var, mean, var, y.numel() // 67, 0.3)
    torch.testing.assert_close(running_mean, bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(running_var, bn.running_var, rtol=1e-6, atol=1e-7)


def test_running_stats_strided_buffers():
    """Non-contiguous running tensors are updated in place too (through a copy)."""
    buffers = torch.zeros(2, 4)
    rm, rv = buffers[0], torch.ones(8)[::2]
    ops.bn_update_running_stats_(rm, rv, torch.ones(4), torch.full((4,), 2.0), 5, 0.5)
    torch.testing.assert_close(buffers[0], torch.full((4,), 0.5))
    torch.testing.assert_close(rv, torch.full((4,), 0.5 + 0.5 * 2.0 * 5 / 4))


# ------------------------------------------------------------------------------------- layouts, determinism


def test_operands_in_other_layouts():
    """Operands are copied into y's layout first; results do not depend on the operands' layouts."""
    y = activation(SHAPES["k67"], torch.float32, True, seed=50)
    mean, var = batch_stats(y)
    gamma, beta = channel_params(67, 51)
    residual = activation(SHAPES["k67"], torch.float32, True, seed=52)
    grad_out = activation(SHAPES["k67"], torch.float32, True, seed=53)

    def run(res, grad):
        out = ops.bn_act_apply(y, mean, var, gamma, beta, EPS, res, *act_args(True))
        sums = ops.bn_act_backward_reduce(grad, out, y, mean, var, None, None, EPS, *act_args(True))
        back = ops.bn_act_backward_apply(grad, out, y, mean, var, gamma, None, EPS, *sums, 30, True, *act_args(True),
                                         True)
        return out, *sums, *back

    expected = run(residual, grad_out)
    # NCHW copies, and non-dense views (every other element of a wider tensor).
    wide = torch.empty(*SHAPES["k67"][:3], 6).copy_(grad_out.repeat_interleave(2, dim=3))
    for res, grad in ((residual.contiguous(), grad_out.contiguous()), (residual.contiguous(), wide[..., ::2])):
        for a, e in zip(run(res, grad), expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
            assert a.dim() == 1 or a.is_contiguous(memory_format=torch.channels_last)


def test_non_dense_y_is_treated_as_nchw():
    base = activation((2, 5, 6, 8), torch.float32, True, seed=54)
    y = base[:, :, ::2, 1:]  # a view of a channels_last tensor that is not dense in any layout
    assert not y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    mean, var = ops.bn_stats(y)
    assert max_rel_error(var, reference.bn_stats(y.double())[1]) < 1e-5
    out = ops.bn_act_apply(y, mean, var, None, None, EPS, None, *act_args(False))
    assert out.is_contiguous()
    torch.testing.assert_close(out, ops.bn_act_apply(y.contiguous(), mean, var, None, None, EPS, None,
                                                     *act_args(False)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_reductions_do_not_depend_on_thread_count(channels_last):
    shape = (3, 67, 47, 45)  # 2 chunks per plane, 100 row blocks, each set with a short last one
    y = activation(shape, torch.float32, channels_last, seed=60, offset=5.0)
    grad_out = activation(shape, torch.float32, channels_last, seed=61)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            mean, var = ops.bn_stats(y)
            out = ops.bn_act_apply(y, mean, var, None, None, EPS, None, *act_args(True))
            results.append((mean, var, *ops.bn_act_backward_reduce(grad_out, out, y, mean, var, None, None, EPS,
                                                                   *act_args(True))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- contracts, errors


def op_cases(channels_last):
    y = activation(SHAPES["odd"], torch.float32, channels_last, seed=70)
    mean, var = batch_stats(y)
    gamma, beta = channel_params(5, 71)
    residual = activation(SHAPES["odd"], torch.float32, channels_last, seed=72)
    out = ops.bn_act_apply(y, mean, var, gamma, beta, EPS, residual, *act_args(True))
    sums = ops.bn_act_backward_reduce(residual, out, y, mean, var, None, None, EPS, *act_args(True))
    return [
        (ops.bn_stats.default, (y,)),
        (ops.bn_act_apply.default, (y, mean, var, gamma, beta, EPS, residual, *act_args(True))),
        (ops.bn_act_apply.default, (y, mean, var, None, None, EPS, None, *act_args(False))),
        (ops.bn_act_backward_reduce.default, (residual, out, y, mean, var, None, None, EPS, *act_args(True))),
        (ops.bn_act_backward_apply.default,
         (residual, out, y, mean, var, gamma, None, EPS, *sums, 315, True, *act_args(True), True)),
        (ops.bn_act_backward_apply.default,
         (residual, out, y, mean, var, None, None, EPS, *sums, 315, False, *act_args(False), False)),
        (ops.bn_update_running_stats_.default, (torch.zeros(5), torch.ones(5), mean, var, 315, 0.1)),
    ]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_op_contract(channels_last):
    """opcheck: schema (incl. the declared mutation), fake kernels' shapes/strides, dispatch."""
    for op, args in op_cases(channels_last):
        torch.library.opcheck(op, args)


def test_compiles_in_one_graph():
    """The fake kernels let Dynamo/AOT trace a whole training unit without a graph break."""
    y = activation(SHAPES["odd"], torch.float32, True, seed=80)
    grad_out = activation(SHAPES["odd"], torch.float32, True, seed=81)
    gamma, beta = channel_params(5, 82)

    def unit(y, grad_out, running_mean, running_var):
        mean, var = ops.bn_stats(y)
        ops.bn_update_running_stats_(running_mean, running_var, mean, var, 315, 0.1)
        out = ops.bn_act_apply(y, mean, var, gamma, beta, EPS, None, *act_args(True))
        sums = ops.bn_act_backward_reduce(grad_out, out, y, mean, var, None, None, EPS, *act_args(True))
        return out, ops.bn_act_backward_apply(grad_out, out, y, mean, var, gamma, None, EPS, *sums, 315, True,
                                              *act_args(True), False)

    running = [torch.zeros(5), torch.ones(5)], [torch.zeros(5), torch.ones(5)]
    compiled = torch.compile(unit, backend="aot_eager", fullgraph=True)
    a, b = compiled(y, grad_out, *running[0]), unit(y, grad_out, *running[1])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(running[0], running[1], rtol=0, atol=0)


def test_bad_input_names_the_argument():
    y, m, v = torch.randn(2, 5, 3, 3), torch.zeros(5), torch.ones(5)
    with pytest.raises(RuntimeError, match=r"bn_act_apply: mean must be a 1-D tensor of length K=5.*got shape \[4\]"):
        ops.bn_act_apply(y, m[:4], v, None, None, EPS, None, *act_args(True))
    with pytest.raises(RuntimeError, match=r"bn_act_apply: gamma must be a 1-D tensor of length K=5"):
        ops.bn_act_apply(y, m, v, torch.ones(6), None, EPS, None, *act_args(True))
    with pytest.raises(RuntimeError, match="bn_stats: y must be float32, float16, bfloat16 or float64, got torch.int"):
        ops.bn_stats(y.long())
    with pytest.raises(RuntimeError, match="bn_stats: y must be a 4-D"):
        ops.bn_stats(y[0])
    with pytest.raises(RuntimeError, match="residual dtype torch.float64 does not match y dtype torch.float32"):
        ops.bn_act_apply(y, m, v, None, None, EPS, y.double(), *act_args(True))
    with pytest.raises(RuntimeError, match=r"bn_act_backward_reduce: out must have y's shape"):
        ops.bn_act_backward_reduce(y, y[:1], y, m, v, None, None, EPS, *act_args(True))
    with pytest.raises(RuntimeError, match="bn_act_backward_reduce: var must be a floating tensor, got torch.int64"):
        ops.bn_act_backward_reduce(y, y, y, m, v.long(), None, None, EPS, *act_args(True))
    with pytest.raises(RuntimeError, match="bn_act_backward_apply: sum_g must be a 1-D tensor of length K=5"):
        ops.bn_act_backward_apply(y, y, y, m, v, None, None, EPS, m[:2], m, 18, True, *act_args(True), False)
    with pytest.raises(RuntimeError, match="bn_act_backward_apply: count .* must be positive, got 0"):
        ops.bn_act_backward_apply(y, y, y, m, v, None, None, EPS, m, m, 0, True, *act_args(True), False)
    with pytest.raises(RuntimeError, match="eps must be non-negative and finite"):
        ops.bn_act_apply(y, m, v, None, None, -1.0, None, *act_args(True))
    for count in (1, 0):
        with pytest.raises(RuntimeError, match=f"bn_update_running_stats_: count .* must be > 1 .*got {count}"):
            ops.bn_update_running_stats_(m.clone(), v.clone(), m, v, count, 0.1)
    with pytest.raises(RuntimeError, match="running_var must be a 1-D tensor of length K=5"):
        ops.bn_update_running_stats_(m.clone(), v[:3].clone(), m, v, 10, 0.1)
    # "meta" stands in for a second device; a meta argument would dispatch to the fake kernel, so
    # the CPU kernel is called directly.
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match="bn_act_apply: mean is on meta but y is on cpu"):
        ops.bn_act_apply.default.redispatch(cpu, y, m.to("meta"), v, None, None, EPS, None, *act_args(True))
