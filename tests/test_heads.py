"""Fused decoder heads (``vae_fast.linear_log_prob``): values and gradients equal the unfused
F.linear + likelihood in float64, for every likelihood, both layouts, K samples and chunkings."""
import pytest
import torch
import torch.nn.functional as F

import vae_fast
from vae_fast import reference as ref

from .conftest import assert_matches_reference

F64 = torch.float64


def _unfused(likelihood, out, x, scale):
    if likelihood == "bernoulli":
        return ref.bernoulli_log_prob(out, x, batch_dims=out.dim() - x.dim() + 1)
    if likelihood == "continuous_bernoulli":
        return ref.continuous_bernoulli_log_prob(out, x, batch_dims=out.dim() - x.dim() + 1)
    if likelihood == "gaussian":
        return ref.gaussian_log_prob(out, x, scale, batch_dims=out.dim() - x.dim() + 1)
    if likelihood == "laplace":
        return ref.laplace_log_prob(out, x, scale, batch_dims=out.dim() - x.dim() + 1)
    raise AssertionError(likelihood)


def _case(likelihood, channel_dim, samples, device, gen, batch=3, features=5, out_features=4, pixels=(2, 3)):
    if channel_dim == -1:
        lead = (samples, batch) if samples > 1 else (batch,)
        h = torch.randn(*lead, *pixels, features, generator=gen, dtype=F64)
        x_shape = (batch, *pixels, out_features)
    else:
        h = torch.randn(batch, features, *pixels, generator=gen, dtype=F64)
        x_shape = (batch, out_features, *pixels)
    if likelihood == "categorical":
        x = torch.randint(0, out_features, x_shape[:-1] if channel_dim == -1 else (batch, *pixels), generator=gen)
    elif likelihood in ("bernoulli", "continuous_bernoulli"):
        x = torch.rand(x_shape, generator=gen, dtype=F64)
    else:
        x = torch.randn(x_shape, generator=gen, dtype=F64)
    weight = 0.5 * torch.randn(out_features, features, generator=gen, dtype=F64)
    bias = 0.5 * torch.randn(out_features, generator=gen, dtype=F64)
    return h.to(device), weight.to(device), bias.to(device), x.to(device)


SCALES = {  # learned scale operands, in the output's layout (channel_dim=-1 / 1)
    "scalar": (lambda gen: torch.tensor(0.3, dtype=F64), lambda gen: torch.tensor(-0.2, dtype=F64)),
    "per_channel": (lambda gen: 0.3 * torch.randn(4, generator=gen, dtype=F64),
                    lambda gen: 0.3 * torch.randn(4, 1, 1, generator=gen, dtype=F64)),
    "per_example": (lambda gen: 0.3 * torch.randn(3, 1, 1, 1, generator=gen, dtype=F64),
                    lambda gen: 0.3 * torch.randn(3, 1, 1, 1, generator=gen, dtype=F64)),
}


def _check(likelihood, channel_dim, samples, backend, chunk_bytes, scale_kind=None, upstream="mean"):
    gen = torch.Generator().manual_seed(hash((likelihood, channel_dim, samples, scale_kind)) % 1000)
    h, weight, bias, x = _case(likelihood, channel_dim, samples, backend, gen)
    leaves = [t.requires_grad_() for t in (h, weight, bias)]
    kwargs, scale = {}, None
    if scale_kind is not None:
        scale = SCALES[scale_kind][0 if channel_dim == -1 else 1](gen).to(backend).requires_grad_()
        kwargs = {"logvar" if likelihood == "gaussian" else "log_scale": scale}
        leaves.append(scale)
    got = vae_fast.linear_log_prob(h, weight, bias, x, likelihood=likelihood, channel_dim=channel_dim,
                                   max_chunk_bytes=chunk_bytes, **kwargs)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    if channel_dim == -1:
        out = F.linear(copies[0], copies[1], copies[2])
    else:
        out = F.conv2d(copies[0], copies[1][:, :, None, None], copies[2])
    if likelihood == "categorical":
        logits = out if channel_dim == -1 else out.movedim(1, -1)
        expected = ref.categorical_log_prob(logits, x, batch_dims=logits.dim() - x.dim())
    else:
        expected = _unfused(likelihood, out, x, copies[3] if scale is not None else 0.0)
    assert got.shape == expected.shape
    assert_matches_reference(got, expected, F64, terms=24)
    weights = {"mean": torch.full(got.shape, -1.0 / got.numel(), dtype=F64),
               "scaled": torch.full(got.shape, 2.5, dtype=F64),
               "per_row": torch.randn(got.shape, generator=gen, dtype=F64)}[upstream].to(backend)
    for g, e in zip(torch.autograd.grad((got * weights).sum(), leaves, retain_graph=True),
                    torch.autograd.grad((expected * weights).sum(), copies)):
        assert_matches_reference(g, e, F64, terms=24)
    return got, leaves


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian", "laplace", "categorical"])
@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_values_and_gradients_equal_the_unfused_head(backend, likelihood, channel_dim):
    # 8 bytes per float64 element: 4 output elements per chunk splits every example into pixel blocks
    for chunk_bytes in (32, 8 * 24, None):
        _check(likelihood, channel_dim, 1, backend, chunk_bytes)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "categorical"])
def test_k_samples_share_x(backend, likelihood):
    _check(likelihood, -1, 2, backend, 8 * 24 * 4)  # chunks of 4 examples cross the K boundary


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
@pytest.mark.parametrize("scale_kind", list(SCALES))
@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_learned_scales(backend, likelihood, scale_kind, channel_dim):
    _check(likelihood, channel_dim, 1, backend, 8 * 6, scale_kind)


@pytest.mark.parametrize("upstream", ["scaled", "per_row"])
def test_any_upstream_gradient_and_repeated_backward(backend, upstream):
    """The saved gradients assume -1/B per row: a uniform multiple of it is a scale, anything else
    a recomputation with the actual per-row weights; the graph can be differentiated again."""
    _, leaves = _check("gaussian", 1, 1, backend, 8 * 6, "per_channel", upstream)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("likelihood, kwargs", [("bernoulli", {}), ("continuous_bernoulli", {}),
                                                ("gaussian", {"logvar": 0.3}), ("laplace", {}),
                                                ("categorical", {}), ("categorical", {"uint8": True})],
                         ids=["bernoulli", "cb", "gaussian", "laplace", "categorical", "categorical-uint8"])
def test_per_step_path_equals_the_reference_for_any_upstream(likelihood, kwargs, dtype):
    """A Linear head whose output fits one chunk takes the per-step Function (ops.head.linear_step): its values and
    gradients equal F.linear + the float64 likelihood for the expected upstream, a multiple of it and per-row
    weights (a recompute through the chunked op in the op's frame), with and without a bias, twice over one
    graph; the same call with a smaller chunk budget takes the chunked op."""
    if vae_fast._backend._cpu_ext is None:
        pytest.skip("needs the C++ extension")
    kwargs = dict(kwargs)
    uint8 = kwargs.pop("uint8", False)
    gen = torch.Generator().manual_seed(len(likelihood))
    for with_bias in (True, False):
        h, weight, bias, x = _case(likelihood, -1, 1, "cpu", gen)
        if uint8:
            x = x.to(torch.uint8)
        h, weight, bias = (t.to(dtype).requires_grad_() for t in (h, weight, bias))
        bias = bias if with_bias else None
        leaves = [t for t in (h, weight, bias) if t is not None]
        x = x if likelihood == "categorical" else x.to(dtype)
        got = vae_fast.linear_log_prob(h, weight, bias, x, likelihood=likelihood, **kwargs)
        assert type(got.grad_fn).__name__ == "LinearStepBackward"
        # a module's weight and bias are Parameters: the same path
        module = vae_fast.nn.FusedHead(h.shape[-1], weight.shape[0], likelihood, bias=with_bias, dtype=dtype)
        assert type(module.log_prob(h, x, **kwargs).grad_fn).__name__ == "LinearStepBackward"
        chunked = vae_fast.linear_log_prob(h, weight, bias, x, likelihood=likelihood, max_chunk_bytes=64, **kwargs)
        assert type(chunked.grad_fn).__name__ != "LinearStepBackward"
        copies = [t.detach().double().requires_grad_() for t in leaves]
        out = F.linear(copies[0], copies[1], copies[2] if with_bias else None)
        if likelihood == "categorical":
            expected = ref.categorical_log_prob(out, x.long(), batch_dims=1)
        else:
            expected = _unfused(likelihood, out, x.double(), kwargs.get("logvar", 0.0))
        assert_matches_reference(got, expected, dtype, terms=24)
        for upstream in ("mean", "scaled", "per_row"):
            weights = {"mean": torch.full(got.shape, -1.0 / got.numel()), "scaled": torch.full(got.shape, 2.5),
                       "per_row": torch.randn(got.shape, generator=gen)}[upstream].to(dtype)
            want = torch.autograd.grad((expected * weights.double()).sum(), copies, retain_graph=True)
            for _ in range(2):  # retain_graph: the saved gradients are not consumed
                for g, e in zip(torch.autograd.grad((got * weights).sum(), leaves, retain_graph=True), want):
                    assert g.dtype == dtype
                    assert_matches_reference(g, e, dtype, terms=24)


def test_per_step_path_takes_heads_without_features():
    """H = 0 (the output is the bias): the per-step path views h by its shape (a view to (-1, 0) raised), and its
    gradients equal the chunked op's, for the expected upstream and per-row weights (a recompute)."""
    if vae_fast._backend._cpu_ext is None:
        pytest.skip("needs the C++ extension")
    h, weight, bias = (torch.randn(shape, dtype=F64, requires_grad=True) for shape in ((3, 2, 0), (4, 0), (4,)))
    x = torch.rand(3, 2, 4, dtype=F64)
    got = vae_fast.linear_log_prob(h, weight, bias, x, likelihood="bernoulli")
    assert type(got.grad_fn).__name__ == "LinearStepBackward"
    chunked = vae_fast.linear_log_prob(h, weight, bias, x, likelihood="bernoulli", max_chunk_bytes=8)
    torch.testing.assert_close(got, chunked)
    for upstream in (torch.full((3,), -1 / 3, dtype=F64), torch.tensor([0.5, -2.0, 1.0], dtype=F64)):
        for g, e in zip(torch.autograd.grad(got, (h, weight, bias), upstream, retain_graph=True),
                        torch.autograd.grad(chunked, (h, weight, bias), upstream, retain_graph=True)):
            torch.testing.assert_close(g, e)


def test_per_step_path_computes_only_the_gradients_asked_for():
    """A frozen decoder's head (weight and bias without grad) skips the d/dW GEMM and the d/db sum; a head on
    features that need no gradient skips d/dh's GEMM; the gradients that are asked for stay right."""
    if vae_fast._backend._cpu_ext is None:
        pytest.skip("needs the C++ extension")
    gen = torch.Generator().manual_seed(3)
    h, weight, bias, x = _case("bernoulli", -1, 1, "cpu", gen)

    def run(h, weight, bias):
        with torch.profiler.profile() as prof:
            got = vae_fast.linear_log_prob(h, weight, bias, x, likelihood="bernoulli")
        leaves = [t for t in (h, weight, bias) if t.requires_grad]
        grads = torch.autograd.grad(got.mean(), leaves)
        names = [e.name for e in prof.events()]
        return grads, names.count("aten::mm") + names.count("aten::addmm"), names.count("aten::sum")

    copies = [t.clone().requires_grad_() for t in (h, weight, bias)]
    expected = torch.autograd.grad(ref.bernoulli_log_prob(F.linear(*copies), x).mean(), copies)
    (g_h,), gemms, sums = run(h.clone().requires_grad_(), weight, bias)
    assert (gemms, sums) == (2, 0)  # the output, d/dh
    assert_matches_reference(g_h, expected[0], F64, terms=24)
    (g_w, g_b), gemms, sums = run(h, weight.clone().requires_grad_(), bias.clone().requires_grad_())
    assert (gemms, sums) == (2, 1)  # the output, d/dW; d/db
    assert_matches_reference(g_w, expected[1], F64, terms=24)
    assert_matches_reference(g_b, expected[2], F64, terms=24)
    _, gemms, sums = run(*(t.clone().requires_grad_() for t in (h, weight, bias)))
    assert (gemms, sums) == (3, 1)


def test_bad_input_names_the_argument():
    h, weight, bias = torch.randn(2, 5), torch.randn(4, 5), torch.randn(4)
    x = torch.rand(2, 4)
    with pytest.raises(ValueError, match="weight"):
        vae_fast.linear_log_prob(h, torch.randn(4, 6), bias, x, likelihood="bernoulli")
    with pytest.raises(ValueError, match="bias"):
        vae_fast.linear_log_prob(h, weight, torch.randn(3), x, likelihood="bernoulli")
    with pytest.raises(ValueError, match="x of shape"):
        vae_fast.linear_log_prob(h, weight, bias, torch.rand(2, 3), likelihood="bernoulli")
    with pytest.raises(ValueError, match="channel_dim"):
        vae_fast.linear_log_prob(torch.randn(2, 5, 3, 3), weight, bias, x, likelihood="bernoulli", channel_dim=2)
    with pytest.raises(ValueError, match="likelihood"):
        vae_fast.linear_log_prob(h, weight, bias, x, likelihood="poisson")
    with pytest.raises(TypeError, match="logvar"):
        vae_fast.linear_log_prob(h, weight, bias, x, likelihood="bernoulli", logvar=0.0)
    with pytest.raises(ValueError, match="log_scale"):
        vae_fast.linear_log_prob(h, weight, bias, x, likelihood="laplace", log_scale=torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vae_fast.linear_log_prob(h, weight, bias, x + 2, likelihood="bernoulli")
    with pytest.raises(ValueError, match=r"x must hold class indices in \[0, 4\)"):
        vae_fast.linear_log_prob(h, weight, bias, torch.full((2,), 9), likelihood="categorical")
    with pytest.raises(ValueError, match=r"x must hold class indices in \[0, 4\)"):  # (the chunked op)
        vae_fast.linear_log_prob(h, weight, bias, torch.full((2,), 9), likelihood="categorical", max_chunk_bytes=8)


def test_grad_weight_accumulates_in_float32_for_bfloat16():
    """Liger-Kernel's FusedLinearCrossEntropy once accumulated grad_weight across chunks in bf16;
    here each chunk's contribution is added in float32 and rounded once."""
    torch.manual_seed(0)
    h = torch.randn(512, 8).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(16, 8).to(torch.bfloat16).requires_grad_()
    x = torch.randint(0, 16, (512,))
    got = vae_fast.linear_log_prob(h, weight, None, x, likelihood="categorical", max_chunk_bytes=2 * 16 * 8)
    grad = torch.autograd.grad(got.mean(), weight)[0]
    h64, w64 = h.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = torch.autograd.grad(-F.cross_entropy(F.linear(h64, w64), x), w64)[0]
    # one bf16 rounding of the float32 sum (64 chunks of 8 rows), not 64 roundings
    torch.testing.assert_close(grad.double(), expected, rtol=1e-2, atol=2e-3)


def test_default_chunks_are_large_enough_for_the_gemms_and_equal():
    """The default budget (1 MiB) grows to 1024 rows of the output (whole examples, rounded up; up to 8 MiB):
    smaller chunks made the MNIST head's GEMMs slower (7.3 vs 6.2 ms at B = 1024); chunks of whole examples are
    equal (no short last GEMM)."""
    from vae_fast.ops import head as head_ops

    assert head_ops.chunk_elements_for(None, 4, out_features=784) == 1024 * 784  # the MNIST head: B = 1024 in one
    assert head_ops.chunk_elements_for(None, 4, out_features=16) == (1 << 20) // 4  # the 1 MiB floor
    assert head_ops.chunk_elements_for(None, 4, out_features=50_000) == (8 << 20) // 4  # the 8 MiB cap
    # 256-way pixels: examples of 768 rows go two to a chunk; 3072-row examples stream in 1024-row blocks (1 MiB)
    assert head_ops.chunk_elements_for(None, 4, out_features=256, positions=768) == 2 * 768 * 256
    assert head_ops.chunk_elements_for(None, 4, out_features=256, positions=3072) == 1024 * 256
    # the mixture's 2 MiB hold one 64x64 example's 100 channels (4096 rows): kept
    assert head_ops.chunk_elements_for(None, 4, head_ops.DEFAULT_MIXTURE_CHUNK_BYTES, 100, 4096) == (2 << 20) // 4
    assert head_ops.chunk_elements_for(4096, 4, out_features=784) == 1024  # a given budget is kept
    assert list(head_ops._chunks(1024, 1, 784, 334 * 784)) == [(n, n + 256, 0, 1) for n in range(0, 1024, 256)]
    assert list(head_ops._chunks(10, 3, 4, 12 * 4)) == [(0, 3, 0, 3), (3, 6, 0, 3), (6, 10, 0, 3)]
    assert list(head_ops._chunks(0, 3, 4, 12 * 4)) == []

    # the public call passes its out_features: a 1024 x 784 Gaussian head with a learned variance (the chunked op;
    # 3.2 MB of output) is one chunk
    calls = []
    chunk = head_ops._elementwise_chunk
    try:
        head_ops._elementwise_chunk = lambda head, hb, *args: calls.append(hb.shape) or chunk(head, hb, *args)
        h = torch.randn(1024, 8, requires_grad=True)
        vae_fast.linear_log_prob(h, torch.randn(784, 8), None, torch.rand(1024, 784), likelihood="gaussian",
                                 logvar=torch.tensor(0.1, requires_grad=True))
    finally:
        head_ops._elementwise_chunk = chunk
    assert calls == [(1024, 1, 8)]


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "categorical", "dmol"])
def test_empty_batch_gives_zero_gradients(backend, likelihood):
    """B = 0: no chunk runs; log p is (0,) and d/dW, d/db are zeros of the parameters' shapes (the accumulators
    are the first chunk's products, so the empty case builds its own)."""
    h = torch.randn(0, 4, 3, 3, dtype=F64, device=backend, requires_grad=True)
    if likelihood == "dmol":
        out_features, x = 2 * 10, torch.zeros(0, 3, 3, 3, dtype=F64, device=backend)
    elif likelihood == "categorical":
        out_features, x = 5, torch.zeros(0, 3, 3, dtype=torch.long, device=backend)
    else:
        out_features, x = 5, torch.zeros(0, 3, 3, 5, dtype=F64, device=backend)
    channels_first = likelihood == "dmol"
    h_in = h if channels_first else h.movedim(1, -1)
    weight = torch.randn(out_features, 4, dtype=F64, device=backend, requires_grad=True)
    bias = torch.randn(out_features, dtype=F64, device=backend, requires_grad=True)
    got = vae_fast.linear_log_prob(h_in, weight, bias, x, likelihood=likelihood, channel_dim=1 if channels_first else -1)
    assert got.shape == (0,) and got.dtype == F64
    grads = torch.autograd.grad(got.sum(), (h, weight, bias))
    assert grads[0].shape == h.shape
    assert torch.equal(grads[1], torch.zeros_like(weight)) and torch.equal(grads[2], torch.zeros_like(bias))


@pytest.mark.parametrize("likelihood, channel_dim", [("bernoulli", -1), ("gaussian", 1), ("categorical", 1),
                                                     ("dmol", 1)])
def test_compiled_head_is_the_unfused_head_when_its_output_fits_one_chunk(likelihood, channel_dim):
    """In a traced graph the op's backward cannot read the upstream gradient on the host, so it recomputed every
    chunk with per-row weights (the MNIST head's compiled step: 5.7 ms against 3.9 compiled eager). A head whose
    output fits one chunk is traced as F.linear + the likelihood (no op in the graph); a larger one keeps the op.
    Values and gradients equal the eager fused head's either way."""
    gen = torch.Generator().manual_seed(5)
    kwargs = {"likelihood": likelihood, "channel_dim": channel_dim}
    if likelihood == "dmol":
        h, weight, bias = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(20, 4, generator=gen), torch.randn(20)
        x = torch.randint(0, 256, (2, 3, 3, 3), generator=gen) / 127.5 - 1
    else:
        h, weight, bias, x = (t.float() if t.is_floating_point() else t
                              for t in _case(likelihood, channel_dim, 1, "cpu", gen))
    leaves = [t.requires_grad_() for t in (h, weight, bias)]
    if likelihood == "gaussian":
        kwargs["logvar"] = torch.tensor(0.2, requires_grad=True)
        leaves.append(kwargs["logvar"])
    for chunk_bytes, takes_the_op in ((None, False), (64, True)):
        def loss(h, weight, bias):
            return vae_fast.linear_log_prob(h, weight, bias, x, max_chunk_bytes=chunk_bytes, **kwargs).mean()

        expected = loss(h, weight, bias)
        expected_grads = torch.autograd.grad(expected, leaves)
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        with torch.profiler.profile() as prof:
            got = compiled(h, weight, bias)
            grads = torch.autograd.grad(got, leaves)
        assert any(e.name == "vae_fast::linear_log_prob_traced" for e in prof.events()) == takes_the_op
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_opcheck_and_compile():
    torch.manual_seed(0)
    h, weight, bias = torch.randn(2, 3, 5), torch.randn(4, 5), torch.randn(4)
    x = torch.rand(2, 3, 4)
    for t in (h, weight, bias):
        t.requires_grad_()
    op = torch.ops.vae_fast.linear_log_prob.default
    torch.library.opcheck(op, (h.reshape(2, 3, 5), weight, bias, x, None, 0, 8, -0.5),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    fn = lambda h, w, b: vae_fast.linear_log_prob(h, w, b, x, likelihood="bernoulli", reduction="mean",  # noqa: E731
                                                  max_chunk_bytes=32)  # (several chunks: the op, not F.linear)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h, weight, bias), fn(h, weight, bias))
    for a, b in zip(torch.autograd.grad(compiled(h, weight, bias), (h, weight, bias)),
                    torch.autograd.grad(fn(h, weight, bias), (h, weight, bias))):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fn(h, weight, bias), h, create_graph=True)


def test_fused_head_module_matches_nn_linear_and_the_unfused_elbo(backend):
    torch.manual_seed(0)
    head = vae_fast.nn.FusedHead(6, (1, 4, 4), "bernoulli").double().to(backend)
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 16).double().to(backend)
    torch.testing.assert_close(head.weight, linear.weight)  # nn.Linear's initialisation
    torch.testing.assert_close(head.bias, linear.bias)
    features = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh()).double().to(backend)
    x = torch.rand(5, 1, 4, 4, dtype=F64).to(backend)
    mu = torch.randn(5, 3, dtype=F64).to(backend).requires_grad_()
    logvar = (0.3 * torch.randn(5, 3, dtype=F64)).to(backend).requires_grad_()
    params = [mu, logvar, head.weight, head.bias, *features.parameters()]
    for samples in (1, 2):
        eps = torch.randn(samples, 5, 3, dtype=F64).to(backend)
        fused = vae_fast.elbo(x, mu, logvar, features, head=head, num_samples=samples, eps=eps)
        unfused = vae_fast.elbo(x, mu, logvar, lambda z: head(features(z)), likelihood="bernoulli",
                                num_samples=samples, eps=eps)
        assert_matches_reference(fused.loss, unfused.loss, F64, terms=16)
        assert_matches_reference(fused.log_likelihood, unfused.log_likelihood, F64, terms=16)
        for a, b in zip(torch.autograd.grad(fused.loss, params), torch.autograd.grad(unfused.loss, params)):
            assert_matches_reference(a, b, F64, terms=16)


def test_fused_head_out_shape_is_for_the_elementwise_likelihoods():
    # (a categorical head with out_shape (P, K) scored its flat P * K outputs as one categorical and asked x to end
    # with (P, K); zero or negative sizes made an empty or failing Linear)
    for likelihood in ("categorical", "dmol"):
        with pytest.raises(ValueError, match=f"out_shape .* elementwise likelihoods, got likelihood='{likelihood}'"):
            vae_fast.nn.FusedHead(4, (3, 5), likelihood)
    for bad in ((0,), (2, -1), ()):
        with pytest.raises(ValueError, match="out_shape must be a non-empty tuple of positive ints"):
            vae_fast.nn.FusedHead(4, bad, "bernoulli")


def test_fused_conv_head_with_a_learned_variance_in_elbo(backend):
    torch.manual_seed(1)
    head = vae_fast.nn.FusedHead(4, 3, "gaussian", channel_dim=1).double().to(backend)
    conv = torch.nn.Conv2d(4, 3, 1).double().to(backend)
    conv.weight.data.copy_(head.weight[:, :, None, None])
    conv.bias.data.copy_(head.bias)
    h_in = torch.randn(2, 4, 3, 3, dtype=F64).to(backend)
    torch.testing.assert_close(head(h_in), conv(h_in))
    log_sigma2 = torch.tensor(0.2, dtype=F64, device=backend, requires_grad=True)
    x = torch.randn(2, 3, 3, 3, dtype=F64).to(backend)
    mu = torch.randn(2, 4, 3, 3, dtype=F64).to(backend).requires_grad_()
    logvar = torch.zeros(2, 4, 3, 3, dtype=F64).to(backend)
    eps = torch.randn(2, 4, 3, 3, dtype=F64).to(backend)
    fused = vae_fast.elbo(x, mu, logvar, torch.tanh, head=head, head_kwargs={"logvar": log_sigma2}, eps=eps)
    unfused = vae_fast.elbo(x, mu, logvar, lambda z: (head(torch.tanh(z)), log_sigma2), likelihood="gaussian", eps=eps)
    assert_matches_reference(fused.loss, unfused.loss, F64, terms=27)
    params = [mu, log_sigma2, head.weight, head.bias]
    for a, b in zip(torch.autograd.grad(fused.loss, params), torch.autograd.grad(unfused.loss, params)):
        assert_matches_reference(a, b, F64, terms=27)
    with pytest.raises(TypeError, match="head"):
        vae_fast.elbo(x, mu, logvar, torch.tanh, head=conv)


@pytest.mark.parametrize("channels", [1, 3])
def test_logistic_mixture_head_equals_the_unfused_packed_likelihood(backend, channels):
    """A 1x1 conv to NVAE's packed parameters (the Efficient-VDVAE output layer) fused with the
    mixture: values and gradients of h, weight and bias equal conv2d + dmol_packed_log_prob."""
    gen = torch.Generator().manual_seed(channels)
    mixtures = 2
    out_features = mixtures * (1 + channels * (3 if channels == 3 else 2))
    h = torch.randn(2, 4, 3, 3, generator=gen, dtype=F64).to(backend).requires_grad_()
    weight = (0.5 * torch.randn(out_features, 4, generator=gen, dtype=F64)).to(backend).requires_grad_()
    bias = (0.5 * torch.randn(out_features, generator=gen, dtype=F64)).to(backend).requires_grad_()
    x = (torch.randint(0, 256, (2, channels, 3, 3), generator=gen).to(F64) / 127.5 - 1).to(backend)
    upstream = torch.randn(2, generator=gen, dtype=F64).to(backend)
    leaves = (h, weight, bias)
    expected = vae_fast.dmol_packed_log_prob(x, F.conv2d(h, weight[:, :, None, None], bias))
    # pixel blocks of 2 (2+2+2+2+1), 3 of 3 for a budget of 4 pixels (equal blocks), whole examples
    for chunk_bytes in (8 * out_features * 2, 8 * out_features * 4, None):
        got = vae_fast.linear_log_prob(h, weight, bias, x, likelihood="dmol", channel_dim=1,
                                       max_chunk_bytes=chunk_bytes)
        assert_matches_reference(got, expected, F64, terms=9)
        for upstream_kind in ("mean", "per_row"):
            w = torch.full_like(got, -0.5) if upstream_kind == "mean" else upstream
            for a, b in zip(torch.autograd.grad((got * w).sum(), leaves, retain_graph=True),
                            torch.autograd.grad((expected * w).sum(), leaves, retain_graph=True)):
                assert_matches_reference(a, b, F64, terms=9)
    with pytest.raises(ValueError, match="channel_dim"):
        vae_fast.linear_log_prob(h.movedim(1, -1), weight, bias, x, likelihood="dmol")
    with pytest.raises(ValueError, match="weight has"):
        vae_fast.linear_log_prob(h, weight[:-1], bias[:-1], x, likelihood="dmol", channel_dim=1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vae_fast.linear_log_prob(h, weight, bias, x * 3, likelihood="dmol", channel_dim=1)


@pytest.mark.skipif(not vae_fast._backend._triton_available(), reason="needs triton")
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian", "laplace", "categorical"])
def test_triton_head_is_one_kernel_with_the_output_tiles_in_registers(monkeypatch, likelihood):
    """On the Triton backend a Linear head with an elementwise likelihood and a fixed scale, or a
    categorical one, is one kernel (CCE-style) — forward, and the per-row-weights recompute of
    backward — and equals the unfused float64 computation (under the interpreter here)."""
    import vae_fast.kernels.triton as tri

    launches = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    name = "linear_categorical_kernel" if likelihood == "categorical" else "linear_elementwise_kernel"
    monkeypatch.setattr(tri, name, Recording(getattr(tri, name)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with vae_fast.use_backend("triton"):
        for upstream in ("mean", "per_row", "scaled"):
            launches.clear()
            _check(likelihood, -1, 1, device, None, None, upstream)
            # forward once, plus the recompute for per-row weights (the scaled case only rescales)
            assert len(launches) == (2 if upstream == "per_row" else 1)
        launches.clear()
        _check(likelihood, -1, 2, device, None)  # K samples share x (row r scored against r % (B P))
        assert len(launches) == 1
        # deterministic algorithms asked for: the chunked path (the kernel's d/dW atomics add in no fixed order)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            launches.clear()
            _check(likelihood, -1, 1, device, None)
            assert launches == []
        finally:
            torch.use_deterministic_algorithms(deterministic)


def test_elbo_with_a_fused_head_compiles_fullgraph():
    torch.manual_seed(0)
    head = vae_fast.nn.FusedHead(6, 8, "bernoulli")
    features = torch.nn.Linear(3, 6)
    x, eps = torch.rand(4, 8), torch.randn(4, 3)
    mu, logvar = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)

    for head_kwargs in ({}, {"max_chunk_bytes": 32}):  # one chunk (traced as F.linear + likelihood), the op
        def loss(mu, logvar):
            return vae_fast.elbo(x, mu, logvar, features, head=head, head_kwargs=head_kwargs, eps=eps).loss

        torch._dynamo.reset()
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(mu, logvar), loss(mu, logvar))
        params = [mu, head.weight, head.bias]
        for a, b in zip(torch.autograd.grad(compiled(mu, logvar), params),
                        torch.autograd.grad(loss(mu, logvar), params)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("max_chunk_bytes", [64, None], ids=["the op", "one chunk"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_training_of_a_1x1_conv_head(dynamic, max_chunk_bytes):
    # a channels-first h gets a channels-first d/dh, and inductor (unlike aot_eager above) asserts each op output's
    # strides: a compiled backward (which recomputes with the upstream as row weights) raised an assert_size_stride
    # error, having planned for a contiguous h, and under dynamic shapes the fake kernel's contiguous d/dh did not
    # match the kernel's. Values and gradients equal eager, for the mixture and a Bernoulli head, through the op
    # (chunks of 64 bytes) and as the unfused head that one chunk is traced as
    gen = torch.Generator().manual_seed(9)
    features = torch.randn(4, 5, 2, 3, generator=gen, requires_grad=True)
    images = torch.rand(4, 3, 2, 3, generator=gen) * 2 - 1
    cases = {"dmol": (torch.randn(30, 5, generator=gen), images),
             "bernoulli": (torch.randn(3, 5, generator=gen), (images > 0).float())}
    for likelihood, (weight, x) in cases.items():
        weight.requires_grad_()

        def loss(h, w, likelihood=likelihood, x=x):
            return -vae_fast.linear_log_prob(h, w, None, x, likelihood=likelihood, channel_dim=1,
                                             max_chunk_bytes=max_chunk_bytes).mean()

        torch._dynamo.reset()
        compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
        for _ in range(2):
            got = compiled(features, weight)
            want = loss(features, weight)
            torch.testing.assert_close(got, want, msg=likelihood)
            for a, b in zip(torch.autograd.grad(got, (features, weight)), torch.autograd.grad(want, (features, weight))):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=likelihood)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "categorical"])
def test_gradcheck_vmap_and_clear_higher_order_errors(backend, likelihood):
    """The op's contracts with default settings: gradcheck in float64 (chunked), torch.func.vmap over a
    batch of heads' inputs (a loop of exact calls), and torch.func.grad / create_graph a clear error."""
    gen = torch.Generator().manual_seed(7)
    h, weight, bias, x = _case(likelihood, -1, 1, backend, gen, batch=2, features=3, out_features=4, pixels=(2,))
    fn = lambda h, w, b: vae_fast.linear_log_prob(h, w, b, x, likelihood=likelihood, max_chunk_bytes=64)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()))
    stacked = torch.stack([h.detach(), 2 * h.detach()])
    got = torch.func.vmap(lambda hh: fn(hh, weight.detach(), bias.detach()))(stacked)
    torch.testing.assert_close(got, torch.stack([fn(t, weight.detach(), bias.detach()) for t in stacked]).detach())
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda hh: fn(hh, weight, bias).sum())(h.detach())
