"""The "mse" likelihood: MSE + weighted-KL VAEs (AntixK PyTorch-VAE and the like) number for number."""
import pytest
import torch
import torch.nn.functional as F

import vae_fast
from vae_fast import reference as ref

from .conftest import assert_matches_reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_elbo_mse_equals_the_antixk_loss_number_for_number(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 4, 4, generator=gen, dtype=dtype).to(backend)
    mu = torch.randn(8, 5, generator=gen, dtype=dtype).to(backend).requires_grad_()
    log_var = (0.3 * torch.randn(8, 5, generator=gen, dtype=dtype)).to(backend).requires_grad_()
    eps = torch.randn(8, 5, generator=gen, dtype=dtype).to(backend)
    w = (0.2 * torch.randn(5, 48, generator=gen, dtype=dtype)).to(backend).requires_grad_()
    decode = lambda z: torch.tanh(z @ w).view(-1, 3, 4, 4)  # noqa: E731
    kld_weight = 0.00025
    # AntixK PyTorch-VAE, models/vanilla_vae.py loss_function (their sampling with our eps)
    recons = decode(mu + torch.exp(0.5 * log_var) * eps)
    recons_loss = F.mse_loss(recons, x)
    kld_loss = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1), dim=0)
    expected = recons_loss + kld_weight * kld_loss
    got = vae_fast.elbo(x, mu, log_var, decode, likelihood="mse", beta=kld_weight, eps=eps).loss
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0)
    for a, b in zip(torch.autograd.grad(got, [mu, log_var, w]), torch.autograd.grad(expected, [mu, log_var, w])):
        torch.testing.assert_close(a, b, rtol=1e-10 if dtype == torch.float64 else 1e-5,
                                   atol=1e-12 if dtype == torch.float64 else 1e-9)


def test_mse_log_prob_matches_the_reference_with_gradients_in_mean_and_x(backend):
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64).to(backend).requires_grad_()  # K = 2 samples
    x = torch.randn(3, 7, generator=gen, dtype=torch.float64).to(backend).requires_grad_()
    got = vae_fast.mse_log_prob(mean, x)
    assert got.shape == (2, 3)
    assert_matches_reference(got, ref.mean_squared_error_log_prob(mean, x, batch_dims=2), torch.float64, terms=7)
    torch.testing.assert_close(vae_fast.mse_log_prob(mean[0], x, reduction="mean"), -F.mse_loss(mean[0], x))
    assert torch.autograd.gradcheck(lambda m, xx: vae_fast.mse_log_prob(m, xx), (mean, x))
    assert torch.autograd.gradgradcheck(lambda m, xx: vae_fast.mse_log_prob(m, xx), (mean, x))
