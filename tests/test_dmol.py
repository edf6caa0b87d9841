"""Fused discretised logistic mixture (PixelCNN++ / NVAE) against vae_fast.reference in float64
(itself checked against 50-digit mpmath in test_reference.py), on every backend."""
import math

import mpmath as mp
import pytest
import torch

import vae_fast
from vae_fast import _backend
from vae_fast import reference as ref

from .conftest import assert_matches_reference, thread_counts


def f64(t):
    return None if t is None else t.detach().double().cpu()


def make_dmol(batch, channels, mixtures, size, dtype, device, *, coeffs=True, samples=None, seed=0, ls_shift=-3.0):
    """Random parameters plus 8-bit images that include the edge pixels 0 and 255."""
    gen = torch.Generator().manual_seed(seed)
    lead = (batch,) if samples is None else (samples, batch)
    pixels = torch.randint(0, 256, (batch, channels, *size), generator=gen)
    pixels.view(batch, -1)[:, 0] = 0
    pixels.view(batch, -1)[:, -1] = 255
    x = (pixels.double() / 127.5 - 1).to(device=device, dtype=dtype)

    def param(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*lead, *shape, *size, generator=gen, dtype=torch.float64) * scale + shift
        return t.to(device=device, dtype=dtype).requires_grad_()

    logit_probs = param(mixtures)
    means = param(channels, mixtures, scale=0.6)
    log_scales = param(channels, mixtures, shift=ls_shift)
    coef = None
    if coeffs and channels == 3:
        coef = torch.tanh(param(channels, mixtures)).detach().requires_grad_()
    return x, logit_probs, means, log_scales, coef


def reference_with_grads(x, logit_probs, means, log_scales, coeffs):
    """Reference log-likelihood (float64) and its gradients w.r.t. the given parameters."""
    leaves = [f64(t).requires_grad_() if t is not None else None for t in (logit_probs, means, log_scales, coeffs)]
    lead = logit_probs.dim() - x.dim() + 1  # 1, or 2 with a sample dim
    flat = [None if t is None else t.reshape(-1, *t.shape[lead:]) for t in leaves]
    x64 = f64(x).repeat(flat[0].shape[0] // x.shape[0], *([1] * (x.dim() - 1)))
    value = ref.discretized_logistic_mixture_log_prob(x64, *flat).reshape(logit_probs.shape[:lead])
    grads = torch.autograd.grad(value.sum(), [t for t in leaves if t is not None])
    return value.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels,coeffs,mixtures", [(3, True, 3), (3, True, 10), (3, False, 1), (1, False, 4), (2, False, 2)])
@pytest.mark.parametrize("samples", [None, 2])
def test_dmol_matches_reference(backend, dtype, channels, coeffs, mixtures, samples):
    args = make_dmol(2, channels, mixtures, (3, 5), dtype, backend, coeffs=coeffs, samples=samples)
    got = vae_fast.discretized_logistic_mixture_log_prob(*args)
    params = [t for t in args[1:] if t is not None]
    grads = torch.autograd.grad(got.sum(), params)
    expected, expected_grads = reference_with_grads(*args)
    terms = channels * mixtures * 15
    assert_matches_reference(got, expected, dtype, terms=terms, what="log_prob")
    for name, g, e in zip(("logit_probs", "means", "log_scales", "coeffs"), grads, expected_grads):
        # per-element gradients: scale the tolerance by the largest one (they reach 1/s ~ 50 here)
        assert_matches_reference(g, e, dtype, terms=max(1.0, e.abs().max().item()), what=name)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("samples", [None, 3])
def test_packed_matches_dmol_from_packed_and_reference(backend, channels, samples):
    mixtures, batch, size = 2, 2, (2, 3)
    packed = mixtures + channels * (3 if channels == 3 else 2) * mixtures
    gen = torch.Generator().manual_seed(4)
    lead = (batch,) if samples is None else (samples, batch)
    params = (torch.randn(*lead, packed, *size, generator=gen, dtype=torch.float64) - 0.5).to(backend).requires_grad_()
    x = (torch.randint(0, 256, (batch, channels, *size), generator=gen).double() / 127.5 - 1).to(backend)
    got = vae_fast.dmol_packed_log_prob(x, params)
    (grad,) = torch.autograd.grad(got.sum(), params)
    split = vae_fast.dmol_from_packed(params, mixtures, channels)
    assert split.logit_probs.shape == (*lead, mixtures, *size)
    assert split.means.shape == split.log_scales.shape == (*lead, channels, mixtures, *size)
    assert (split.coeffs is None) == (channels != 3)
    # the split views, scored by the reference, with gradients taken back to the packed tensor
    params64 = f64(params).requires_grad_()
    split64 = vae_fast.dmol_from_packed(params64, mixtures, channels)
    flat = [None if t is None else t.reshape(-1, *t.shape[len(lead):]) for t in split64]
    x64 = f64(x).repeat(flat[0].shape[0] // batch, 1, 1, 1)
    expected = ref.discretized_logistic_mixture_log_prob(x64, *flat).reshape(lead)
    (expected_grad,) = torch.autograd.grad(expected.sum(), params64)
    assert_matches_reference(got, expected, torch.float64, terms=channels * mixtures * 6)
    assert_matches_reference(grad, expected_grad, torch.float64, terms=1)
    # the unpacked API on the split tensors gives the same values
    torch.testing.assert_close(vae_fast.discretized_logistic_mixture_log_prob(x, *split), got)


def test_packed_layout_is_nvae_and_pixelcnnpp():
    # NVAE DiscMixLogistic: logits = p[:, :M]; l = p[:, M:].view(B, 3, 3M, H, W); means, log-scales, tanh(coeffs)
    m, b, h, w = 2, 1, 2, 2
    params = torch.arange(b * 10 * m * h * w, dtype=torch.float64).reshape(b, 10 * m, h, w) / 100
    split = vae_fast.dmol_from_packed(params, m, 3)
    l = params[:, m:].view(b, 3, 3 * m, h, w)
    torch.testing.assert_close(split.logit_probs, params[:, :m])
    torch.testing.assert_close(split.means, l[:, :, :m])
    torch.testing.assert_close(split.log_scales, l[:, :, m:2 * m])
    torch.testing.assert_close(split.coeffs, torch.tanh(l[:, :, 2 * m:]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_far_tail_and_edge_bins_exact(kernel_backend, dtype):
    # single logistic, mean 0.9, log-scale -7: pixel 64 is ~1.4e4 scales away. The exact log mass
    # (mpmath) differs from PixelCNN++'s pdf fallback by about 2 nats; the kernels must be exact.
    # Also the edge bins (pixels 0 and 255 extend to -inf / +inf) and a log-scale below the clamp.
    mp.mp.dps = 50
    cases = [(64, 0.9, -7.0), (0, 0.9, -7.0), (255, -0.9, -7.0), (255, 0.999, -2.0), (0, -1.0, 0.5), (128, 0.0, -9.0),
             (200, 0.56, 3.0)]
    half = mp.mpf(1) / 255
    for pixel, mean, log_scale in cases:
        x = torch.full((1, 1, 1, 1), pixel / 127.5 - 1, dtype=dtype, device=kernel_backend)
        means = torch.full((1, 1, 1, 1, 1), mean, dtype=dtype, device=kernel_backend)
        log_scales = torch.full((1, 1, 1, 1, 1), log_scale, dtype=dtype, device=kernel_backend)
        logits = torch.zeros(1, 1, 1, 1, dtype=dtype, device=kernel_backend)
        got = vae_fast.discretized_logistic_mixture_log_prob(x, logits, means, log_scales).item()
        xm = mp.mpf(float(x.item()))
        inv_s = mp.exp(-max(mp.mpf(log_scale), mp.mpf(-7)))
        cdf = lambda v: 1 / (1 + mp.exp(-v))  # noqa: E731
        upper = cdf(inv_s * (xm - mp.mpf(float(means.item())) + half)) if pixel < 255 else mp.mpf(1)
        lower = cdf(inv_s * (xm - mp.mpf(float(means.item())) - half)) if pixel > 0 else mp.mpf(0)
        exact = float(mp.log(upper - lower))
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert abs(got - exact) <= tol * max(1.0, abs(exact)), (pixel, mean, log_scale, got, exact)


def test_clamped_log_scales_get_no_gradient_and_the_clamp_can_be_disabled(backend):
    # one component (responsibility 1), log-scale -9 in the first pixel row: below the -7 clamp
    x, logits, means, log_scales, _ = make_dmol(1, 1, 1, (2, 2), torch.float64, backend, coeffs=False)
    with torch.no_grad():
        log_scales[0, 0, 0, 0] = -9.0
    (grad,) = torch.autograd.grad(vae_fast.discretized_logistic_mixture_log_prob(x, logits, means, log_scales).sum(),
                                  log_scales)
    assert (grad[0, 0, 0, 0] == 0).all() and (grad[0, 0, 0, 1] != 0).all()
    free = vae_fast.discretized_logistic_mixture_log_prob(x, logits, means, log_scales, log_scale_min=-math.inf)
    (grad_free,) = torch.autograd.grad(free.sum(), log_scales)
    assert (grad_free[0, 0, 0, 0] != 0).all()
    expected = ref.discretized_logistic_mixture_log_prob(f64(x), f64(logits), f64(means), f64(log_scales),
                                                         log_scale_min=-math.inf)
    assert_matches_reference(free, expected, torch.float64, terms=4)


@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck(backend, packed):
    if packed:
        gen = torch.Generator().manual_seed(5)
        params = (torch.randn(1, 20, 1, 2, generator=gen, dtype=torch.float64) - 0.5).to(backend).requires_grad_()
        x = (torch.tensor([[0, 37], [255, 128], [90, 1]], dtype=torch.float64) / 127.5 - 1).reshape(1, 3, 1, 2).to(backend)
        assert torch.autograd.gradcheck(lambda p: vae_fast.dmol_packed_log_prob(x, p, 2), (params,))
    else:
        x, *params = make_dmol(1, 3, 2, (1, 2), torch.float64, backend, ls_shift=-1.0)
        assert torch.autograd.gradcheck(lambda *p: vae_fast.discretized_logistic_mixture_log_prob(x, *p), tuple(params))


def test_saved_for_backward_is_at_most_the_parameters(kernel_backend):
    params, x, mixtures = _bench_inputs(kernel_backend)
    for fn in (lambda: vae_fast.dmol_packed_log_prob(x, params, mixtures),
               lambda: vae_fast.discretized_logistic_mixture_log_prob(x, *vae_fast.dmol_from_packed(params, mixtures, 3))):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn()
        nbytes = sum(t.numel() * t.element_size() for t in saved)
        out.sum().backward()
        params.grad = None
        # the packed op saves exactly one gradient buffer of the parameters' size; the split path
        # saves its four gradients plus what the split itself (tanh of the coefficients) saves
        limit = params.numel() * params.element_size() * (1.0 if len(saved) == 1 else 1.35)
        assert nbytes <= limit, [tuple(t.shape) for t in saved]


def _bench_inputs(device):
    gen = torch.Generator().manual_seed(6)
    params = (0.5 * torch.randn(2, 40, 4, 4, generator=gen)).to(device).requires_grad_()
    x = (torch.randint(0, 256, (2, 3, 4, 4), generator=gen) / 127.5 - 1).to(device)
    return params, x, 4


def test_packed_grad_equals_nvae_eager_where_the_eager_formula_is_exact(kernel_backend):
    # NVAE's published log-prob (benchmarks.impls.dmol_eager) agrees with the fused kernel when no
    # pixel is 254 (NVAE treats x > 0.99 as the last bin) and no bin mass is below its 1e-5 fallback
    from benchmarks import impls

    gen = torch.Generator().manual_seed(7)
    mixtures = 3
    params = 0.1 * torch.randn(2, 10 * mixtures, 3, 3, generator=gen, dtype=torch.float64)
    for c in range(3):  # wide components: log-scale -1
        params[:, mixtures + 3 * mixtures * c + mixtures:mixtures + 3 * mixtures * c + 2 * mixtures] = -1.0
    params = params.to(kernel_backend).requires_grad_()
    pixels = torch.randint(0, 254, (2, 3, 3, 3), generator=gen)
    pixels[0, :, 0, 0] = 0
    x = (pixels.double() / 127.5 - 1).to(kernel_backend)
    fused = impls.dmol_fused(params, x, mixtures)
    (g_fused,) = torch.autograd.grad(fused, params)
    eager = impls.dmol_eager(params, x, mixtures)
    (g_eager,) = torch.autograd.grad(eager, params)
    torch.testing.assert_close(fused, eager, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_fused, g_eager, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    args = make_dmol(2, 3, 2, (2, 2), dtype, backend, ls_shift=-1.0)
    got = vae_fast.discretized_logistic_mixture_log_prob(*args)
    assert got.dtype == torch.float32  # a sum over pixels: float32, as torch losses under autocast
    expected, _ = reference_with_grads(*args)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=2e-2, atol=0.5)
    grads = torch.autograd.grad(got.sum(), [t for t in args[1:] if t is not None])
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


def test_empty_batch_and_single_pixel(backend):
    x, *params = make_dmol(2, 3, 2, (1, 1), torch.float64, backend)
    got = vae_fast.discretized_logistic_mixture_log_prob(x[:0], *(p[:0] for p in params))
    assert got.shape == (0,)
    single = vae_fast.discretized_logistic_mixture_log_prob(x, *params)
    assert_matches_reference(single, reference_with_grads(x, *params)[0], torch.float64, terms=6)


def test_non_contiguous_parameters(backend):
    x, logits, means, log_scales, coeffs = make_dmol(2, 3, 2, (3, 4), torch.float64, backend)
    # channels-last views of the same values
    views = [t.detach().movedim(-1, 1).contiguous().movedim(1, -1).requires_grad_() for t in (logits, means, log_scales)]
    assert not views[1].is_contiguous()
    got = vae_fast.discretized_logistic_mixture_log_prob(x, *views, coeffs)
    torch.testing.assert_close(got, vae_fast.discretized_logistic_mixture_log_prob(x, logits, means, log_scales, coeffs))
    got.sum().backward()
    assert views[1].grad.shape == means.shape


def test_bad_input_raises_naming_the_argument(backend):
    x, logits, means, log_scales, coeffs = make_dmol(2, 3, 2, (2, 2), torch.float32, backend)
    fn = vae_fast.discretized_logistic_mixture_log_prob
    bad_x = x.clone()
    bad_x[1, 2, 1, 1] = 1.5
    with pytest.raises(ValueError, match=r"x must lie in \[-1, 1\]"):
        fn(bad_x, logits, means, log_scales, coeffs)
    with pytest.raises(ValueError, match=r"x must lie in \[-1, 1\]"):
        vae_fast.dmol_packed_log_prob(bad_x, torch.zeros(2, 20, 2, 2, device=backend), 2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        fn((x * 127).long(), logits, means, log_scales, coeffs)
    with pytest.raises(ValueError, match="log_scales must have means' shape"):
        fn(x, logits, means, log_scales[..., :1], coeffs)
    with pytest.raises(ValueError, match="logit_probs must have shape"):
        fn(x, logits[:, :1], means, log_scales, coeffs)
    with pytest.raises(ValueError, match="means must have shape"):
        fn(x[:1], logits, means, log_scales, coeffs)
    with pytest.raises(ValueError, match="coeffs couple the 3 channels"):
        fn(x[:, :1], logits, means[:, :1], log_scales[:, :1], coeffs[:, :1])
    with pytest.raises(ValueError, match="num_bits"):
        fn(x, logits, means, log_scales, coeffs, num_bits=0)
    with pytest.raises(ValueError, match="log_scale_min must be a finite float or -inf"):
        fn(x, logits, means, log_scales, coeffs, log_scale_min=math.nan)
    with pytest.raises(TypeError, match="log_scale_min must be a float"):
        vae_fast.dmol_packed_log_prob(x, torch.zeros(2, 20, 2, 2, device=backend), log_scale_min="low")
    with pytest.raises(TypeError, match="means must be a floating-point"):
        fn(x, logits, means.long(), log_scales, coeffs)
    with pytest.raises(ValueError, match=r"params must have shape \(B, M \* 10"):
        vae_fast.dmol_packed_log_prob(x, torch.zeros(2, 21, 2, 2, device=backend))
    with pytest.raises(ValueError, match=r"params must have shape \(B, 20, H, W\)"):
        vae_fast.dmol_from_packed(torch.zeros(2, 21, 2, 2), 2, 3)


def test_elbo_with_dmol_likelihood(backend):
    gen = torch.Generator().manual_seed(8)
    batch, latent, mixtures = 3, 4, 2
    x = (torch.randint(0, 256, (batch, 3, 2, 2), generator=gen).double() / 127.5 - 1).to(backend)
    mu = torch.randn(batch, latent, generator=gen, dtype=torch.float64).to(backend).requires_grad_()
    logvar = torch.zeros(batch, latent, dtype=torch.float64, device=backend, requires_grad=True)
    weight = torch.randn(latent, 10 * mixtures * 4, generator=gen, dtype=torch.float64).to(backend) * 0.1
    eps = torch.randn(2, batch, latent, generator=gen, dtype=torch.float64).to(backend)

    def decode(z):
        return (z @ weight).reshape(*z.shape[:-1], 10 * mixtures, 2, 2)

    packed = vae_fast.elbo(x, mu, logvar, decode, likelihood="dmol", num_samples=2, eps=eps)
    split = vae_fast.elbo(x, mu, logvar, lambda z: vae_fast.dmol_from_packed(decode(z), mixtures, 3),
                          likelihood="dmol", num_samples=2, eps=eps)
    torch.testing.assert_close(packed.loss, split.loss)
    z = mu + eps  # sigma = 1
    log_lik = ref.discretized_logistic_mixture_log_prob(
        f64(x).repeat(2, 1, 1, 1), *vae_fast.dmol_from_packed(f64(decode(z)).reshape(-1, 20, 2, 2), mixtures, 3))
    expected = -(log_lik.reshape(2, batch).mean(0) - ref.gaussian_kl(f64(mu), f64(logvar))).mean()
    torch.testing.assert_close(packed.loss.detach().cpu(), expected)
    packed.loss.backward()
    assert torch.isfinite(mu.grad).all()


def test_opcheck_dmol_ops(kernel_backend):
    dev = kernel_backend
    x, logits, means, log_scales, coeffs = make_dmol(2, 3, 2, (1, 3), torch.float32, dev)
    flat = [t.detach().reshape(*t.shape[:-2], 3).requires_grad_() for t in (logits, means, log_scales, coeffs)]
    torch.library.opcheck(torch.ops.vae_fast.dmol_log_prob.default, (x.reshape(2, 3, 3), *flat, 8, -7.0, True))
    params = torch.randn(2, 20, 3, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.vae_fast.dmol_packed_log_prob.default, (x.reshape(2, 3, 3), params, 2, 8, -7.0, True))


def test_torch_compile_fullgraph(kernel_backend):
    if kernel_backend == "cpu" and _backend.backend("cpu") == "triton":
        pytest.skip("inductor does not compile for the Triton interpreter")
    params, x, mixtures = _bench_inputs(kernel_backend)

    def fn(params):
        return vae_fast.dmol_packed_log_prob(x, params, mixtures).sum()

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(params)
    out.backward()
    expected = fn(params.detach().requires_grad_())
    torch.testing.assert_close(out, expected)


def test_thread_count_does_not_change_results():
    if _backend._cpu_ext is None:
        pytest.skip("no C++ extension")
    params, x, mixtures = _bench_inputs("cpu")
    results = []
    for _ in thread_counts():
        with vae_fast.use_backend("cpu"):
            out = vae_fast.dmol_packed_log_prob(x, params, mixtures)
            (grad,) = torch.autograd.grad(out.sum(), params)
        results.append((out, grad))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])
