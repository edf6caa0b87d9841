"""What q(z|x) converges to, measured: importance-weighted bounds and posterior diagnostics.

The identity ELBO = log p(x) - KL(q(z|x) || p(z|x)) says that maximising the ELBO pulls
q(z|x) toward the *true posterior of the current decoder* (within q's family); the
KL-to-prior term pulls the *aggregate* posterior q(z) = E_x q(z|x) toward p(z). These
functions estimate both gaps:

* :func:`iwae_bound` — log p(x) from K importance samples (Burda et al., 2016);
* :func:`posterior_gap` — IWAE-K minus ELBO, an estimate of KL(q(z|x) || p(z|x));
* :func:`kl_per_dim`, :func:`active_units`, :func:`mutual_information`,
  :func:`aggregate_kl` — how the latent code is used (Burda et al. 2016; Hoffman & Johnson
  2016, "ELBO surgery"; He et al. 2019, "Lagging inference networks").

All take encoder outputs ``mu``, ``logvar`` of shape ``(N, Z)`` (log-variance
parameterisation; :func:`mutual_information` and :func:`aggregate_kl` also a conv latent
``(N, C, H, W)``, the vector of its C·H·W elements) and work in chunks so that large N or K fit in memory.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .functional import LIKELIHOODS, gaussian_kl, gaussian_sample_kl
from .functional.latent import _latent_over, latent_kl_dims
from .functional.objectives import _check_nonnegative
from ._validation import check_choice, check_positive_int, check_tensor
from .reference import gaussian_log_density

@torch.no_grad()
def iwae_bound(
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    decode: Callable[[torch.Tensor], object],
    *,
    k: int,
    likelihood: str | Callable = "bernoulli",
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    param: str = "logvar",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """IWAE-k estimate of log p(x), per example ``(B,)``:

        log (1/k) sum_i p(x | z_i) p(z_i) / q(z_i | x),   z_i ~ q(z | x)

    It is a lower bound in expectation that increases with k toward log p(x). Samples are
    drawn ``chunk_size`` at a time (default: all k) by the fused latent kernel, which returns each
    sample's log q(z|x) - log p(z) from the same pass; ``decode`` is
    called on ``(chunk, B, Z)`` (``(chunk, B, C, H, W)`` for a conv latent) and the likelihood's ``(chunk, B)`` log-probabilities are
    combined with a running max-shifted log-sum-exp, so memory is bounded by one chunk.
    """
    check_positive_int("k", k)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    check_tensor("x", x, floating=False)
    log_prob = likelihood if callable(likelihood) else LIKELIHOODS.get(likelihood)
    if log_prob is None:
        check_choice("likelihood", likelihood, LIKELIHOODS)
    chunk = min(chunk_size or k, k)
    check_tensor("mu", mu)
    latent_dims = latent_kl_dims(mu)  # (a conv latent's q and p are densities over all its non-batch elements)
    running_max = None
    running_sum = None
    for start in range(0, k, chunk):
        size = min(chunk, k - start)
        # the latent kernel returns each sample's log q(z|x) - log p(z) from the same pass as z
        z, _, _, log_ratio = _latent_over(mu, logvar, prior_mu, prior_logvar, param, None, generator, size, False,
                                          want_log_ratio=True, dim=latent_dims)
        z = z if size > 1 else z.unsqueeze(0)
        log_px = log_prob(decode(z), x)
        log_px = log_px if log_px.dim() == 2 else log_px.unsqueeze(0)
        log_w = log_px - log_ratio  # (size, B)
        chunk_max = log_w.max(0).values
        if running_max is None:
            running_max, running_sum = chunk_max, torch.exp(log_w - chunk_max).sum(0)
        else:
            new_max = torch.maximum(running_max, chunk_max)
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(log_w - new_max).sum(0)
            running_max = new_max
    return running_max + torch.log(running_sum) - math.log(k)


def posterior_gap(x, mu, logvar, decode, *, k: int = 100, likelihood="bernoulli", generator=None,
                  chunk_size=None, num_elbo_samples: int = 1) -> torch.Tensor:
    """IWAE-k minus the ELBO, per example ``(B,)``: an estimate of KL(q(z|x) || p(z|x)), the part
    of the ELBO's gap that a better q would close (it underestimates the gap by what IWAE-k
    still misses, which shrinks as k grows)."""
    from .functional import elbo

    bound = iwae_bound(x, mu, logvar, decode, k=k, likelihood=likelihood, generator=generator, chunk_size=chunk_size)
    with torch.no_grad():
        value = elbo(x, mu, logvar, decode, likelihood=likelihood, num_samples=num_elbo_samples,
                     generator=generator, reduction="none").elbo
    return bound - value


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Dataset-average KL(q(z_j|x) || N(0, 1)) per latent dim, ``(Z,)``."""
    return gaussian_kl(mu, logvar, reduce=False).mean(0)


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Number of latent dims whose posterior mean varies over the data: Cov_x(E_q[z_j]) > threshold
    (Burda et al., 2016)."""
    check_tensor("mu", mu)
    threshold = _check_nonnegative("threshold", threshold)
    if mu.dim() < 1 or mu.shape[0] < 2:  # (the variance over one example is NaN: every unit would read inactive)
        raise ValueError(f"mu must hold at least 2 examples (N, ...) for a variance over the data, got shape "
                         f"{tuple(mu.shape)}")
    return int((mu.var(0, unbiased=True) > threshold).sum())


def _latent_vectors(mu, logvar, samples: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mu, logvar as (N, D) rows (a conv latent (N, C, H, W) flattened: its density is over all C·H·W elements),
    after checking them and the sample and chunk counts."""
    check_tensor("mu", mu)
    check_tensor("logvar", logvar)
    check_positive_int("samples", samples)
    check_positive_int("chunk_size", chunk_size)
    if mu.dim() < 2 or mu.shape[0] == 0:
        raise ValueError(f"mu must have shape (N, Z) or (N, C, H, W) with N >= 1, got {tuple(mu.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    return mu.flatten(1), logvar.flatten(1)


def _log_aggregate_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, chunk: int) -> torch.Tensor:
    """log q(z) = log (1/N) sum_n q(z | x_n) for each row of z, ``(M,)``, in chunks of z."""
    n = mu.shape[0]
    out = []
    for start in range(0, z.shape[0], chunk):
        zc = z[start:start + chunk, None, :]  # (m, 1, Z) against (1, N, Z)
        log_q = gaussian_log_density(zc, mu[None], logvar[None])  # (m, N)
        out.append(torch.logsumexp(log_q, dim=1) - math.log(n))
    return torch.cat(out)


@torch.no_grad()
def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, *, samples: int = 1,
                       generator: torch.Generator | None = None, chunk_size: int = 256) -> torch.Tensor:
    """I(x; z) under q: E_x E_q(z|x)[log q(z|x) - log q(z)], with q(z) the aggregate posterior of
    the given batch (Hoffman & Johnson 2016; the estimator of He et al. 2019). Monte Carlo with
    ``samples`` draws per example; O(N^2 Z) in chunks of ``chunk_size``. Returns a 0-d tensor."""
    mu, logvar = _latent_vectors(mu, logvar, samples, chunk_size)
    z, _ = gaussian_sample_kl(mu, logvar, num_samples=samples, generator=generator)
    z = z.reshape(-1, mu.shape[-1]) if samples > 1 else z
    mu_rep = mu.repeat(samples, 1)
    lv_rep = logvar.repeat(samples, 1)
    log_q_cond = gaussian_log_density(z, mu_rep, lv_rep)
    log_q_agg = _log_aggregate_density(z, mu, logvar, chunk_size)
    return (log_q_cond - log_q_agg).mean()


@torch.no_grad()
def aggregate_kl(mu: torch.Tensor, logvar: torch.Tensor, *, samples: int = 1,
                 generator: torch.Generator | None = None, chunk_size: int = 256) -> torch.Tensor:
    """KL(q(z) || p(z)) of the aggregate posterior q(z) = (1/N) sum_n q(z|x_n) against N(0, I)
    ("ELBO surgery": E_x KL(q(z|x) || p(z)) = I(x; z) + KL(q(z) || p(z))). Monte Carlo, 0-d tensor."""
    mu, logvar = _latent_vectors(mu, logvar, samples, chunk_size)
    z, _ = gaussian_sample_kl(mu, logvar, num_samples=samples, generator=generator)
    z = z.reshape(-1, mu.shape[-1]) if samples > 1 else z
    log_q_agg = _log_aggregate_density(z, mu, logvar, chunk_size)
    log_p = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
    return (log_q_agg - log_p).mean()
