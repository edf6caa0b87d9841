"""The implementations the benchmarks compare, each a function ``step(inputs) -> loss`` whose
forward + backward is timed: vae_fast's fused ops, eager PyTorch written the way users write
it (``torch.nn.functional`` formulas and ``torch.distributions``), and — built by the caller —
``torch.compile`` of the eager code.

Every case has a ``make(shape, device)`` that returns the leaf inputs (requiring grad) and the
fixed data, and ``impls``: name -> step function.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import vae_fast

# ------------------------------------------------------------------ latent: z and KL


def latent_inputs(shape, device, dtype=torch.float32):
    batch, dim = shape
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(batch, dim, generator=gen).to(device, dtype).requires_grad_()
    logvar = (0.5 * torch.randn(batch, dim, generator=gen)).to(device, dtype).requires_grad_()
    weight = torch.randn(batch, dim, generator=gen).to(device, dtype)  # makes dL/dz non-trivial
    return mu, logvar, weight


def latent_fused(mu, logvar, weight):
    z, kl = vae_fast.gaussian_sample_kl(mu, logvar)
    return (z * weight).sum() + kl.sum()


def latent_eager(mu, logvar, weight):
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn_like(std)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    return (z * weight).sum() + kl.sum()


def latent_distributions(mu, logvar, weight):
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z = q.rsample()
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
    return (z * weight).sum() + kl.sum()


# ------------------------------------------------------------------ conv latent: SD / LDM moments (B, 2C, H, W)


def conv_latent_inputs(shape, device, dtype=torch.float32):
    """shape (B, C, H, W) of the latent; the leaf is the encoder's moments (B, 2C, H, W)."""
    batch, channels, height, width = shape
    gen = torch.Generator().manual_seed(0)
    moments = torch.randn(batch, 2 * channels, height, width, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(batch, channels, height, width, generator=gen).to(device, dtype)
    return moments, weight


def conv_latent_fused(moments, weight):
    mean, logvar = moments.chunk(2, dim=1)  # strided views, read in place by the kernel
    z, kl = vae_fast.gaussian_sample_kl(mean, logvar, dim=(1, 2, 3))
    return (z * weight).sum() + kl.sum()


def conv_latent_posterior(moments, weight):
    posterior = vae_fast.DiagonalGaussian(moments)
    return (posterior.sample() * weight).sum() + posterior.kl().sum()


def conv_latent_eager(moments, weight):
    # diffusers' DiagonalGaussianDistribution: chunk, clamp, sample, kl
    mean, logvar = torch.chunk(moments, 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    std = torch.exp(0.5 * logvar)
    z = mean + std * torch.randn_like(mean)
    kl = 0.5 * torch.sum(torch.pow(mean, 2) + torch.exp(logvar) - 1.0 - logvar, dim=[1, 2, 3])
    return (z * weight).sum() + kl.sum()


def conv_latent_bytes(shape, itemsize=4):
    return latent_bytes((shape[0], math.prod(shape[1:])), itemsize)


# ------------------------------------------------------------------ reconstruction likelihoods


def likelihood_inputs(shape, device, kind, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    if kind == "categorical":
        *lead, classes = shape
        logits = torch.randn(*lead, classes, generator=gen).to(device, dtype).requires_grad_()
        x = torch.randint(0, classes, tuple(lead), generator=gen).to(device)
        return logits, x
    theta = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    x = torch.rand(shape, generator=gen).to(device, dtype)
    if kind == "bernoulli":
        x = torch.bernoulli(x)
    return theta, x


FUSED_LIKELIHOOD = {
    "bernoulli": lambda t, x: vae_fast.bernoulli_log_prob(t, x),
    "continuous_bernoulli": lambda t, x: vae_fast.continuous_bernoulli_log_prob(t, x),
    "gaussian": lambda t, x: vae_fast.gaussian_log_prob(t, x),
    "categorical": lambda t, x: vae_fast.categorical_log_prob(t, x),
}

EAGER_LIKELIHOOD = {
    "bernoulli": lambda t, x: -F.binary_cross_entropy_with_logits(t, x, reduction="none").sum(-1),
    "continuous_bernoulli": lambda t, x: torch.distributions.ContinuousBernoulli(logits=t).log_prob(x).sum(-1),
    "gaussian": lambda t, x: torch.distributions.Normal(t, 1.0).log_prob(x).sum(-1),
    "categorical": lambda t, x: -F.cross_entropy(t.reshape(-1, t.shape[-1]), x.reshape(-1), reduction="none")
    .reshape(x.shape[0], -1).sum(-1),
}


def likelihood_step(log_prob):
    return lambda theta, x: -log_prob(theta, x).mean()


# ------------------------------------------------------------------ whole ELBO loss (decoder excluded)
#
# Everything an ELBO step does except the decoder: sample z, KL, the reconstruction term on a
# given decoder output (`logits`, a leaf standing in for it) and the assembly, forward and
# backward. The decoder's contribution to dL/dz is stood in for by a fixed linear functional
# of z, `(z * dz).sum()`: O(B Z), so that neither implementation pays for a decoder-sized
# temporary (a `logits + f(z)` stand-in costs a full fresh 48 MiB tensor at 4096 x 3072 —
# more than the fused loss itself).


def elbo_inputs(shape, device, dtype=torch.float32):
    batch, latent, pixels = shape
    gen = torch.Generator().manual_seed(2)
    mu = torch.randn(batch, latent, generator=gen).to(device, dtype).requires_grad_()
    logvar = (0.5 * torch.randn(batch, latent, generator=gen)).to(device, dtype).requires_grad_()
    logits = torch.randn(batch, pixels, generator=gen).to(device, dtype).requires_grad_()
    x = torch.bernoulli(torch.rand(batch, pixels, generator=gen)).to(device, dtype)
    dz = (torch.randn(batch, latent, generator=gen) / batch).to(device, dtype)
    return mu, logvar, logits, x, dz


def elbo_fused(mu, logvar, logits, x, dz):
    out = vae_fast.elbo(x, mu, logvar, lambda z: logits)
    return out.loss + (out.z * dz).sum()


def elbo_eager(mu, logvar, logits, x, dz):
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn_like(std)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    return -(log_lik - kl).mean() + (z * dz).sum()


# ------------------------------------------------------------------ discretised logistic mixture (PixelCNN++ / NVAE)


def dmol_inputs(shape, device, dtype=torch.float32):
    """shape (B, C, H, W, M): a packed decoder output (B, M + 3C M, H, W) and 8-bit images in [-1, 1]."""
    batch, channels, height, width, mixtures = shape
    gen = torch.Generator().manual_seed(3)
    packed = mixtures + channels * 3 * mixtures
    params = (0.5 * torch.randn(batch, packed, height, width, generator=gen)).to(device, dtype).requires_grad_()
    x = (torch.randint(0, 256, (batch, channels, height, width), generator=gen) / 127.5 - 1).to(device, dtype)
    return params, x, mixtures


def dmol_fused(params, x, mixtures):
    return -vae_fast.dmol_packed_log_prob(x, params, mixtures).mean()


def dmol_eager(params, x, mixtures):
    """NVAE's DiscMixLogistic.log_prob (Vahdat & Kautz 2020; PixelCNN++'s loss in NCHW), as published:
    every term is a full (B, 3, M, H, W) temporary, kept for backward."""
    num_mix, max_val = mixtures, 255.0
    batch, _, height, width = params.shape
    logit_probs = params[:, :num_mix]
    l = params[:, num_mix:].view(batch, 3, 3 * num_mix, height, width)
    means = l[:, :, :num_mix]
    log_scales = torch.clamp(l[:, :, num_mix:2 * num_mix], min=-7.0)
    coeffs = torch.tanh(l[:, :, 2 * num_mix:3 * num_mix])
    samples = x.unsqueeze(4).expand(-1, -1, -1, -1, num_mix).permute(0, 1, 4, 2, 3)
    mean1 = means[:, 0]
    mean2 = means[:, 1] + coeffs[:, 0] * samples[:, 0]
    mean3 = means[:, 2] + coeffs[:, 1] * samples[:, 0] + coeffs[:, 2] * samples[:, 1]
    means = torch.cat([mean1.unsqueeze(1), mean2.unsqueeze(1), mean3.unsqueeze(1)], dim=1)
    centered = samples - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / max_val)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered - 1.0 / max_val)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_prob_mid_safe = torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-10)),
                                    log_pdf_mid - math.log(max_val / 2))
    log_probs = torch.where(samples < -0.999, log_cdf_plus,
                            torch.where(samples > 0.99, log_one_minus_cdf_min, log_prob_mid_safe))
    log_probs = torch.sum(log_probs, 1) + F.log_softmax(logit_probs, dim=1)
    return -torch.logsumexp(log_probs, dim=1).reshape(batch, -1).sum(-1).mean()


def dmol_bytes(shape, itemsize=4):
    batch, channels, height, width, mixtures = shape
    params = batch * (mixtures + channels * 3 * mixtures) * height * width
    return itemsize * (2 * params + batch * channels * height * width)  # read params and x, write the gradient


# ------------------------------------------------------------------ bytes that must move (for GB/s)


def latent_bytes(shape, itemsize=4):
    batch, dim = shape
    # fwd reads mu, logvar, writes z, kl; bwd reads mu, logvar, dL/dz, writes two gradients
    return itemsize * (batch * dim * (2 + 1) + batch + batch * dim * (3 + 2))


def likelihood_bytes(shape, kind, itemsize=4):
    if kind == "categorical":
        elems = math.prod(shape)
        pixels = elems // shape[-1]
        return itemsize * 2 * elems + 8 * pixels  # read logits, write gradient, read targets
    elems = math.prod(shape)
    return itemsize * 3 * elems  # read theta and x, write the gradient (backward scales it in place)
