"""The latent block: reparameterised sampling and the analytic KL, fused (``ops/latent.py``)."""
from __future__ import annotations

import math

import torch

from .._validation import (check_broadcastable, check_choice, check_no_grad, check_positive_int, check_same_device,
                           check_same_dtype, check_tensor)
from ..ops.codes import SCALE_PARAMS
from ..ops.latent import apply_latent


def _draw_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    # A 0-d int64 tensor drawn from torch's generator: torch.manual_seed reproduces it, each
    # call advances the generator, and torch.compile(fullgraph=True) traces it (a Generator
    # made here would not). The kernels turn it into a Philox key.
    if generator is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=generator.device, generator=generator)
    return seed if seed.device == device else seed.to(device)


def _as_rows(t: torch.Tensor | None, mu: torch.Tensor, rows: int) -> torch.Tensor | None:
    # priors broadcast against mu (*B, Z); the kernels take them broadcastable to (rows, Z)
    if t is None or mu.dim() <= 2:
        return t
    return t.expand(mu.shape).reshape(rows, mu.shape[-1])


def _latent(mu, logvar, prior_mu, prior_logvar, param, eps, generator, num_samples, want_kl_per_dim,
            want_log_ratio=False):
    # The checks are ordered so that the common call (two same-shape float tensors, no
    # prior, no eps) costs a handful of attribute reads: this runs every training step.
    check_tensor("mu", mu)
    check_tensor("logvar", logvar)
    if mu.dim() < 1:
        raise ValueError(f"mu must have shape (..., Z) with at least one dim, got shape {tuple(mu.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    param_code = SCALE_PARAMS.get(param) if isinstance(param, str) else None
    if param_code is None:
        check_choice("param", param, SCALE_PARAMS)
    param_code = int(param_code)
    if prior_mu is not None or prior_logvar is not None:
        # one given: the other defaults to the standard normal's value
        zero = torch.zeros((), dtype=mu.dtype, device=mu.device)
        prior_mu = zero if prior_mu is None else prior_mu
        prior_logvar = zero if prior_logvar is None else prior_logvar
        for name, t in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
            check_tensor(name, t)
            check_broadcastable(name, t, mu.shape, "mu")
    if eps is not None:
        check_tensor("eps", eps)
        check_no_grad("eps", eps)
        expected = (num_samples, *mu.shape)
        if eps.shape != expected and not (num_samples == 1 and eps.shape == mu.shape):
            raise ValueError(f"eps must have shape {expected} (or mu's shape when num_samples=1), got {tuple(eps.shape)}")
    if logvar.dtype != mu.dtype or logvar.device != mu.device or prior_mu is not None or eps is not None:
        names = ("mu", "logvar", "prior_mu", "prior_logvar", "eps")
        tensors = (mu, logvar, prior_mu, prior_logvar, eps)
        check_same_device(names, tensors)
        check_same_dtype(names, tensors)

    samples = num_samples
    flat = mu.dim() != 2
    if flat:
        dim = mu.shape[-1]
        rows = math.prod(mu.shape[:-1])
        mu2, logvar2 = mu.reshape(rows, dim), logvar.reshape(rows, dim)
        prior_mu, prior_logvar = _as_rows(prior_mu, mu, rows), _as_rows(prior_logvar, mu, rows)
    else:
        rows, dim = mu.shape
        mu2, logvar2 = mu, logvar
    if eps is not None:
        seed = torch.zeros((), dtype=torch.int64, device=mu.device)
        eps = eps.reshape(samples, rows, dim)
    elif samples > 0:
        seed = _draw_seed(mu.device, generator)
    else:
        seed = torch.zeros((), dtype=torch.int64, device=mu.device)
    z, kl, kl_per_dim, log_ratio = apply_latent(
        mu2, logvar2, prior_mu, prior_logvar, eps, seed, param_code, samples, want_kl_per_dim, want_log_ratio)
    if samples == 1:
        z = z.view(mu.shape)
    elif flat:
        z = z.view(samples, *mu.shape)
    if flat:
        kl = kl.view(mu.shape[:-1])
        kl_per_dim = kl_per_dim.view(mu.shape) if want_kl_per_dim else None
    elif not want_kl_per_dim:
        kl_per_dim = None
    if want_log_ratio:
        return z, kl, kl_per_dim, log_ratio.view(samples, *mu.shape[:-1])
    return z, kl, kl_per_dim


def gaussian_sample_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    param: str = "logvar",
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised sample and analytic KL in one fused pass.

    ``z = mu + sigma * eps`` with ``sigma`` from ``logvar`` read as ``param``
    (``"logvar"``: log sigma^2, ``"logstd"``: log sigma, ``"softplus"``: sigma = softplus(raw)),
    and ``KL(N(mu, sigma^2) || N(prior_mu, exp(prior_logvar)))`` summed over the last dim.

    Args:
        mu, logvar: ``(*B, Z)``.
        prior_mu, prior_logvar: a learned diagonal Gaussian prior, broadcastable to ``mu``
            (default N(0, I)); gradients flow to them.
        eps: explicit noise ``(K, *B, Z)`` (or ``(*B, Z)`` for K = 1); by default noise comes
            from an in-kernel Philox stream seeded from ``generator`` (or torch's default
            generator of mu's device) and is recomputed, not stored, for backward.
        num_samples: K.

    Returns:
        ``z`` of shape ``(*B, Z)`` (``(K, *B, Z)`` for K > 1) and ``kl`` of shape ``(*B,)``.
    """
    check_positive_int("num_samples", num_samples)
    z, kl, _ = _latent(mu, logvar, prior_mu, prior_logvar, param, eps, generator, num_samples, False)
    return z, kl


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    *,
    param: str = "logvar",
    reduce: bool = True,
) -> torch.Tensor:
    """Analytic KL(N(mu, sigma^2) || N(prior_mu, exp(prior_logvar))), fused and overflow-safe.

    Per dim, with lv = log sigma^2 and d = lv - prior_logvar:
    ``exp(d - ln 2) - (1 + d)/2 + (mu - prior_mu)^2 / (2 exp(prior_logvar))``.
    Returns ``(*B,)`` (summed over the last dim) or, with ``reduce=False``, ``(*B, Z)``.
    """
    _, kl, kl_per_dim = _latent(mu, logvar, prior_mu, prior_logvar, param, None, None, 0, not reduce)
    return kl if reduce else kl_per_dim

