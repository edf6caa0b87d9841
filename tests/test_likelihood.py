"""Fused reconstruction likelihoods against vae_fast.reference in float64, on every backend."""
import math
import warnings

import mpmath as mp
import pytest
import torch
import torch.nn.functional as F

import vae_fast
from vae_fast import _backend
from vae_fast import reference as ref

from .conftest import assert_matches_reference, thread_counts

ELEMENTWISE = {
    "bernoulli": (vae_fast.bernoulli_log_prob, ref.bernoulli_log_prob),
    "continuous_bernoulli": (vae_fast.continuous_bernoulli_log_prob, ref.continuous_bernoulli_log_prob),
    "gaussian": (vae_fast.gaussian_log_prob, ref.gaussian_log_prob),
}


def f64(t):
    return t.detach().double().cpu()


def make(shape, dtype, device, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    theta = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    x = torch.rand(shape[-3:] if len(shape) == 4 else shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return theta, x


@pytest.mark.parametrize("name", list(ELEMENTWISE))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("samples", [None, 3])
def test_elementwise_match_reference(backend, name, dtype, samples):
    fused, oracle = ELEMENTWISE[name]
    shape = (4, 3, 7, 5) if samples else (3, 7, 5)
    theta, x = make(shape, dtype, backend)
    got = fused(theta, x)
    expected = oracle(f64(theta), f64(x), batch_dims=2 if samples else 1)
    assert got.shape == expected.shape
    assert_matches_reference(got, expected, dtype, terms=35, what=name)


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_gradcheck(backend, name):
    fused, _ = ELEMENTWISE[name]
    theta, x = make((2, 3, 4), torch.float64, backend, scale=2.0)
    assert torch.autograd.gradcheck(lambda t: fused(t, x), (theta.requires_grad_(),))


@pytest.mark.parametrize("kind", ["float", "scalar", "per_pixel", "per_example", "per_x_example", "full", "channel"])
def test_gaussian_logvar_broadcasts_and_gets_gradients(backend, kind):
    mean, x = make((2, 3, 4, 5), torch.float64, backend)
    x = torch.rand(3, 4, 5, dtype=torch.float64, device=backend)
    lv = {
        "float": -1.5,
        "scalar": torch.tensor(0.7, dtype=torch.float64, device=backend),
        "per_pixel": torch.randn(4, 5, dtype=torch.float64, device=backend),
        "per_example": torch.randn(2, 3, 1, 1, dtype=torch.float64, device=backend),
        # one value per x row, shared by the K = 2 decoder samples (its (K*B, D) view is a copy: read per row)
        "per_x_example": torch.randn(3, 1, 1, dtype=torch.float64, device=backend),
        "full": torch.randn(2, 3, 4, 5, dtype=torch.float64, device=backend),
        "channel": torch.randn(1, 4, 1, dtype=torch.float64, device=backend),
    }[kind]
    got = vae_fast.gaussian_log_prob(mean, x, lv)
    lv_ref = lv if isinstance(lv, float) else f64(lv)
    assert_matches_reference(got, ref.gaussian_log_prob(f64(mean), f64(x), lv_ref, batch_dims=2), torch.float64, terms=20)
    inputs = (mean.clone().requires_grad_(),) + (() if isinstance(lv, float) else (lv.clone().requires_grad_(),))
    fn = (lambda m: vae_fast.gaussian_log_prob(m, x, lv)) if isinstance(lv, float) else (lambda m, v: vae_fast.gaussian_log_prob(m, x, v))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("samples", [None, 2])
def test_categorical_matches_reference_and_gradcheck(backend, dtype, samples):
    gen = torch.Generator().manual_seed(4)
    lead = (samples, 3) if samples else (3,)
    logits = (torch.randn(*lead, 2, 5, 256, generator=gen, dtype=torch.float64) * 4).to(backend, dtype)
    x = torch.randint(0, 256, (3, 2, 5), generator=gen).to(backend)
    got = vae_fast.categorical_log_prob(logits, x)
    assert_matches_reference(got, ref.categorical_log_prob(f64(logits), x.cpu(), batch_dims=len(lead)), dtype, terms=10 * 256)
    if dtype == torch.float64:
        small = logits[..., :1, :2, :7].detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda l: vae_fast.categorical_log_prob(l, x[:, :1, :2] % 7), (small,))


@pytest.mark.parametrize("samples", [None, 2])
def test_categorical_uint8_targets_match_int64_targets(backend, samples):
    # 8-bit pixels are read as uint8 (no int64 copy): the same values and gradients as their int64 indices;
    # a uint8 index beyond C (never negative) is out of support
    gen = torch.Generator().manual_seed(5)
    shape = (3, 4, 5, 256) if samples is None else (samples, 3, 4, 5, 256)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64).to(backend)
    target = torch.randint(0, 256, (3, 4, 5), generator=gen, dtype=torch.uint8).to(backend)
    by_uint8, by_int64 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = vae_fast.categorical_log_prob(by_uint8, target)
    want = vae_fast.categorical_log_prob(by_int64, target.long())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    expected = ref.categorical_log_prob(f64(logits), target.long().cpu(), batch_dims=logits.dim() - 3)
    assert_matches_reference(got, expected, torch.float64, terms=20)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(by_uint8.grad, by_int64.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"class indices in \[0, 200\)"):
        vae_fast.categorical_log_prob(logits[..., :200], target.clamp(min=200))


def test_equal_to_torch_where_torch_is_exact(backend):
    logits, x = make((6, 50), torch.float64, backend, seed=7)
    torch.testing.assert_close(vae_fast.bernoulli_log_prob(logits, x),
                               -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1))
    mean, _ = make((6, 50), torch.float64, backend, seed=8)
    lv = torch.randn(50, dtype=torch.float64, device=backend)
    torch.testing.assert_close(vae_fast.gaussian_log_prob(mean, x, lv),
                               torch.distributions.Normal(mean, torch.exp(0.5 * lv)).log_prob(x).sum(-1))
    cat_logits = torch.randn(6, 9, 11, dtype=torch.float64, device=backend)
    target = torch.randint(0, 11, (6, 9), device=backend)
    torch.testing.assert_close(vae_fast.categorical_log_prob(cat_logits, target),
                               -F.cross_entropy(cat_logits.transpose(1, 2), target, reduction="none").sum(-1))
    # torch's ContinuousBernoulli is exact away from its Taylor window around lambda = 1/2
    # and from lambda near 0 or 1 (where it clamps probabilities)
    moderate = logits.clamp(-5, 5)
    cb = torch.distributions.ContinuousBernoulli(logits=moderate, lims=(0.499999, 0.500001))
    torch.testing.assert_close(vae_fast.continuous_bernoulli_log_prob(moderate, x), cb.log_prob(x).sum(-1))


def mp_cb_log_norm_and_derivative(l):
    f = lambda v: mp.log(v / mp.tanh(v / 2)) if v != 0 else mp.log(2)  # noqa: E731
    return f(l), mp.diff(f, l) if l != 0 else mp.mpf(0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_continuous_bernoulli_exact_near_one_half_and_at_the_ends(kernel_backend, dtype):
    # (the textbook reference's autograd gradient itself cancels near l = 0: 1/l - 1/sinh l)
    backend = kernel_backend
    logits = torch.tensor([0.0, 1e-7, -1e-7, 3e-4, -0.3, 0.9999, 1.0, -1.0001, 2.5, 30.0, -30.0, 1e4, -1e4],
                          dtype=torch.float64)
    x = torch.full_like(logits, 0.25)
    theta = logits.to(device=backend, dtype=dtype).reshape(-1, 1).requires_grad_()
    got = vae_fast.continuous_bernoulli_log_prob(theta, x.to(device=backend, dtype=dtype).reshape(-1, 1))
    got.sum().backward()
    mp.mp.dps = 40
    # per element: x l - softplus(l) + log C(l); d/dl = x - sigmoid(l) + (log C)'(l)
    for i, l in enumerate(logits.tolist()):
        lm = mp.mpf(l)
        log_c, dlog_c = mp_cb_log_norm_and_derivative(lm)
        value = mp.mpf(0.25) * lm - mp.log1p(mp.exp(lm)) + log_c
        grad = mp.mpf(0.25) - 1 / (1 + mp.exp(-lm)) + dlog_c
        tol = 1e-14 if dtype == torch.float64 else 4e-7
        scale = max(1.0, abs(float(value)))
        assert abs(got[i].item() - float(value)) <= tol * scale, (l, got[i].item(), float(value))
        assert abs(theta.grad[i].item() - float(grad)) <= tol * max(1.0, abs(float(grad))), (l, theta.grad[i].item(), float(grad))


def test_bernoulli_extreme_logits_stay_finite_and_exact(backend):
    logits = torch.tensor([[1e4, -1e4, 50.0, -50.0, 0.0]], device=backend, requires_grad=True)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5]], device=backend)
    got = vae_fast.bernoulli_log_prob(logits, x)
    expected = ref.bernoulli_log_prob(f64(logits), f64(x))
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-6, atol=1e-5)
    got.sum().backward()
    torch.testing.assert_close(logits.grad.cpu(), torch.tensor([[0.0, 0.0, -1.0, 1.0, 0.0]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("lv", [-30.0, 30.0])
def test_gaussian_extreme_logvar(backend, lv):
    mean, x = make((3, 11), torch.float32, backend)
    got = vae_fast.gaussian_log_prob(mean, x, lv)
    expected = ref.gaussian_log_prob(f64(mean), f64(x), lv)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=2e-6, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    # half inputs are read natively and accumulated in float32: the log-likelihood is float32 and
    # exact to float32 rounding for the half-precision values given; the gradient is in the input dtype
    logits, x = make((3, 40), dtype, backend, scale=1.0)
    logits.requires_grad_(True)
    got = vae_fast.bernoulli_log_prob(logits, x)
    assert got.dtype == torch.float32
    assert_matches_reference(got, ref.bernoulli_log_prob(f64(logits), f64(x)), torch.float32, terms=40)
    got.sum().backward()
    assert logits.grad.dtype == dtype
    assert_matches_reference(logits.grad, x.double() - torch.sigmoid(f64(logits)), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["scalar", "per_example"])
def test_half_precision_learned_log_variance(backend, dtype, kind):
    # a half decoder output with a learned float32 log-variance (the SD / LDM autoencoder under autocast): the
    # log-variance gradient comes from each row's sum, kept in float32 (a row of 4096 errors of size ~10 sums to
    # ~2e5, beyond float16's range), and matches float64 autograd on the same half values. (The C++ backend
    # raised a ValueError here: the float32 cast of the broadcast log-variance materialised it.)
    gen = torch.Generator().manual_seed(3)
    mean = torch.zeros(2, 4096, dtype=dtype, device=backend, requires_grad=True)
    x = (torch.randn(2, 4096, generator=gen, dtype=torch.float64) * 10).to(device=backend, dtype=dtype)
    shape = () if kind == "scalar" else (2, 1)
    logvar = torch.full(shape, -0.5, device=backend, requires_grad=True)  # (exact in both half dtypes)
    log_prob = vae_fast.gaussian_log_prob(mean, x, logvar)
    (-log_prob.mean()).backward()
    lv64 = logvar.detach().double().cpu().requires_grad_()
    expected = ref.gaussian_log_prob(f64(mean), f64(x), lv64)
    (-expected.mean()).backward()
    assert torch.isfinite(logvar.grad).all()
    assert_matches_reference(log_prob, expected, torch.float32, terms=4096)
    assert_matches_reference(logvar.grad, lv64.grad, torch.float32, terms=4096)


def test_per_example_log_variance_of_a_single_value_event(backend):
    # D = 1 with a per-example log-variance: the row-sum gradient path reads it as a row-constant operand
    mean, x = make((5, 1), torch.float64, backend)
    logvar = torch.randn(5, 1, dtype=torch.float64, device=backend)
    assert torch.autograd.gradcheck(lambda m, v: vae_fast.gaussian_log_prob(m, x, v),
                                    (mean.requires_grad_(), logvar.requires_grad_()))


def test_reductions(backend):
    logits, x = make((4, 6), torch.float64, backend)
    per_example = vae_fast.bernoulli_log_prob(logits, x)
    torch.testing.assert_close(vae_fast.bernoulli_log_prob(logits, x, reduction="sum"), per_example.sum())
    torch.testing.assert_close(vae_fast.bernoulli_log_prob(logits, x, reduction="mean"), per_example.mean())
    with pytest.raises(ValueError, match="reduction"):
        vae_fast.bernoulli_log_prob(logits, x, reduction="avg")


def test_out_of_support_targets_raise_value_error_naming_x(backend):
    logits, x = make((2, 5), torch.float32, backend)
    for bad in (1.5, -0.1):
        x_bad = x.clone()
        x_bad[1, 3] = bad
        for fn in (vae_fast.bernoulli_log_prob, vae_fast.continuous_bernoulli_log_prob):
            with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
                fn(logits, x_bad)
    cat = torch.randn(2, 3, 8, device=backend)
    for bad in (8, -1):
        target = torch.zeros(2, 3, dtype=torch.int64, device=backend)
        target[0, 2] = bad
        with pytest.raises(ValueError, match=r"x must hold class indices in \[0, 8\)"):
            vae_fast.categorical_log_prob(cat, target)
    with vae_fast.validate_args(False):
        vae_fast.bernoulli_log_prob(logits, x_bad)  # opt-out: no check, no crash
    with pytest.raises(ValueError):
        vae_fast.bernoulli_log_prob(logits, x_bad)  # the context ended: checked again


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_in_x_raises_value_error_naming_x(backend, dtype):
    # data with a NaN is outside every likelihood's support (as torch.distributions' validation says), not a NaN
    # log p to find later: the kernels count it with the support check they already make, on every path (the
    # per-step call, samples, a learned scale, a fused head, elbo); the Triton mixture kernel returned 0.0 for it
    theta, x = make((3, 8), dtype, backend)
    x_nan = x.clone()
    x_nan[2, 7] = float("nan")  # the last element: any vector remainder is checked too
    images = torch.zeros(2, 3, 2, 2, dtype=dtype, device=backend)
    images[1, 2, 1, 1] = float("nan")
    learned = torch.zeros((), dtype=dtype, device=backend, requires_grad=True)
    calls = {
        r"\[0, 1\] for the bernoulli": lambda xx: vae_fast.bernoulli_log_prob(theta, xx),
        r"\[0, 1\] for the continuous_bernoulli": lambda xx: vae_fast.continuous_bernoulli_log_prob(theta, xx),
        "NaN for the gaussian": lambda xx: vae_fast.gaussian_log_prob(theta, xx),
        "NaN for the gaussian ": lambda xx: vae_fast.gaussian_log_prob(theta.expand(2, 3, 8), xx, learned),
        "NaN for the laplace": lambda xx: vae_fast.laplace_log_prob(theta, xx, learned),
        "NaN for the mean_squared_error": lambda xx: vae_fast.mse_log_prob(theta, xx),
        "NaN for the gaussian  ": lambda xx: vae_fast.linear_log_prob(theta.view(3, 2, 4), torch.ones(4, 4, dtype=dtype,
                                                                      device=backend), None, xx.view(3, 2, 4),
                                                                      likelihood="gaussian"),
        "NaN for the gaussian   ": lambda xx: vae_fast.elbo(xx, theta[:, :2], theta[:, 2:4], lambda z: z.repeat(1, 4),
                                                           likelihood="gaussian"),
    }
    for message, call in calls.items():
        call(x)  # (finite x: no error)
        with pytest.raises(ValueError, match="x must (lie in|not hold) " + message.strip()):
            call(x_nan)
    with pytest.raises(ValueError, match=r"x must lie in \[-1, 1\]"):
        vae_fast.dmol_packed_log_prob(images, torch.zeros(2, 30, 2, 2, dtype=dtype, device=backend))
    with vae_fast.validate_args(False):  # the opt-out: NaN in, NaN out
        assert vae_fast.gaussian_log_prob(theta, x_nan)[2].isnan()


def test_default_backward_runs_any_number_of_times_and_inplace_is_opt_in(kernel_backend):
    logits = torch.randn(3, 8, dtype=torch.float64, device=kernel_backend, requires_grad=True)
    x = torch.rand(3, 8, dtype=torch.float64, device=kernel_backend)
    loss = vae_fast.bernoulli_log_prob(logits, x).sum()  # upstream -1 per row is not the expected -1/3
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(logits.grad, 3 * first)
    with vae_fast.inplace_backward():
        loss = vae_fast.bernoulli_log_prob(logits, x).sum()
    logits.grad = None
    loss.backward(retain_graph=True)
    torch.testing.assert_close(logits.grad, first)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


def test_process_wide_inplace_backward_default_reaches_every_path():
    # the per-step Functions hold the settings' built-in values as class constants: a changed process default
    # must reach them (and the general path) as an override does, and setting it back must restore them
    from vae_fast import config

    logits, x = torch.randn(3, 8, requires_grad=True), torch.rand(3, 8)
    class_logits, target = torch.randn(3, 4, 5, requires_grad=True), torch.randint(0, 5, (3, 4))
    losses = (lambda: vae_fast.bernoulli_log_prob(logits, x).sum(),  # the step paths
              lambda: vae_fast.gaussian_log_prob(logits, x, torch.zeros((), requires_grad=True)).sum(),
              lambda: vae_fast.categorical_log_prob(class_logits, target).sum(),
              lambda: vae_fast.bernoulli_log_prob(logits.t(), x.t()).sum())  # the general path (transposed)
    try:
        vae_fast.set_inplace_backward(True)
        vae_fast.set_inplace_backward(True)  # (twice: still one changed default)
        assert config._Setting.changed_defaults == 1
        for make_loss in losses:
            loss = make_loss()
            loss.backward(retain_graph=True)
            with pytest.raises(RuntimeError, match="inplace_backward"):
                loss.backward()
    finally:
        vae_fast.set_inplace_backward(False)
    assert config._Setting.changed_defaults == 0
    for make_loss in losses:
        loss = make_loss()
        loss.backward(retain_graph=True)
        loss.backward()


def test_saved_for_backward_is_one_gradient_buffer(kernel_backend):
    logits = torch.randn(16, 300, device=kernel_backend, requires_grad=True)
    x = torch.rand(16, 300, device=kernel_backend)
    lv = torch.zeros((), device=kernel_backend, requires_grad=True)
    for fn, args in ((vae_fast.bernoulli_log_prob, (logits, x)), (vae_fast.continuous_bernoulli_log_prob, (logits, x)),
                     (vae_fast.gaussian_log_prob, (logits, x, lv))):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(*args)
        nbytes = sum(t.numel() * t.element_size() for t in saved)
        assert nbytes <= logits.numel() * 4 + 16 * 4, (fn.__name__, [tuple(t.shape) for t in saved])
        out.sum().backward()
    with torch.no_grad():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            vae_fast.bernoulli_log_prob(logits, x)
        assert saved == []


def test_non_contiguous_inputs(backend):
    logits = torch.randn(7, 4, dtype=torch.float64, device=backend).t()
    x = torch.rand(8, 7, dtype=torch.float64, device=backend)[::2]
    assert_matches_reference(vae_fast.bernoulli_log_prob(logits, x), ref.bernoulli_log_prob(f64(logits), f64(x)),
                             torch.float64, terms=7)


def test_opcheck_likelihood_ops(kernel_backend):
    dev = kernel_backend
    theta = torch.randn(4, 6, device=dev, requires_grad=True)
    x = torch.rand(2, 6, device=dev)
    lv = torch.randn(1, 6, device=dev).expand(4, 6)
    for code in (0, 1):
        torch.library.opcheck(torch.ops.vae_fast.elementwise_log_prob.default, (theta, x, None, code, 1, True, False))
    torch.library.opcheck(torch.ops.vae_fast.elementwise_log_prob.default, (theta, x, lv, 2, 1, True, True))
    # a learned scalar log-variance of a bfloat16 output: per-row sums in float32, as the fake kernel says
    half = theta.detach().to(torch.bfloat16).requires_grad_()
    scalar = torch.zeros((), device=dev, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.vae_fast.elementwise_log_prob.default,
                          (half, x.to(torch.bfloat16), scalar, 4, 1, True, True, -0.25))
    # a channels-last decoder output: the gradients' strides as the fake implementation says
    images = torch.randn(2, 3, 2, 2, device=dev).to(memory_format=torch.channels_last).requires_grad_()
    data = torch.rand(2, 3, 2, 2, device=dev).to(memory_format=torch.channels_last)
    for code, lv in ((0, None), (2, torch.randn(3, 2, 2, device=dev, requires_grad=True)),
                     (4, torch.randn(2, 1, 1, 1, device=dev, requires_grad=True))):
        torch.library.opcheck(torch.ops.vae_fast.elementwise_log_prob.default,
                              (images, data, lv, code, 1, True, lv is not None))
    # (x with fewer rows, read per x row: the contiguous path)
    torch.library.opcheck(torch.ops.vae_fast.elementwise_log_prob.default, (images, data[:1], None, 0, 1, True, False))
    logits = torch.randn(4, 3, 5, device=dev, requires_grad=True)
    target = torch.randint(0, 5, (2, 3), device=dev)
    for indices in (target, target.to(torch.uint8)):
        torch.library.opcheck(torch.ops.vae_fast.categorical_log_prob.default, (logits, indices, 1, True))


def test_torch_compile_fullgraph(kernel_backend):
    if kernel_backend == "cpu" and _backend.backend("cpu") == "triton":
        pytest.skip("inductor does not compile for the Triton interpreter")
    logits = torch.randn(4, 10, device=kernel_backend, requires_grad=True)
    x = torch.rand(4, 10, device=kernel_backend)
    lv = torch.zeros((), device=kernel_backend, requires_grad=True)

    def fn(logits, lv):
        return (vae_fast.bernoulli_log_prob(logits, x).sum() + vae_fast.continuous_bernoulli_log_prob(logits, x).sum()
                + vae_fast.gaussian_log_prob(logits, x, lv).sum()
                + vae_fast.categorical_log_prob(logits.reshape(4, 2, 5), (x[:, :2] * 4).long()).sum())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(logits, lv)
    # (dynamo warned of the categorical support message's lru_cache, on a check it skips anyway)
    assert not [w for w in caught if "vae_fast" in str(w.message) or "likelihood.py" in str(w.message)]
    out.backward()
    grads = (logits.grad.clone(), lv.grad.clone())
    logits.grad = lv.grad = None
    eager = fn(logits, lv)
    eager.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grads, (logits.grad, lv.grad))


@pytest.mark.parametrize("loss_scale", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("wide", [False, True])
def test_expected_upstream_gradient_is_prescaled_and_backward_rescales_otherwise(backend, reduction, loss_scale, wide):
    # with loss = -log_p.mean() the kernel's gradient, written times -1/B, is returned as is;
    # any other upstream (x3) is rescaled
    # the kernels guess a negative log-likelihood loss (upstream -1/B for "mean", -1 for "sum").
    # The C++ backend checks the upstream gradient on the host at every size; wide: 2^18 elements
    if wide and vae_fast.backend(backend) != "cpu":
        pytest.skip("the wide case is for the C++ backend")
    width = 4096 if wide else 8
    logits = torch.randn(64, width, dtype=torch.float64, device=backend, requires_grad=True)
    x = torch.rand(64, width, dtype=torch.float64, device=backend)
    saved = []  # data pointers only: a reference held here would make autograd copy the gradient into .grad
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        loss = -loss_scale * vae_fast.bernoulli_log_prob(logits, x, reduction=reduction)
    loss.backward()
    expected_scale = -loss_scale / (64 if reduction == "mean" else 1)
    expected = expected_scale * (x - torch.sigmoid(logits.detach()))
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-15)
    if backend == "cpu" and loss_scale == 1.0 and vae_fast.backend("cpu") == "cpu":
        assert logits.grad.data_ptr() == saved[0]  # no scaling pass, no copy


def test_expected_upstream_through_elbo_with_samples_matches_plain_autograd(backend):
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(32, 4, generator=gen, dtype=torch.float64).to(backend).requires_grad_()
    logvar = torch.zeros(32, 4, dtype=torch.float64, device=backend, requires_grad=True)
    width = 8192 if vae_fast.backend(backend) == "cpu" else 16
    weight = torch.randn(4, width, generator=gen, dtype=torch.float64).to(backend)
    x = torch.bernoulli(torch.rand(32, width, generator=gen, dtype=torch.float64)).to(backend)
    eps = torch.randn(2, 32, 4, generator=gen, dtype=torch.float64).to(backend)
    for reduction in ("mean", "sum", "none"):
        mu.grad = None
        result = vae_fast.elbo(x, mu, logvar, lambda z: z @ weight, num_samples=2, eps=eps, reduction=reduction)
        result.loss.sum().backward()
        z = mu.detach().requires_grad_() + eps
        log_lik = ref.bernoulli_log_prob(z @ weight, x.expand(2, -1, -1), batch_dims=2).mean(0)
        loss = -(log_lik - ref.gaussian_kl(z[0] * 0 + mu.detach(), logvar.detach()))
        loss = {"mean": loss.mean(), "sum": loss.sum(), "none": loss.sum()}[reduction]
        (expected,) = torch.autograd.grad(loss, z)
        torch.testing.assert_close(mu.grad, expected.sum(0) + mu.detach() * (1 if reduction != "mean" else 1 / 32),
                                   rtol=1e-10, atol=1e-12)


def test_opcheck_with_expected_upstream(kernel_backend):
    dev = kernel_backend
    theta = torch.randn(4, 6, device=dev, requires_grad=True)
    x = torch.rand(2, 6, device=dev)
    torch.library.opcheck(torch.ops.vae_fast.elementwise_log_prob.default, (theta, x, None, 0, 1, True, False, -0.25))
    logits = torch.randn(4, 3, 5, device=dev, requires_grad=True)
    target = torch.randint(0, 5, (2, 3), device=dev)
    torch.library.opcheck(torch.ops.vae_fast.categorical_log_prob.default, (logits, target, 1, True, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_row_rescale_skips_rows_whose_factor_is_one(dtype):
    # the Triton backend applies grad_out / expected in place, deciding per row on the device
    # whether there is anything to do (no host sync); rows within 4 ulps of 1 are not touched
    if not _backend._triton_available():
        pytest.skip("needs triton")
    from vae_fast.kernels import triton as triton_kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    eps = torch.finfo(dtype).eps
    grad = torch.arange(5 * 37, dtype=dtype, device=device).reshape(5, 37) + 0.5
    before = grad.clone()
    factor = torch.tensor([1.0, 1.0 + eps, 2.0, -0.5, math.nan], dtype=dtype, device=device)
    out = triton_kernels.scale_rows_inplace(grad, factor, 4 * eps)
    assert out.data_ptr() == grad.data_ptr()
    assert torch.equal(out[:2], before[:2])  # untouched
    torch.testing.assert_close(out[2:4], before[2:4] * factor[2:4, None], rtol=0, atol=0)
    assert torch.isnan(out[4]).all()  # a NaN upstream gradient propagates
    empty = torch.empty(0, 5, dtype=dtype, device=device)
    assert triton_kernels.scale_rows_inplace(empty, factor[:0], 4 * eps).shape == (0, 5)


# ------------------------------------------------------------------ channels-last decoder outputs

F64 = torch.float64
# name -> (vae_fast function, float64 reference, whether it takes a scale (logvar / log_scale))
_SCALED_LIKELIHOODS = {
    "bernoulli": (vae_fast.bernoulli_log_prob, ref.bernoulli_log_prob, False),
    "continuous_bernoulli": (vae_fast.continuous_bernoulli_log_prob, ref.continuous_bernoulli_log_prob, False),
    "mse": (vae_fast.mse_log_prob, ref.mean_squared_error_log_prob, False),
    "gaussian": (vae_fast.gaussian_log_prob, ref.gaussian_log_prob, True),
    "laplace": (vae_fast.laplace_log_prob, ref.laplace_log_prob, True),
}


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


_SCALES = ["none", "float", "learned scalar", "per example", "per pixel", "per channel", "channels-last head"]


@pytest.mark.parametrize("name,scale", [(name, scale) for name, (_, _, has_scale) in _SCALED_LIKELIHOODS.items()
                                        for scale in (_SCALES if has_scale else ["none"])])
@pytest.mark.parametrize("spatial", [(3, 2), (2, 3, 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last_decoder_outputs(backend, name, scale, spatial, dtype):
    """A conv decoder run in torch.channels_last: values and every gradient as the float64 reference's (autograd
    through it), theta's gradient channels-last like theta (as torch's elementwise ops give it)."""
    fused, oracle, _ = _SCALED_LIKELIHOODS[name]
    gen = torch.Generator().manual_seed(7)
    shape = (3, 4, *spatial)
    theta = _channels_last(torch.randn(shape, generator=gen, dtype=F64) * 2).to(backend, dtype).requires_grad_()
    x = _channels_last(torch.rand(shape, generator=gen, dtype=F64)).to(backend, dtype)
    if name not in ("bernoulli", "continuous_bernoulli"):
        x.requires_grad_()
    lv = {"none": None, "float": -0.4, "learned scalar": torch.tensor(0.3, dtype=F64),
          "per example": torch.randn(3, 1, *(1,) * len(spatial), generator=gen, dtype=F64),
          "per pixel": torch.randn(4, *spatial, generator=gen, dtype=F64),
          "per channel": torch.randn(4, *(1,) * len(spatial), generator=gen, dtype=F64),
          "channels-last head": _channels_last(torch.randn(shape, generator=gen, dtype=F64))}[scale]
    if isinstance(lv, torch.Tensor):
        lv = lv.to(backend, dtype).requires_grad_()
    args = () if lv is None else (lv,)
    got = fused(theta, x, *args)
    leaves = [t for t in (theta, x, lv) if isinstance(t, torch.Tensor) and t.requires_grad]
    upstream = torch.linspace(-1, 1, 3, dtype=dtype, device=backend)  # not the expected one: the scaling path too
    grads = torch.autograd.grad((got * upstream).sum(), leaves)
    ref_leaves = [f64(t).requires_grad_() for t in leaves]
    ref_args = dict(zip([id(t) for t in leaves], ref_leaves))
    theta64, x64 = ref_args.get(id(theta), f64(theta)), ref_args.get(id(x), f64(x))
    lv64 = ref_args.get(id(lv), lv if not isinstance(lv, torch.Tensor) else f64(lv))
    expected = oracle(theta64, x64) if lv is None else oracle(theta64, x64, lv64)
    expected_grads = torch.autograd.grad((expected * f64(upstream)).sum(), ref_leaves)
    terms = math.prod(shape[1:])
    assert_matches_reference(got, expected, dtype, terms=terms, what=name)
    for leaf, g, want in zip(leaves, grads, expected_grads):
        assert_matches_reference(g, want, dtype, terms=terms if leaf is lv else 1, what=f"{name} gradient")
    assert grads[0].stride() == theta.stride()  # theta's layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_rows_are_summed_in_blocks_the_same_on_any_number_of_threads(dtype):
    # rows longer than a C++ work block (8192 elements; a categorical row of more than 8192 / C pixels: 32 at
    # C = 256) are cut into blocks that the threads share (a fused head's chunk holds one example); a row's sums
    # are its blocks' sums added in order: the reference's values, bit for bit the same on 1, 2 or 3 threads
    gen = torch.Generator().manual_seed(5)
    rows, width = 3, 3 * 8192 + 100  # four blocks, the last short
    theta = torch.randn(rows, width, generator=gen, dtype=dtype)
    x = torch.rand(rows, width, generator=gen, dtype=dtype)
    logits = torch.randn(rows, 100, 256, generator=gen, dtype=dtype)
    target = torch.randint(0, 256, (rows, 100), generator=gen)
    # extreme values in the last, short block: saturated logits, a far-off mean, x at the ends of its support
    theta[:, -4:] = torch.tensor([60.0, -60.0, 25.0, -25.0], dtype=dtype)
    x[:, -2:] = torch.tensor([0.0, 1.0], dtype=dtype)
    logits[:, -1, :3] = torch.tensor([80.0, -80.0, 40.0], dtype=dtype)
    target[:, -1] = 1  # (the -80 logit: log p near -120)
    cases = {  # name -> (vae_fast call, float64 reference) of (theta or logits, scale)
        "bernoulli": (lambda t, s: vae_fast.bernoulli_log_prob(t, x), lambda t, s: ref.bernoulli_log_prob(t, f64(x))),
        "continuous bernoulli": (lambda t, s: vae_fast.continuous_bernoulli_log_prob(t, x),
                                 lambda t, s: ref.continuous_bernoulli_log_prob(t, f64(x))),
        "mse": (lambda t, s: vae_fast.mse_log_prob(t, x), lambda t, s: ref.mean_squared_error_log_prob(t, f64(x))),
        "gaussian, learned scale": (lambda t, s: vae_fast.gaussian_log_prob(t, x, s),
                                    lambda t, s: ref.gaussian_log_prob(t, f64(x), s)),
        "laplace, learned scale": (lambda t, s: vae_fast.laplace_log_prob(t, x, s),
                                   lambda t, s: ref.laplace_log_prob(t, f64(x), s)),
        "categorical": (lambda t, s: vae_fast.categorical_log_prob(t, target),
                        lambda t, s: ref.categorical_log_prob(t, target)),
    }
    for name, (call, reference) in cases.items():
        operand = logits if name == "categorical" else theta
        # float64 reference values and gradients (theta's; the learned scale's, a sum over every block)
        leaves64 = (f64(operand).requires_grad_(), torch.tensor(0.3, dtype=torch.float64, requires_grad=True))
        want = reference(*leaves64)
        want_grads = torch.autograd.grad(-want.mean(), leaves64 if "scale" in name else leaves64[:1])
        results = []
        for _ in thread_counts():
            leaves = (operand.clone().requires_grad_(), torch.tensor(0.3, dtype=dtype, requires_grad=True))
            log_p = call(*leaves)
            results.append((log_p.detach(), *torch.autograd.grad(-log_p.mean(), leaves if "scale" in name
                                                                 else leaves[:1])))
        assert_matches_reference(results[0][0], want, dtype, terms=width, what=name)
        for got, expected in zip(results[0][1:], want_grads):
            assert_matches_reference(got, expected, dtype, terms=width, what=f"{name} gradient")
        for other in results[1:]:
            for got, first in zip(other, results[0]):
                assert torch.equal(got, first), name


@pytest.mark.parametrize("scale_kind", ["scalar", "per_example", "full"])
def test_triton_long_rows_are_split_into_chunks(monkeypatch, scale_kind):
    # a row longer than a chunk (8192 elements on a GPU, 128 here) is shared by several programs (a batch of a few
    # SD-sized images fills the GPU); its log p, its invalid count and a per-row scale gradient are the chunks'
    # partial sums: the float64 reference's values and gradients, with K = 2 decoder samples sharing one x
    if not _backend._triton_available():
        pytest.skip("needs the Triton backend")
    import vae_fast.kernels.triton as tri

    monkeypatch.setattr(tri, "ROW_CHUNK", 128)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(8)
    width = 3 * 128 + 40  # four chunks, the last short
    assert tri.row_chunks(width) == (4, 128)
    theta = (torch.randn(2, 3, width, generator=gen, dtype=torch.float64) * 3).to(device)
    x = torch.rand(3, width, generator=gen, dtype=torch.float64).to(device)
    theta[..., -3:] = torch.tensor([60.0, -60.0, 25.0], dtype=torch.float64)  # extremes in the last chunk
    scale_shape = {"scalar": (), "per_example": (2, 3, 1), "full": (2, 3, width)}[scale_kind]
    scale = torch.randn(scale_shape, generator=gen, dtype=torch.float64).to(device)
    weights = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    with vae_fast.use_backend("triton"):
        for name, (fused, oracle, scaled) in _SCALED_LIKELIHOODS.items():
            if not scaled and scale_kind != "scalar":
                continue
            leaves = [theta.clone().requires_grad_(), scale.clone().requires_grad_()]
            leaves64 = [f64(t).requires_grad_() for t in leaves]
            got = fused(*leaves[:1], x, *leaves[1:2] if scaled else ())
            want = oracle(*leaves64[:1], f64(x), *leaves64[1:2] if scaled else (), batch_dims=2)
            assert_matches_reference(got, want, torch.float64, terms=width, what=name)
            (got * weights.to(device)).sum().backward()
            (want * weights).sum().backward()
            for got_leaf, want_leaf, what in zip(leaves, leaves64, ("theta", "scale")[:1 + scaled]):
                torch.testing.assert_close(got_leaf.grad.cpu(), want_leaf.grad, rtol=1e-10, atol=1e-10,
                                           msg=f"{name}: d/d{what}")
        bad_x = x.clone()
        bad_x[1, -1] = 1.5  # out of the support, in a row's last chunk
        with pytest.raises(ValueError, match="x"):
            vae_fast.bernoulli_log_prob(theta, bad_x)
