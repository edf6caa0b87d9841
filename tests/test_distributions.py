"""vae_fast.DiagonalGaussian against diffusers' DiagonalGaussianDistribution formulas (written out
below from diffusers' source, evaluated in float64; and diffusers itself when installed)."""
import math

import pytest
import torch

import vae_fast
from vae_fast import _backend
from vae_fast.distributions import DIFFUSERS_LOGVAR_CLAMP

F64 = torch.float64


class DiffusersFormulas:
    """diffusers.models.autoencoders.vae.DiagonalGaussianDistribution, minus its torch.randn."""

    def __init__(self, parameters):
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, eps):
        return self.mean + self.std * eps

    def kl(self, other=None):
        if other is None:
            return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(torch.pow(self.mean - other.mean, 2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample, dims=(1, 2, 3)):
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + torch.pow(sample - self.mean, 2) / self.var,
                               dim=dims)


def _moments(device, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(2, 8, 4, 4, generator=gen, dtype=F64)).to(device)


def test_matches_diffusers_formulas_values_and_gradients(backend):
    moments = _moments(backend).requires_grad_()
    other_moments = _moments(backend, seed=1).requires_grad_()
    ours = vae_fast.DiagonalGaussian(moments, logvar_clamp=DIFFUSERS_LOGVAR_CLAMP)
    theirs = DiffusersFormulas(moments)
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), msg=name)
    torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-12, atol=1e-12)
    prior = vae_fast.DiagonalGaussian(mean=other_moments[:, :4], logvar=other_moments[:, 4:])
    reference_prior = DiffusersFormulas(other_moments)
    torch.testing.assert_close(ours.kl(prior), theirs.kl(reference_prior), rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours.kl(prior).sum(), [moments, other_moments])
    want = torch.autograd.grad(theirs.kl(reference_prior).sum(), [moments, other_moments])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    z = theirs.sample(torch.randn(2, 4, 4, 4, dtype=F64, device=backend))
    torch.testing.assert_close(ours.nll(z), theirs.nll(z))
    assert torch.equal(ours.mode(), theirs.mean)


def test_sample_is_reparameterised_and_reproducible(backend):
    moments = _moments(backend).requires_grad_()
    posterior = vae_fast.DiagonalGaussian(moments)
    z1 = posterior.sample(generator=torch.Generator(backend).manual_seed(7))
    z2 = posterior.sample(generator=torch.Generator(backend).manual_seed(7))
    assert torch.equal(z1, z2) and z1.shape == (2, 4, 4, 4)
    eps = (z1 - posterior.mean) / posterior.std  # the noise it used: standard normal draws
    assert eps.abs().max() < 6 and abs(float(eps.mean())) < 0.5
    grad_mu, = torch.autograd.grad(z1.sum(), moments)
    torch.testing.assert_close(grad_mu[:, :4], torch.ones_like(grad_mu[:, :4]))  # dz/dmean = 1
    torch.testing.assert_close(grad_mu[:, 4:], (0.5 * posterior.std * eps).detach())  # dz/dlogvar = std eps / 2


def test_unclamped_kl_is_overflow_safe_and_deterministic_mode(backend):
    moments = _moments(backend)
    moments[:, 4:] = -60.0  # below diffusers' clamp: the fused KL needs none
    kl = vae_fast.DiagonalGaussian(moments).kl()
    expected = 0.5 * (moments[:, :4] ** 2 + torch.exp(moments[:, 4:]) - 1 - moments[:, 4:]).sum((1, 2, 3))
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-10)
    frozen = vae_fast.DiagonalGaussian(moments, deterministic=True)
    assert torch.equal(frozen.sample(), frozen.mean) and torch.equal(frozen.kl(), torch.zeros(2, dtype=F64,
                                                                                             device=backend))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="parameters must have shape .* even channel count"):
        vae_fast.DiagonalGaussian(torch.zeros(2, 7, 4, 4))
    with pytest.raises(ValueError, match="mean= and logvar="):
        vae_fast.DiagonalGaussian(mean=torch.zeros(2, 4, 4, 4))
    with pytest.raises(TypeError, match="other must be a DiagonalGaussian"):
        vae_fast.DiagonalGaussian(torch.zeros(2, 8, 4, 4)).kl(torch.zeros(2, 4, 4, 4))
    # (torch's broadcasting RuntimeError and reduction IndexError before)
    posterior = vae_fast.DiagonalGaussian(torch.zeros(2, 8, 4, 4))
    with pytest.raises(ValueError, match=r"sample of shape \(2, 3, 4, 4\) must broadcast with the mean's shape"):
        posterior.nll(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"dims \(5,\) is out of range for sample with 4 dims"):
        posterior.nll(torch.zeros(2, 4, 4, 4), dims=(5,))
    with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
        posterior.nll([0.0])


def test_compiles_fullgraph():
    if _backend.backend("cpu") != "cpu":
        pytest.skip("needs the C++ backend (inductor does not compile for the Triton interpreter)")
    moments = _moments("cpu").float().requires_grad_()

    def kl_and_sample(moments):
        posterior = vae_fast.DiagonalGaussian(moments)
        return posterior.kl(), posterior.sample()

    kl, z = torch.compile(kl_and_sample, fullgraph=True, backend="aot_eager")(moments)
    eager_kl, _ = kl_and_sample(moments)
    torch.testing.assert_close(kl, eager_kl)  # the sample's noise differs (inductor draws the seed)
    assert z.shape == (2, 4, 4, 4)
    (kl.sum() + z.sum()).backward()
    grad_compiled = moments.grad.clone()
    moments.grad = None
    (eager_kl.sum() + kl_and_sample(moments)[1].sum()).backward()
    torch.testing.assert_close(grad_compiled[:, :4], moments.grad[:, :4])  # d/dmean: KL term + 1 per sample


def test_diffusers_itself_when_installed(backend):
    diffusers_vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    moments = _moments(backend)
    theirs = diffusers_vae.DiagonalGaussianDistribution(moments)
    ours = vae_fast.DiagonalGaussian(moments, logvar_clamp=DIFFUSERS_LOGVAR_CLAMP)
    torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.nll(ours.mean), theirs.nll(ours.mean))
