"""Latents of any shape: the KL summed over ``dim`` (conv latents (B, C, H, W), SD/LDM moments
chunked along channels), and ``elbo`` with a (B, *latent) posterior — against the float64
reference on every backend."""
import pytest
import torch

import vae_fast
from vae_fast import reference as ref

from .conftest import OpRecorder, assert_matches_reference

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


class _RecordingExtension:
    """Stands in for vae_fast._C in the CPU backend, recording the mu/scale pointers (and row
    strides) the latent kernels receive."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if not name.startswith("latent_"):
            return fn

        def record(*args):
            # (dtype, param, batch, dim, samples, mu, mu_row_stride, scale, scale_row_stride, ...); the per-step
            # entry points (latent_step_*) pass each operand's extent after its row stride
            if name.startswith("latent_step_"):
                self.calls.append((name, args[5], args[6], args[8], args[9]))
            else:
                self.calls.append((name, args[5], args[6], args[7], args[8]))
            return fn(*args)
        return record


@pytest.mark.skipif(vae_fast._backend._cpu_ext is None, reason="needs the C++ extension")
@pytest.mark.parametrize("shape, split_dim, kl_dims", [
    ((8, 8, 32, 32), 1, (1, 2, 3)),  # SD-like 4x32x32 latent from (B, 2C, H, W) moments
    ((128, 40), -1, -1),             # an MLP encoder's h.chunk(2, -1): rows of 20, several per tile
])
def test_chunked_moments_reach_the_cpu_kernels_without_a_copy(monkeypatch, shape, split_dim, kl_dims):
    from vae_fast.kernels import cpu
    recorder = _RecordingExtension(cpu._C)
    monkeypatch.setattr(cpu, "_C", recorder)
    moments = torch.randn(*shape, requires_grad=True)
    with vae_fast.use_backend("cpu"):
        mu, logvar = moments.chunk(2, dim=split_dim)
        z, kl = vae_fast.gaussian_sample_kl(mu, logvar, dim=kl_dims)
        (z.square().sum() + kl.sum()).backward()
    # (the per-step entry points: plain eager (B, Z) views with unit column stride, as these are)
    assert [c[0] for c in recorder.calls] == ["latent_step_forward", "latent_step_backward"]
    row_stride = moments[0].numel()  # one batch row of the moments: both halves
    for _, mu_ptr, mu_rs, scale_ptr, scale_rs in recorder.calls:
        assert mu_ptr == mu.data_ptr() == moments.data_ptr()
        assert scale_ptr == logvar.data_ptr()
        assert mu_rs == scale_rs == row_stride
    # values: the strided read equals a contiguous copy, noise included (the stream follows the
    # logical index, not the memory layout)
    with vae_fast.use_backend("cpu"):
        torch.manual_seed(3)
        z_strided, kl_strided = vae_fast.gaussian_sample_kl(mu, logvar, dim=kl_dims)
        torch.manual_seed(3)
        z_dense, kl_dense = vae_fast.gaussian_sample_kl(mu.contiguous(), logvar.contiguous(), dim=kl_dims)
    torch.testing.assert_close(z_strided, z_dense, rtol=0, atol=0)
    torch.testing.assert_close(kl_strided, kl_dense, rtol=0, atol=0)
    g_mu, g_lv = torch.autograd.grad((z_strided.square().sum() + kl_strided.sum()), (moments,))[0].chunk(2, split_dim)
    expected_mu = 2 * z_dense.detach() + mu.detach()
    sigma = (0.5 * logvar.detach()).exp()
    eps = (z_dense.detach() - mu.detach()) / sigma
    expected_lv = 2 * z_dense.detach() * eps * 0.5 * sigma + 0.5 * (logvar.detach().exp() - 1)
    torch.testing.assert_close(g_mu, expected_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_lv, expected_lv, rtol=1e-4, atol=1e-4)


def test_trailing_kl_dims_take_no_permutes():
    # a conv latent's KL dims (1, 2, 3) are already trailing: its rows are one reshape, with no identity permutes
    # (there and back, each a view op plus an autograd node: about 30 us of a 64x4x7x7 call with a prior here);
    # moved dims still permute, and both equal the flattened call
    moments = torch.randn(3, 4, 2, 5, dtype=torch.float64, requires_grad=True)
    mu, logvar = moments.chunk(2, dim=1)
    prior_mu, prior_logvar = torch.randn(3, 2, 2, 5, dtype=torch.float64), torch.randn(3, 2, 2, 5, dtype=torch.float64)
    eps = torch.randn(3, 2, 2, 5, dtype=torch.float64)
    for dims, permutes in (((1, 2, 3), False), ((1, 3), True)):
        with OpRecorder() as recorder:
            z, kl = vae_fast.gaussian_sample_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, eps=eps,
                                                dim=dims)
            (z.sum() + kl.sum()).backward()
        assert any("permute" in name for name in recorder.ops) == permutes, dims
        order = [0] + [d for d in range(1, 4) if d not in dims] + list(dims)
        rows = lambda t: t.permute(order).reshape(*[t.shape[d] for d in order[:4 - len(dims)]], -1)  # noqa: E731
        z_rows, kl_rows = vae_fast.gaussian_sample_kl(rows(mu), rows(logvar), prior_mu=rows(prior_mu),
                                                      prior_logvar=rows(prior_logvar), eps=rows(eps))
        torch.testing.assert_close(rows(z), z_rows, rtol=0, atol=0)
        torch.testing.assert_close(kl, kl_rows, rtol=0, atol=0)


@pytest.mark.parametrize("dim", [3, 20, 333])
def test_strided_rows_match_the_reference_for_every_tile_shape(kernel_backend, dim):
    """Row strides with several rows per tile (small dim), one row (dim 333 > one tile on C++ for the
    Triton interpreter's 64-wide blocks), a learned prior and K = 2 samples with explicit eps."""
    gen = torch.Generator().manual_seed(dim)
    batch = 7
    h = torch.randn(batch, 2 * dim + 5, generator=gen, dtype=F64).to(kernel_backend)  # padded rows
    mu, logvar = h[:, :dim].requires_grad_(), h[:, dim + 5:].requires_grad_()
    assert mu.stride(0) == 2 * dim + 5 and not mu.is_contiguous()
    prior_mu = torch.randn(dim, generator=gen, dtype=F64).to(kernel_backend)
    prior_logvar = torch.randn(batch, 1, generator=gen, dtype=F64).to(kernel_backend)
    eps = torch.randn(2, batch, dim, generator=gen, dtype=F64).to(kernel_backend)
    z, kl = vae_fast.gaussian_sample_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, eps=eps,
                                        num_samples=2)
    assert_matches_reference(z, ref.reparameterize(mu, logvar, eps), F64)
    pm, plv = prior_mu.expand_as(mu), prior_logvar.expand_as(mu)
    assert_matches_reference(kl, ref.gaussian_kl(mu, logvar, pm, plv), F64, terms=dim)
    upstream = torch.randn(2, batch, dim, generator=gen, dtype=F64).to(kernel_backend)
    got = torch.autograd.grad((z * upstream).sum() + kl.sum(), (mu, logvar))
    mu_r, lv_r = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
    expected = torch.autograd.grad((ref.reparameterize(mu_r, lv_r, eps) * upstream).sum()
                                   + ref.gaussian_kl(mu_r, lv_r, pm, plv).sum(), (mu_r, lv_r))
    for g, e in zip(got, expected):
        assert_matches_reference(g, e, F64, terms=2)
