"""Latents of any shape: the KL summed over ``dim`` (conv latents (B, C, H, W), SD/LDM moments
chunked along channels), and ``elbo`` with a (B, *latent) posterior — against the float64
reference on every backend."""
import pytest
import torch

import vae_fast
from vae_fast import reference as ref

from .conftest import assert_matches_reference

F64 = torch.float64


def _moments(backend, batch=3, channels=4, size=(3, 2), seed=0):
    gen = torch.Generator().manual_seed(seed)
    moments = torch.randn(batch, 2 * channels, *size, generator=gen, dtype=F64).to(backend)
    return moments


def test_kl_over_the_dims_of_a_conv_latent_from_chunked_moments(backend):
    moments = _moments(backend)
    mu, logvar = moments.chunk(2, dim=1)  # non-contiguous channel-first views, as diffusers makes them
    got = vae_fast.gaussian_kl(mu, logvar, dim=(1, 2, 3))
    assert got.shape == (3,)
    assert_matches_reference(got, ref.gaussian_kl(mu.flatten(1), logvar.flatten(1)), F64, terms=24)
    per_element = vae_fast.gaussian_kl(mu, logvar, dim=(1, 2, 3), reduce=False)
    assert per_element.shape == mu.shape
    assert_matches_reference(per_element, ref.gaussian_kl(mu, logvar, reduce=False), F64)
    # a learned prior broadcast over space (per channel), and a KL over one non-trailing dim
    prior_mu = torch.randn(1, 4, 1, 1, dtype=F64, device=backend)
    prior_logvar = torch.randn(4, 1, 1, dtype=F64, device=backend)
    got = vae_fast.gaussian_kl(mu, logvar, prior_mu, prior_logvar, dim=(-3, -2, -1))
    expected = ref.gaussian_kl(mu.flatten(1), logvar.flatten(1), prior_mu.expand_as(mu).flatten(1),
                               prior_logvar.expand_as(mu).flatten(1))
    assert_matches_reference(got, expected, F64, terms=24)
    over_channels = vae_fast.gaussian_kl(mu, logvar, dim=1)
    assert over_channels.shape == (3, 3, 2)
    assert_matches_reference(over_channels, ref.gaussian_kl(mu.movedim(1, -1), logvar.movedim(1, -1)), F64, terms=4)


def test_sample_and_gradients_over_conv_dims_match_the_reference(backend):
    moments = _moments(backend).requires_grad_()
    eps = torch.randn(2, 3, 4, 3, 2, dtype=F64, device=backend)
    prior_mu = torch.randn(1, 4, 1, 1, dtype=F64, device=backend, requires_grad=True)

    def fused(moments, prior_mu):
        mu, logvar = moments.chunk(2, dim=1)
        z, kl = vae_fast.gaussian_sample_kl(mu, logvar, prior_mu=prior_mu, eps=eps, num_samples=2, dim=(1, 2, 3))
        return z, kl

    z, kl = fused(moments, prior_mu)
    mu, logvar = moments.chunk(2, dim=1)
    assert z.shape == (2, 3, 4, 3, 2) and kl.shape == (3,)
    assert_matches_reference(z, ref.reparameterize(mu, logvar, eps), F64)
    assert_matches_reference(kl, ref.gaussian_kl(mu.flatten(1), logvar.flatten(1),
                                                 prior_mu.expand_as(mu).flatten(1)), F64, terms=24)
    assert torch.autograd.gradcheck(fused, (moments, prior_mu))
    with pytest.raises(ValueError, match="dim"):
        vae_fast.gaussian_kl(mu, logvar, dim=4)
    with pytest.raises(ValueError, match="dim"):
        vae_fast.gaussian_kl(mu, logvar, dim=(1, -3))
    with pytest.raises(TypeError, match="dim"):
        vae_fast.gaussian_kl(mu, logvar, dim=1.0)


@pytest.mark.parametrize("free_bits", [0.0, 0.05])
def test_elbo_with_a_conv_latent_and_a_conv_decoder_matches_the_reference(backend, free_bits):
    torch.manual_seed(0)
    decoder = torch.nn.ConvTranspose2d(4, 1, kernel_size=4, stride=2, padding=1).double().to(backend)
    moments = _moments(backend, batch=3, channels=4, size=(4, 4)).requires_grad_()
    x = torch.rand(3, 1, 8, 8, dtype=F64, device=backend).round()
    eps = torch.randn(3, 4, 4, 4, dtype=F64, device=backend)
    mu, logvar = moments.chunk(2, dim=1)
    out = vae_fast.elbo(x, mu, logvar, decoder, eps=eps, free_bits=free_bits)
    assert out.kl.shape == (3,) and out.kl_per_dim.shape == mu.shape and out.z.shape == mu.shape
    z = ref.reparameterize(mu, logvar, eps)
    log_lik = ref.bernoulli_log_prob(decoder(z), x)
    kl_elements = ref.gaussian_kl(mu, logvar, reduce=False)
    batch_mean = kl_elements.mean(0, keepdim=True)
    kl_term = torch.where(batch_mean >= free_bits, kl_elements, torch.full_like(kl_elements, free_bits)).flatten(1).sum(1)
    expected = -(log_lik - kl_term).mean()
    assert_matches_reference(out.loss, expected, F64, terms=64)
    assert_matches_reference(out.kl, kl_elements.flatten(1).sum(1), F64, terms=64)
    got = torch.autograd.grad(out.loss, [moments, decoder.weight])
    want = torch.autograd.grad(expected, [moments, decoder.weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_iwae_objective_with_a_conv_latent(backend):
    decoder = torch.nn.Conv2d(2, 1, kernel_size=1).double().to(backend)
    moments = _moments(backend, batch=2, channels=2, size=(3, 3))
    mu, logvar = moments.chunk(2, dim=1)
    x = torch.rand(2, 1, 3, 3, dtype=F64, device=backend).round()
    eps = torch.randn(4, 2, 2, 3, 3, dtype=F64, device=backend)
    out = vae_fast.elbo(x, mu, logvar, lambda z: decoder(z.flatten(0, 1)).unflatten(0, z.shape[:2]), eps=eps,
                        num_samples=4, objective="iwae")
    z = ref.reparameterize(mu, logvar, eps)
    log_w = (ref.bernoulli_log_prob(decoder(z.flatten(0, 1)).unflatten(0, (4, 2)), x, batch_dims=2)
             + ref.gaussian_log_density(z.flatten(2), torch.zeros_like(mu).flatten(1), torch.zeros_like(mu).flatten(1))
             - ref.gaussian_log_density(z.flatten(2), mu.flatten(1), logvar.flatten(1)))
    assert_matches_reference(out.loss, -ref.log_mean_exp(log_w, 0).mean(), F64, terms=18)
