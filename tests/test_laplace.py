"""The Laplace likelihood (L1 reconstruction with a learned scale) and its LDM equivalence."""
import math

import pytest
import torch

import vae_fast
from vae_fast import reference as ref

from .conftest import assert_matches_reference

F64 = torch.float64


def test_reference_laplace_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mean, x = torch.randn(4, 6, generator=gen, dtype=F64), torch.randn(4, 6, generator=gen, dtype=F64)
    log_scale = torch.randn(4, 6, generator=gen, dtype=F64)
    expected = torch.distributions.Laplace(mean, log_scale.exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(ref.laplace_log_prob(mean, x, log_scale), expected, rtol=1e-12, atol=1e-12)


def _scales(device, gen, batch, dims):
    """log_scale layouts a decoder produces: fixed, learned scalar, per pixel, per example, second head."""
    return {
        "fixed": -0.7,
        "scalar": torch.tensor(0.2, dtype=F64).to(device),
        "per_pixel": (0.3 * torch.randn(*dims, generator=gen, dtype=F64)).to(device),
        "per_example": (0.3 * torch.randn(batch, *([1] * len(dims)), generator=gen, dtype=F64)).to(device),
        "head": (0.3 * torch.randn(batch, *dims, generator=gen, dtype=F64)).to(device),
    }


@pytest.mark.parametrize("layout", ["fixed", "scalar", "per_pixel", "per_example", "head"])
@pytest.mark.parametrize("samples", [1, 2])
def test_laplace_log_prob_and_gradients_match_the_reference(backend, layout, samples):
    gen = torch.Generator().manual_seed(1)
    batch, dims = 3, (2, 5)
    lead = (samples, batch) if samples > 1 else (batch,)
    mean = torch.randn(*lead, *dims, generator=gen, dtype=F64).to(backend).requires_grad_()
    x = torch.randn(batch, *dims, generator=gen, dtype=F64).to(backend).requires_grad_()
    log_scale = _scales(backend, gen, batch, dims)[layout]
    if isinstance(log_scale, torch.Tensor):
        log_scale.requires_grad_()
    got = vae_fast.laplace_log_prob(mean, x, log_scale)
    assert got.shape == lead and got.dtype == F64
    leaves = [mean, x] + ([log_scale] if isinstance(log_scale, torch.Tensor) else [])
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    expected = ref.laplace_log_prob(copies[0], copies[1], copies[2] if len(copies) > 2 else log_scale,
                                    batch_dims=len(lead))
    assert_matches_reference(got, expected, F64, terms=10)
    upstream = torch.randn(lead, generator=gen, dtype=F64).to(backend)
    for g, e in zip(torch.autograd.grad((got * upstream).sum(), leaves),
                    torch.autograd.grad((expected * upstream).sum(), copies)):
        assert_matches_reference(g, e, F64, terms=10)
    fn = lambda *ts: vae_fast.laplace_log_prob(ts[0], ts[1], ts[2] if len(ts) > 2 else log_scale)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(leaves))


def test_ldm_l1_with_learned_logvar_is_the_laplace_nll_minus_log2_per_element(backend):
    """LDM (CompVis latent-diffusion, ldm/modules/losses/contperceptual.py, perceptual weight 0):
    rec = |x - xrec|; nll = rec / exp(logvar) + logvar; nll_loss = sum(nll) / B; loss = nll_loss +
    kl_weight * sum(posterior.kl()) / B. vae_fast's elbo(likelihood="laplace") loss is that plus D log 2."""
    gen = torch.Generator().manual_seed(2)
    batch, channels, size = 4, 3, 8
    x = (2 * torch.rand(batch, channels, size, size, generator=gen, dtype=F64) - 1).to(backend)
    moments = torch.randn(batch, 8, 2, 2, generator=gen, dtype=F64).to(backend).requires_grad_()
    logvar_param = torch.tensor(0.3, dtype=F64, device=backend, requires_grad=True)  # LDM's nn.Parameter
    decoder = torch.nn.ConvTranspose2d(4, channels, 4, stride=4).double().to(backend)
    eps = torch.randn(batch, 4, 2, 2, generator=gen, dtype=F64).to(backend)
    kl_weight = 1e-6
    mean, logvar = moments.chunk(2, dim=1)
    # LDM's numbers (DiagonalGaussianDistribution.sample / kl, without its clamp: the values are in range)
    xrec = decoder(mean + torch.exp(0.5 * logvar) * eps)
    nll = (x - xrec).abs() / torch.exp(logvar_param) + logvar_param
    kl = 0.5 * torch.sum(mean ** 2 + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])
    ldm_loss = nll.sum() / batch + kl_weight * kl.sum() / batch
    # the per-element identity
    per_example = -vae_fast.laplace_log_prob(xrec, x, logvar_param)
    d = channels * size * size
    torch.testing.assert_close(per_example - d * math.log(2), nll.flatten(1).sum(1), rtol=1e-12, atol=1e-10)
    # the whole loss, fused, and its gradients
    got = vae_fast.elbo(x, mean, logvar, lambda z: (decoder(z), logvar_param), likelihood="laplace",
                        beta=kl_weight, eps=eps).loss
    torch.testing.assert_close(got - d * math.log(2), ldm_loss, rtol=1e-12, atol=1e-10)
    params = [moments, logvar_param, *decoder.parameters()]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(ldm_loss, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_an_exact_fit_under_a_collapsed_scale_is_finite(kernel_backend):
    """|x - mean| e^-s with x = mean and e^-s = inf (float32, s = -100) is 0, not NaN; elsewhere the
    value and gradients are those of float64."""
    x = torch.tensor([[0.5, 0.25, -1.0]], device=kernel_backend)
    mean = torch.tensor([[0.5, 0.25, -1.0]], device=kernel_backend, requires_grad=True)
    log_scale = torch.full((1, 3), -100.0, device=kernel_backend, requires_grad=True)
    for fn in (vae_fast.laplace_log_prob, vae_fast.gaussian_log_prob):
        value = fn(mean, x, log_scale)
        g_mean, g_scale = torch.autograd.grad(value.sum(), (mean, log_scale))
        assert torch.isfinite(value).all() and torch.isfinite(g_mean).all() and torch.isfinite(g_scale).all()
        assert (g_mean == 0).all()
    expected = ref.laplace_log_prob(mean.double(), x.double(), log_scale.double())
    assert_matches_reference(vae_fast.laplace_log_prob(mean, x, log_scale), expected, torch.float32, terms=3)


def test_bad_log_scale_is_a_value_error_naming_it(backend):
    mean, x = torch.zeros(2, 5, device=backend), torch.zeros(2, 5, device=backend)
    with pytest.raises(ValueError, match="log_scale"):
        vae_fast.laplace_log_prob(mean, x, torch.zeros(3, device=backend))
    with pytest.raises(TypeError, match="log_scale"):
        vae_fast.laplace_log_prob(mean, x, "0.0")
    with pytest.raises(ValueError, match="x"):
        vae_fast.laplace_log_prob(mean, torch.zeros(2, 4, device=backend))


def test_elbo_laplace_under_compile_and_autocast():
    torch.manual_seed(0)
    x = torch.rand(4, 6)
    mu, lv = torch.randn(4, 2, requires_grad=True), torch.randn(4, 2)
    w = torch.randn(2, 6, requires_grad=True)
    loss = lambda m, l: vae_fast.elbo(x, m, l, lambda z: z @ w, likelihood="laplace", eps=torch.ones(4, 2)).loss  # noqa: E731
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(mu, lv), loss(mu, lv))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae_fast.laplace_log_prob((x @ w.T @ w).to(torch.bfloat16), x)
    assert out.dtype == torch.float32
