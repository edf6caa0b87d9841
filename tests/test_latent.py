"""Fused latent op (sampling + KL) against vae_fast.reference in float64, on every backend."""
import math

import pytest
import torch

import vae_fast
from vae_fast import reference as ref
from vae_fast import _backend

from .conftest import assert_matches_reference, thread_counts

PARAMS = ["logvar", "logstd", "softplus"]


def make_inputs(batch, dim, dtype, device, *, prior=False, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, dim, generator=gen, dtype=torch.float64) * 2
    s = torch.randn(batch, dim, generator=gen, dtype=torch.float64) * scale
    pm = torch.randn(dim, generator=gen, dtype=torch.float64) if prior else None
    plv = torch.randn(batch, 1, generator=gen, dtype=torch.float64) if prior else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(mu), cast(s), cast(pm), cast(plv)


def f64(t):
    return None if t is None else t.detach().double().cpu()


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sample_and_kl_match_reference_with_given_eps(backend, param, prior, dtype):
    mu, s, pm, plv = make_inputs(5, 37, dtype, backend, prior=prior)
    eps = torch.randn(3, 5, 37, dtype=torch.float64).to(device=backend, dtype=dtype)
    z, kl = vae_fast.gaussian_sample_kl(mu, s, prior_mu=pm, prior_logvar=plv, param=param, eps=eps, num_samples=3)
    assert z.shape == (3, 5, 37) and kl.shape == (5,) and z.dtype == dtype
    assert_matches_reference(z, ref.reparameterize(f64(mu), f64(s), f64(eps), param), dtype, what="z")
    assert_matches_reference(kl, ref.gaussian_kl(f64(mu), f64(s), f64(pm), f64(plv), param), dtype, terms=37, what="kl")
    kl_dims = vae_fast.gaussian_kl(mu, s, pm, plv, param=param, reduce=False)
    assert_matches_reference(kl_dims, ref.gaussian_kl(f64(mu), f64(s), f64(pm), f64(plv), param, reduce=False), dtype)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("prior", [False, True])
def test_log_ratio_output_matches_reference(backend, param, prior):
    from vae_fast.functional.latent import _latent

    mu, s, pm, plv = make_inputs(4, 37, torch.float64, backend, prior=prior, seed=7)
    eps = torch.randn(3, 4, 37, dtype=torch.float64).to(backend)
    z, _, _, log_ratio = _latent(mu, s, pm, plv, param, eps, None, 3, False, want_log_ratio=True)
    assert log_ratio.shape == (3, 4)
    lv = ref.logvar_from_scale(f64(s), param)
    pm64 = torch.zeros(37, dtype=torch.float64) if pm is None else f64(pm)
    plv64 = torch.zeros(4, 1, dtype=torch.float64) if plv is None else f64(plv)
    z_ref = ref.reparameterize(f64(mu), f64(s), f64(eps), param)
    expected = ref.gaussian_log_density(z_ref, f64(mu), lv) - ref.gaussian_log_density(z_ref, pm64, plv64.expand(4, 37))
    assert_matches_reference(log_ratio, expected, torch.float64, terms=37 * 100)
    # and with in-kernel noise, on the fp32 path
    mu32, s32 = mu.float(), s.float()
    z, _, _, log_ratio = _latent(mu32, s32, None, None, param, None, None, 2, False, want_log_ratio=True)
    z64 = z.double().cpu()
    lv32 = ref.logvar_from_scale(f64(s32), param)
    expected = ref.gaussian_log_density(z64, f64(mu32), lv32) - ref.gaussian_log_density(
        z64, torch.zeros(37, dtype=torch.float64), torch.zeros(4, 37, dtype=torch.float64))
    torch.testing.assert_close(log_ratio.double().cpu(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("param", PARAMS)
def test_gradcheck_with_given_eps_and_learned_prior(backend, param):
    mu, s, pm, plv = make_inputs(3, 5, torch.float64, backend, prior=True)
    eps = torch.randn(2, 3, 5, dtype=torch.float64, device=backend)
    inputs = [t.clone().requires_grad_() for t in (mu, s, pm, plv)]

    def fn(mu, s, pm, plv):
        z, kl = vae_fast.gaussian_sample_kl(mu, s, prior_mu=pm, prior_logvar=plv, param=param, eps=eps, num_samples=2)
        return z, kl

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradcheck(lambda m, v: vae_fast.gaussian_kl(m, v, param=param, reduce=False), inputs[:2])


@pytest.mark.parametrize("param", PARAMS)
def test_in_kernel_noise_gradients_match_reference(backend, param):
    mu, s, pm, plv = make_inputs(4, 33, torch.float64, backend, prior=True, seed=3)
    leaves = [t.clone().requires_grad_() for t in (mu, s, pm, plv)]
    z, kl = vae_fast.gaussian_sample_kl(*leaves[:2], prior_mu=leaves[2], prior_logvar=leaves[3], param=param, num_samples=2)
    weights = torch.randn(z.shape, dtype=torch.float64, device=backend)
    ((z * weights).sum() + (kl * torch.arange(1.0, 5.0, dtype=torch.float64, device=backend)).sum()).backward()
    # the eps the kernel used, recovered from its output
    eps = ((z.detach() - mu) / ref.std_from_scale(s, param)).cpu()
    ref_leaves = [f64(t).requires_grad_() for t in (mu, s, pm, plv)]
    z_ref = ref.reparameterize(ref_leaves[0], ref_leaves[1], eps, param)
    kl_ref = ref.gaussian_kl(*ref_leaves, param)
    ((z_ref * weights.cpu()).sum() + (kl_ref * torch.arange(1.0, 5.0, dtype=torch.float64)).sum()).backward()
    for got, want, name in zip(leaves, ref_leaves, ("mu", "scale", "prior_mu", "prior_logvar")):
        torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=1e-9, atol=1e-9, msg=name)


def replay_seed(seed_value):
    """The 0-d seed vae_fast draws after torch.Generator().manual_seed(seed_value)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=torch.Generator().manual_seed(seed_value)))


@pytest.mark.parametrize("shape", [(3, 1001), (100, 32), (7, 5), (1, 1)])
def test_noise_is_the_documented_philox_stream(backend, shape):
    if backend == "cpu" and _backend.backend("cpu") == "triton":
        shape = (min(shape[0], 4), min(shape[1], 40))  # keep the interpreter fast
    mu = torch.zeros(shape, dtype=torch.float64, device=backend)
    z, _ = vae_fast.gaussian_sample_kl(mu, torch.zeros_like(mu), num_samples=2, generator=torch.Generator().manual_seed(5))
    expected = ref.latent_noise(replay_seed(5), 2, *shape)
    torch.testing.assert_close(z.cpu(), expected, rtol=0, atol=2e-6)  # eps is drawn in float32


def test_noise_statistics_of_a_million_draws():
    mu = torch.zeros(1000, 1000)
    z, _ = vae_fast.gaussian_sample_kl(mu, torch.zeros_like(mu), generator=torch.Generator().manual_seed(11))
    z = z.double().reshape(-1)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z ** 3).mean().item()) < 5 * math.sqrt(15 / n)          # skewness
    assert abs((z ** 4).mean().item() - 3) < 5 * math.sqrt(96 / n)      # kurtosis
    for threshold in (1.0, 2.0, 3.0, 4.0):
        p = math.erfc(threshold / math.sqrt(2))
        count = (z.abs() > threshold).sum().item()
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1, threshold


def test_seed_reproducibility_and_fresh_noise_per_call(backend):
    mu = torch.randn(4, 9, device=backend)
    lv = torch.randn(4, 9, device=backend)
    torch.manual_seed(123)
    z1, _ = vae_fast.gaussian_sample_kl(mu, lv)
    z2, _ = vae_fast.gaussian_sample_kl(mu, lv)
    torch.manual_seed(123)
    z3, _ = vae_fast.gaussian_sample_kl(mu, lv)
    assert torch.equal(z1, z3)
    assert not torch.equal(z1, z2)


def test_bit_identical_for_any_thread_count():
    if _backend._cpu_ext is None:
        pytest.skip("needs the C++ extension")
    mu = torch.randn(300, 700)
    lv = torch.randn(300, 700)
    results = []
    for _ in thread_counts():
        with vae_fast.use_backend("cpu"):
            leaf = mu.clone().requires_grad_()
            z, kl = vae_fast.gaussian_sample_kl(leaf, lv, generator=torch.Generator().manual_seed(1), num_samples=2)
            (z.sum() + kl.sum()).backward()
            results.append((z, kl, leaf.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_cpu_and_triton_draw_the_same_noise():
    cases = dict(_backend_cases())
    if "cpu" not in cases or "triton" not in cases:
        pytest.skip("needs both the C++ and the Triton backend")
    mu = torch.randn(6, 45, dtype=torch.float64)
    lv = torch.randn(6, 45, dtype=torch.float64)
    outs = {}
    for name in ("cpu", "triton"):
        with vae_fast.use_backend(name):
            device = cases[name]
            z, kl = vae_fast.gaussian_sample_kl(mu.to(device), lv.to(device), num_samples=3,
                                                generator=torch.Generator().manual_seed(9))
            outs[name] = (z.cpu(), kl.cpu())
    torch.testing.assert_close(outs["cpu"][0], outs["triton"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs["cpu"][1], outs["triton"][1], rtol=1e-12, atol=1e-12)


def _backend_cases():
    from .conftest import backend_cases
    return backend_cases()


@pytest.mark.parametrize("param,low,high", [("logvar", -100.0, 89.0), ("logstd", -50.0, 44.0), ("softplus", -100.0, 1e18)])
def test_extreme_scales_stay_finite_and_accurate_in_fp32(backend, param, low, high):
    s = torch.tensor([[low, high, 0.0, low / 2, 10.0]], device=backend)
    mu = torch.tensor([[1e3, -1e3, 0.0, 3e4, -2.0]], device=backend)
    kl = vae_fast.gaussian_kl(mu, s, param=param, reduce=False)
    expected = ref.gaussian_kl(f64(mu), f64(s), param=param, reduce=False)
    assert torch.isfinite(kl).all()
    # exp(lv - ln 2) turns one fp32 ulp of lv ~ 83 (7.6e-6) into that relative error of the KL
    torch.testing.assert_close(kl.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    leaf = s.clone().requires_grad_()
    vae_fast.gaussian_kl(mu, leaf, param=param).sum().backward()
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_fp32(backend, dtype):
    mu, s, _, _ = make_inputs(4, 16, dtype, backend)
    eps = torch.randn(4, 16, device=backend).to(dtype)
    z, kl = vae_fast.gaussian_sample_kl(mu, s, eps=eps)
    # z feeds the decoder in the input dtype; the KL, a sum over Z, is float32 (as torch's losses under autocast)
    assert z.dtype == dtype and kl.dtype == torch.float32
    assert_matches_reference(z, ref.reparameterize(f64(mu), f64(s), f64(eps)), dtype)
    assert_matches_reference(kl, ref.gaussian_kl(f64(mu), f64(s)), torch.float32, terms=16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_a_broadcast_learned_prior(backend, dtype):
    # a prior mean shared by the batch (Z,) and a prior log-variance per example (B, 1), both of the half dtype and
    # learned: the KL and every gradient match float64 autograd on the same half values (the C++ backend casts the
    # broadcast priors to float32 without copying them out to (B, Z))
    mu, s, pm, plv = make_inputs(4, 16, dtype, backend, prior=True)
    leaves = [t.clone().requires_grad_() for t in (mu, s, pm, plv)]
    kl = vae_fast.gaussian_kl(*leaves)
    assert kl.dtype == torch.float32
    ref_leaves = [f64(t).requires_grad_() for t in (mu, s, pm, plv)]
    kl_ref = ref.gaussian_kl(*ref_leaves)
    assert_matches_reference(kl, kl_ref, torch.float32, terms=16)
    weights = torch.arange(1.0, 5.0, dtype=torch.float64)
    (kl * weights.to(backend)).sum().backward()
    (kl_ref * weights).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == dtype
        assert_matches_reference(got.grad, want.grad, dtype, terms=4)


def test_only_inputs_and_seed_are_saved_for_backward(kernel_backend):
    mu = torch.randn(64, 32, device=kernel_backend, requires_grad=True)
    lv = torch.randn(64, 32, device=kernel_backend, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z, kl = vae_fast.gaussian_sample_kl(mu, lv, num_samples=4)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    # mu, logvar and the 8-byte seed: no eps, sigma or z (z alone would be 4x mu here); the C++ backend's
    # per-step path keeps the seed as a Python int in ctx (ops/latent.py, LatentStep)
    from vae_fast.ops._library import step_kernels_for

    seed_bytes = 0 if step_kernels_for(mu, mu.numel()) is not None else 8
    assert saved_bytes == 2 * mu.numel() * 4 + seed_bytes, [tuple(t.shape) for t in saved]
    (z.sum() + kl.sum()).backward()
    assert mu.grad is not None and lv.grad is not None


def test_leading_batch_dims_and_edge_shapes(backend):
    mu = torch.randn(2, 3, 4, dtype=torch.float64, device=backend)
    lv = torch.randn(2, 3, 4, dtype=torch.float64, device=backend)
    pm = torch.randn(3, 4, dtype=torch.float64, device=backend, requires_grad=True)
    z, kl = vae_fast.gaussian_sample_kl(mu, lv, prior_mu=pm, prior_logvar=torch.zeros(4, dtype=torch.float64, device=backend))
    assert z.shape == (2, 3, 4) and kl.shape == (2, 3)
    assert_matches_reference(kl, ref.gaussian_kl(f64(mu), f64(lv), f64(pm), None), torch.float64, terms=4)
    kl.sum().backward()
    assert pm.grad.shape == (3, 4)
    for shape in [(0, 5), (3, 1), (1, 1), (4, 0)]:
        m = torch.randn(shape, device=backend, requires_grad=True)
        z, kl = vae_fast.gaussian_sample_kl(m, torch.zeros(shape, device=backend))
        assert z.shape == shape and kl.shape == shape[:1]
        (z.sum() + kl.sum()).backward()
        assert m.grad.shape == shape
        assert_matches_reference(kl, ref.gaussian_kl(f64(m), torch.zeros(shape, dtype=torch.float64)), torch.float32)


def test_non_contiguous_inputs(backend):
    base = torch.randn(8, 6, dtype=torch.float64, device=backend)
    mu, lv = base.t(), torch.randn(12, 8, dtype=torch.float64, device=backend)[::2]
    eps = torch.randn(6, 8, dtype=torch.float64, device=backend)
    z, kl = vae_fast.gaussian_sample_kl(mu, lv, eps=eps)
    assert_matches_reference(z, ref.reparameterize(f64(mu), f64(lv), f64(eps)), torch.float64)
    assert_matches_reference(kl, ref.gaussian_kl(f64(mu), f64(lv)), torch.float64, terms=8)


def test_opcheck_latent_ops(kernel_backend):
    dev = kernel_backend
    mu = torch.randn(3, 5, device=dev, requires_grad=True)
    s = torch.randn(3, 5, device=dev, requires_grad=True)
    seed = torch.tensor(7, dtype=torch.int64, device=dev)
    pm = torch.randn(5, device=dev)
    plv = torch.randn(3, 1, device=dev)
    torch.library.opcheck(torch.ops.vae_fast.latent_forward.default, (mu, s, pm, plv, None, seed, 0, 2, True))
    torch.library.opcheck(torch.ops.vae_fast.latent_forward.default, (mu, s, None, None, None, seed, 2, 1, False))
    gz = torch.randn(2, 3, 5, device=dev)
    gkl = torch.randn(3, device=dev)
    torch.library.opcheck(torch.ops.vae_fast.latent_backward.default,
                          (mu.detach(), s.detach(), pm, plv, None, seed, gz, gkl, None, 1, 2, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(kernel_backend):
    if kernel_backend == "cpu" and _backend.backend("cpu") == "triton":
        pytest.skip("inductor does not compile for the Triton interpreter")
    mu = torch.randn(8, 4, device=kernel_backend, requires_grad=True)
    lv = torch.randn(8, 4, device=kernel_backend, requires_grad=True)

    def loss_fn(mu, lv):
        z, kl = vae_fast.gaussian_sample_kl(mu, lv, prior_mu=torch.zeros_like(mu), prior_logvar=torch.zeros_like(mu))
        return (z ** 2).sum() + kl.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    loss = compiled(mu, lv)
    loss.backward()
    grads = (mu.grad.clone(), lv.grad.clone())
    mu.grad = lv.grad = None
    torch.manual_seed(0)
    eager = loss_fn(mu, lv)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grads, (mu.grad, lv.grad))


@pytest.fixture
def triton_short_chunks(monkeypatch):
    """The Triton backend (interpreter on CPU tensors) with rows cut into chunks of 128 elements (8192 on a GPU),
    so that interpreter-sized rows take the chunked path."""
    cases = dict(_backend_cases())
    if "triton" not in cases:
        pytest.skip("needs the Triton backend")
    import vae_fast.kernels.triton as tri

    monkeypatch.setattr(tri, "ROW_CHUNK", 128)
    with vae_fast.use_backend("triton"):
        yield cases["triton"]


@pytest.mark.parametrize("dim", [424, 423])  # four chunks, the last short; 423: noise not on 4-element groups
@pytest.mark.parametrize("param", ["logvar", "softplus"])
def test_triton_long_rows_are_split_into_chunks(triton_short_chunks, dim, param):
    # a row longer than a chunk is shared by several programs (a few SD-sized conv latents fill the GPU); a row's
    # KL and log-ratio are its chunks' partial sums: the float64 reference's values and gradients
    from vae_fast.functional.latent import _latent
    import vae_fast.kernels.triton as tri

    device = triton_short_chunks
    assert tri.row_chunks(dim) == (4, 128)
    mu, s, pm, plv = make_inputs(3, dim, torch.float64, device, prior=True, seed=11)
    eps = torch.randn(2, 3, dim, dtype=torch.float64).to(device)
    leaves = [t.clone().requires_grad_() for t in (mu, s, pm, plv)]
    z, kl, kl_dims, log_ratio = _latent(*leaves, param, eps, None, 2, True, want_log_ratio=True)
    ref_leaves = [f64(t).requires_grad_() for t in (mu, s, pm, plv)]
    z_ref = ref.reparameterize(ref_leaves[0], ref_leaves[1], f64(eps), param)
    kl_ref = ref.gaussian_kl(*ref_leaves, param)
    lv = ref.logvar_from_scale(ref_leaves[1], param)
    ratio_ref = (ref.gaussian_log_density(z_ref, ref_leaves[0], lv)
                 - ref.gaussian_log_density(z_ref, ref_leaves[2], ref_leaves[3].expand(3, dim)))
    assert kl.shape == (3,) and log_ratio.shape == (2, 3)
    assert_matches_reference(z, z_ref, torch.float64, what="z")
    assert_matches_reference(kl, kl_ref, torch.float64, terms=dim, what="kl")
    assert_matches_reference(kl_dims, ref.gaussian_kl(*map(f64, (mu, s, pm, plv)), param, reduce=False), torch.float64)
    assert_matches_reference(log_ratio, ratio_ref, torch.float64, terms=dim * 100, what="log ratio")
    weights = torch.randn(z.shape, dtype=torch.float64)
    kl_weights = torch.arange(1.0, 4.0, dtype=torch.float64)
    ((z * weights.to(device)).sum() + (kl * kl_weights.to(device)).sum()).backward()
    ((z_ref * weights).sum() + (kl_ref * kl_weights).sum()).backward()
    for got, want, name in zip(leaves, ref_leaves, ("mu", "scale", "prior_mu", "prior_logvar")):
        torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("dim", [424, 423])
def test_triton_chunking_draws_the_same_noise(triton_short_chunks, monkeypatch, dim):
    # an element's noise depends on its index only: the chunked and the whole-row kernels sample the same z and
    # give the same gradients (the noise recomputed in backward, chunk by chunk)
    import vae_fast.kernels.triton as tri

    mu, s, _, _ = make_inputs(3, dim, torch.float32, triton_short_chunks, seed=2)
    results = []
    for chunk in (128, 8192):
        monkeypatch.setattr(tri, "ROW_CHUNK", chunk)
        leaves = [t.clone().requires_grad_() for t in (mu, s)]
        z, kl = vae_fast.gaussian_sample_kl(*leaves, num_samples=2, generator=torch.Generator().manual_seed(4))
        (z * torch.linspace(-1, 1, z.numel()).view(z.shape)).sum().backward()
        results.append((z.detach(), kl.detach(), leaves[0].grad, leaves[1].grad))
    chunked, whole = results
    assert torch.equal(chunked[0], whole[0])
    eps = (f64(chunked[0]) - f64(mu)) / ref.std_from_scale(f64(s), "logvar")
    torch.testing.assert_close(eps, ref.latent_noise(replay_seed(4), 2, 3, dim), rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-6, atol=1e-5)  # (sums in another order)
    torch.testing.assert_close(chunked[2], whole[2], rtol=0, atol=0)
    torch.testing.assert_close(chunked[3], whole[3], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_long_rows_are_split_over_threads_and_summed_in_order(dtype):
    # rows longer than a C++ column block (27 tiles of 304 = 8208 elements) are cut into blocks that the threads
    # share (batch 1 ran on one thread); a row's KL and log-ratio are its blocks' sums added in order: the float64
    # reference's values and gradients, bit for bit the same on 1, 2 or 3 threads
    if _backend._cpu_ext is None:
        pytest.skip("needs the C++ extension")
    from vae_fast.functional.latent import _latent

    dim = 3 * 8208 + 100  # four blocks, the last short
    mu, s, pm, plv = make_inputs(2, dim, dtype, "cpu", prior=True, seed=12)
    eps = torch.randn(2, 2, dim, dtype=torch.float64).to(dtype)
    s[:, -3:] = torch.tensor([30.0, -30.0, 8.0], dtype=dtype)  # extremes in the last block
    mu[:, -2:] = torch.tensor([40.0, -40.0], dtype=dtype)
    leaves64 = [f64(t).requires_grad_() for t in (mu, s, pm, plv)]
    z_ref = ref.reparameterize(leaves64[0], leaves64[1], f64(eps), "softplus")
    kl_ref = ref.gaussian_kl(*leaves64, "softplus")
    lv = ref.logvar_from_scale(leaves64[1], "softplus")
    # log q(z|x) from eps itself: (z - mu)^2 / sigma^2 cancels catastrophically where sigma is e^-30
    log_q = -0.5 * (math.log(2 * math.pi) + lv + f64(eps) ** 2).sum(-1)
    ratio_ref = log_q - ref.gaussian_log_density(z_ref, leaves64[2], leaves64[3].expand(2, dim))
    weights = torch.randn(2, 2, dim, dtype=torch.float64)
    ((z_ref * weights).sum() + (kl_ref * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum()).backward()
    results = []
    for _ in thread_counts():
        with vae_fast.use_backend("cpu"):
            leaves = [t.clone().requires_grad_() for t in (mu, s, pm, plv)]
            z, kl, _, log_ratio = _latent(*leaves, "softplus", eps, None, 2, False, want_log_ratio=True)
            ((z * weights.to(dtype)).sum() + (kl * torch.tensor([1.0, -2.0], dtype=kl.dtype)).sum()).backward()
            # and with in-kernel noise (a batch of one long row)
            z1, kl1 = vae_fast.gaussian_sample_kl(mu[:1], s[:1], generator=torch.Generator().manual_seed(3))
            results.append((z, kl, log_ratio, *(t.grad for t in leaves), z1, kl1))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    z, kl, log_ratio, *grads, z1, kl1 = results[0]
    assert_matches_reference(z, z_ref, dtype, what="z")
    assert_matches_reference(kl, kl_ref, dtype, terms=dim, what="kl")
    assert_matches_reference(log_ratio, ratio_ref, dtype, terms=dim * 100, what="log ratio")
    tolerance = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for got, want, name in zip(grads, leaves64, ("mu", "scale", "prior_mu", "prior_logvar")):
        torch.testing.assert_close(got.double(), want.grad, **tolerance, msg=name)
    assert_matches_reference(kl1, ref.gaussian_kl(f64(mu[:1]), f64(s[:1]), None, None, "logvar"), dtype, terms=dim)
    noise = ref.latent_noise(replay_seed(3), 1, 1, dim)[0]
    torch.testing.assert_close(f64(z1), f64(mu[:1]) + ref.std_from_scale(f64(s[:1]), "logvar") * noise,
                               rtol=1e-6, atol=1e-5)  # (the noise is drawn in float32)
