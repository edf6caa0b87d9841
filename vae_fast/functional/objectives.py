"""The objectives: the ELBO (beta, free bits, K samples) and the IWAE bound, assembled on-device
from the fused latent op and a registered likelihood."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .._validation import check_choice, check_positive_int, check_tensor
from ._common import REDUCTIONS, reduce
from .dmol import _dmol_packed, _dmol_split
from .latent import _latent_over, latent_kl_dims
from .likelihoods import _bernoulli, _categorical, _continuous_bernoulli, _gaussian, _laplace, _mse

LikelihoodFn = Callable[[object, torch.Tensor], torch.Tensor]
LIKELIHOODS: dict[str, LikelihoodFn] = {}


def register_likelihood(name: str):
    """Decorator: make ``fn(decoder_output, x) -> log p(x | z)`` of shape ``(B,)`` or ``(K, B)``
    available as ``elbo(..., likelihood=name)``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")

    def decorate(fn: LikelihoodFn) -> LikelihoodFn:
        if not callable(fn):  # (elbo would fail calling it, steps later)
            raise TypeError(f"register_likelihood({name!r}) decorates a callable (decoder_output, x) -> log p, "
                            f"got {type(fn).__name__}")
        LIKELIHOODS[name] = fn
        return fn

    return decorate


# The built-in likelihoods take the upstream gradient elbo() expects for each row, so that their
# kernels can pre-scale the gradient and backward can skip its scaling pass.
_FUSED: dict[str, tuple[Callable, Callable]] = {}


def _builtin_likelihood(name: str, fused):
    """Registers a public ``(decoder_output, x) -> log p`` under ``name``; elbo() calls ``fused``
    (the same computation, told the exact expected upstream gradient) instead."""

    def public(output, x):
        return fused(output, x, None)

    public.__name__ = public.__qualname__ = f"{name}_likelihood"
    public.__doc__ = f"The {name!r} likelihood of :func:`vae_fast.elbo`: ``(decoder_output, x) -> log p(x | z)``."
    _FUSED[name] = (public, fused)
    register_likelihood(name)(public)


def _mean_and_scale(output, likelihood: str, scale_name: str):
    """A Gaussian / Laplace decoder's output: mean, or (mean, its log-variance / log-scale)."""
    if not isinstance(output, (tuple, list)):
        return output, 0.0
    if len(output) != 2:
        raise ValueError(f"decode must return mean or (mean, {scale_name}) for likelihood {likelihood!r}, "
                         f"got a {type(output).__name__} of {len(output)}")
    return output


def _gaussian_output(output, x, expected):
    mean, logvar = _mean_and_scale(output, "gaussian", "logvar")
    return _gaussian(mean, x, logvar, "none", expected)


def _laplace_output(output, x, expected):
    mean, log_scale = _mean_and_scale(output, "laplace", "log_scale")
    return _laplace(mean, x, log_scale, "none", expected)


def _dmol_output(output, x, expected):
    # a packed decoder output (read in place) or (logit_probs, means, log_scales[, coeffs])
    if isinstance(output, torch.Tensor):
        return _dmol_packed(x, output, expected_upstream=expected)
    return _dmol_split(x, *output, expected_upstream=expected)


_builtin_likelihood("bernoulli", lambda logits, x, expected: _bernoulli(logits, x, "none", expected))
_builtin_likelihood("continuous_bernoulli", lambda logits, x, expected: _continuous_bernoulli(logits, x, "none", expected))
_builtin_likelihood("gaussian", _gaussian_output)
_builtin_likelihood("laplace", _laplace_output)
_builtin_likelihood("mse", lambda mean, x, expected: _mse(mean, x, "none", expected))
_builtin_likelihood("categorical", lambda logits, x, expected: _categorical(logits, x, "none", expected))
_builtin_likelihood("dmol", _dmol_output)


class ELBOResult(NamedTuple):
    """What :func:`elbo` returns.

    loss: the quantity to minimise, ``-(log_likelihood - beta * KL)`` with free bits, reduced.
    elbo: ``(B,)`` the true per-example ELBO ``log_likelihood - kl`` (never altered by beta or free bits).
    log_likelihood: ``(B,)`` E_q[log p(x|z)], averaged over the K samples.
    kl: ``(B,)``; kl_per_dim and z: mu's shape (z: ``(K, *mu.shape)`` for K samples).
    """

    loss: torch.Tensor
    elbo: torch.Tensor
    log_likelihood: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor
    z: torch.Tensor


OBJECTIVES = ("elbo", "iwae", "iwae_dreg")


def _importance_log_weights(log_lik, z, mu, scale, prior_mu, prior_logvar, param, stop_q_params):
    """log p(x|z_k) + log p(z_k) - log q(z_k|x), shape (K, B), from the K samples z (K, B, Z).

    With ``stop_q_params`` the density log q is evaluated with detached (mu, sigma), so that
    gradients reach the encoder only through z (the DReG estimator's pathwise term)."""
    from ..reference import gaussian_log_density, logvar_from_scale

    log_lik = log_lik if log_lik.dim() == 2 else log_lik.unsqueeze(0)
    if mu.dim() > 2:  # a (B, *latent) latent: the densities sum over all latent dims
        latent_ndim = mu.dim() - 1
        prior_mu = None if prior_mu is None else prior_mu.expand(mu.shape).flatten(1)
        prior_logvar = None if prior_logvar is None else prior_logvar.expand(mu.shape).flatten(1)
        z, mu, scale = z.flatten(-latent_ndim), mu.flatten(1), scale.flatten(1)
    lv = logvar_from_scale(scale, param)
    q_mu, q_lv = (mu.detach(), lv.detach()) if stop_q_params else (mu, lv)
    p_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu
    p_lv = torch.zeros_like(mu) if prior_logvar is None else prior_logvar
    return log_lik + gaussian_log_density(z, p_mu, p_lv) - gaussian_log_density(z, q_mu, q_lv)


def _check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0 <= value < math.inf:  # (an infinite weight turns a zero KL into NaN)
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return float(value)


def elbo(
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    decode: Callable[[torch.Tensor], object],
    *,
    likelihood: str | LikelihoodFn = "bernoulli",
    beta: float = 1.0,
    free_bits: float = 0.0,
    num_samples: int = 1,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    param: str = "logvar",
    reduction: str = "mean",
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    objective: str = "elbo",
    head=None,
    head_kwargs: dict | None = None,
) -> ELBOResult:
    """The VAE objective on fused kernels: ``ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z))``.

    Args:
        x: data ``(B, ...)``.
        mu, logvar: encoder outputs ``(B, Z)``, or ``(B, *latent)`` for convolutional latents (e.g.
            ``moments.chunk(2, dim=1)`` of an SD/LDM encoder's (B, 2C, H, W)): the KL sums over
            every non-batch dim, free bits apply per latent element (``logvar`` read as ``param``).
        decode: callable ``z -> decoder output``: logits for ``"bernoulli"``,
            ``"continuous_bernoulli"`` and ``"categorical"``; the mean or ``(mean, logvar)`` for
            ``"gaussian"``; the mean or ``(mean, log_scale)`` for ``"laplace"`` (L1; the LDM
            autoencoder's learned-logvar reconstruction, see :func:`vae_fast.laplace_log_prob`);
            the reconstruction for ``"mse"`` (log-likelihood = minus the per-example
            mean squared error, so the loss is ``F.mse_loss + beta * KL``, see :func:`vae_fast.mse_log_prob`); for ``"dmol"`` the packed PixelCNN++/NVAE tensor (see
            :func:`dmol_from_packed`) or ``(logit_probs, means, log_scales[, coeffs])``. With ``num_samples=K`` it is called once on ``z`` of shape ``(K, B, Z)``.
        likelihood: a registered name (:data:`LIKELIHOODS`) or a callable
            ``(decoder_output, x) -> (B,)`` / ``(K, B)``.
        beta: weight of the KL term in ``loss`` (beta-VAE, KL warm-up; see :class:`vae_fast.KLWarmup`).
        free_bits: lambda of Kingma et al. (2016, IAF paper): the KL term of ``loss`` is
            ``sum_j max(lambda, mean_over_batch KL_j)`` per example (times B for ``reduction="sum"``),
            so dims whose batch-mean KL is below lambda get no gradient. (Alternatives seen in
            codebases clamp each example's KL_j instead; that changes which dims get a gradient.)
            For ``reduction="none"`` example b gets ``sum_j (KL_bj if mean_j >= lambda else lambda)``,
            whose batch mean is the ``"mean"`` loss.
        num_samples: K samples of z; the log-likelihood is averaged over them.
        prior_mu, prior_logvar: learned diagonal Gaussian prior (hierarchical VAEs).
        reduction: ``"mean"`` (per-example average), ``"sum"`` or ``"none"``.
        eps: explicit noise (tests, reproducibility); generator: seeds the in-kernel Philox noise.
        objective: ``"elbo"``; ``"iwae"``: ``loss`` is minus the IWAE-K bound
            log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x) (Burda et al., 2016; K = ``num_samples``);
            ``"iwae_dreg"``: the same loss value with the doubly-reparameterised gradient estimator
            for the encoder (Tucker et al., 2019): the score-function part of log q is dropped and
            sample k's pathwise gradient is weighted by its squared normalised weight; decoder
            and prior parameters get the ordinary IWAE gradient. ``beta`` and ``free_bits`` apply
            to the ELBO objective only. ``elbo``, ``log_likelihood`` and ``kl`` are reported as for
            the ELBO objective.
        head: a :class:`vae_fast.nn.FusedHead` (the decoder's last Linear / 1x1 conv with its
            likelihood): ``decode`` then returns the head's input features h, and the
            log-likelihood is ``head.log_prob(h, x, **head_kwargs)``, its output never held in full
            (``likelihood`` is the head's own; e.g. ``head_kwargs={"logvar": self.log_sigma2}``).
    """
    if not (type(num_samples) is int and num_samples == 1 and type(beta) is float and 0.0 <= beta < math.inf
            and free_bits == 0.0 and type(free_bits) is float and objective == "elbo" and reduction in REDUCTIONS
            and isinstance(x, torch.Tensor) and not x.is_nested):  # (the per-step call passes every check below)
        check_tensor("x", x, floating=False)
        check_positive_int("num_samples", num_samples)
        beta = _check_nonnegative("beta", beta)
        free_bits = _check_nonnegative("free_bits", free_bits)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("objective", objective, OBJECTIVES)
        if objective != "elbo" and (beta != 1.0 or free_bits > 0):
            raise ValueError(f"beta and free_bits apply to objective='elbo' only, got objective={objective!r} with "
                             f"beta={beta}, free_bits={free_bits}")
    fused = None
    if head is not None:
        if not callable(getattr(head, "log_prob", None)):
            raise TypeError(f"head must be a vae_fast.nn.FusedHead (with .log_prob(h, x)), got {type(head).__name__}")
        head_kwargs = dict(head_kwargs or {})
        log_prob_fn = lambda features, data: head.log_prob(features, data, **head_kwargs)  # noqa: E731
    elif head_kwargs:
        raise ValueError("head_kwargs need a head")
    elif callable(likelihood):
        log_prob_fn = likelihood
    else:
        check_choice("likelihood", likelihood, LIKELIHOODS)
        log_prob_fn = LIKELIHOODS[likelihood]
        public, fused_fn = _FUSED.get(likelihood, (None, None))
        if objective == "elbo" and log_prob_fn is public:  # not re-registered by the user
            fused = fused_fn
    if not callable(decode):
        raise TypeError(f"decode must be callable (z -> decoder output), got {type(decode).__name__}")
    if not isinstance(mu, torch.Tensor):
        check_tensor("mu", mu)  # (raises, naming it)
    try:
        batch_mismatch = mu.dim() >= 1 and x.dim() >= 1 and mu.shape[0] != x.shape[0]
    except RuntimeError:  # a nested tensor's shape: the ops' checks name it
        batch_mismatch = False
    if batch_mismatch:
        raise ValueError(f"mu has batch size {mu.shape[0]} but x has {x.shape[0]}")

    # (B, Z), or (B, *latent) for convolutional latents: the KL sums over every non-batch dim
    z, kl, kl_per_dim = _latent_over(mu, logvar, prior_mu, prior_logvar, param, eps, generator, num_samples, True,
                                     dim=latent_kl_dims(mu))
    if objective == "iwae_dreg" and z.requires_grad:
        z_for_decoder = z.view(num_samples, *mu.shape) if num_samples == 1 else z
        # each sample's normalised importance weight, (K, B, 1, ...) against z's (K, B, *latent), in z's dtype:
        # filled in place below, once known, and read by the hook in backward (a tensor rather than a list that the
        # hook indexes: torch.compile(fullgraph=True) traces this one)
        dreg_weights = z.new_zeros((num_samples, mu.shape[0]) + (1,) * (mu.dim() - 1))
        z_for_decoder.register_hook(lambda grad: grad * dreg_weights)
    else:
        z_for_decoder = z
    # (a view only where the shape differs: every view is one more autograd node per step)
    decoded = decode(z_for_decoder if num_samples > 1 or z_for_decoder.shape == mu.shape
                     else z_for_decoder.view(mu.shape))
    if fused is not None:
        # d loss / d log p(x | z_k) for each row under the ELBO objective: -1/(B K) ("mean"), -1/K ("sum")
        batch = x.shape[0]
        upstream = {"mean": -1.0 / max(batch * num_samples, 1), "sum": -1.0 / num_samples}.get(reduction)
        log_lik = fused(decoded, x, upstream)
    else:
        log_lik = log_prob_fn(decoded, x)
    expected = (num_samples, x.shape[0]) if num_samples > 1 else (x.shape[0],)
    if not isinstance(log_lik, torch.Tensor) or tuple(log_lik.shape) != expected:
        got = tuple(log_lik.shape) if isinstance(log_lik, torch.Tensor) else type(log_lik).__name__
        raise ValueError(f"the likelihood of decode(z) must have shape {expected}, got {got}; "
                         "check that decode returns the likelihood's parameters with x's shape")
    if objective != "elbo":
        log_w = _importance_log_weights(log_lik, z_for_decoder, mu, logvar, prior_mu, prior_logvar, param,
                                        stop_q_params=objective == "iwae_dreg")
        if objective == "iwae_dreg" and z.requires_grad:
            normalised = torch.softmax(log_w.detach(), dim=0)  # (K, B)
            dreg_weights.copy_(normalised.view(dreg_weights.shape))
        iwae_loss = -(torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0]))
    if num_samples > 1:
        log_lik = log_lik.mean(0)

    if objective != "elbo":
        return ELBOResult(loss=reduce(iwae_loss, reduction), elbo=log_lik - kl, log_likelihood=log_lik, kl=kl,
                          kl_per_dim=kl_per_dim, z=z)
    if free_bits > 0:
        batch_mean_kl = kl_per_dim.mean(0, keepdim=True)
        kl_term = torch.where(batch_mean_kl >= free_bits, kl_per_dim,
                              torch.full_like(kl_per_dim, free_bits)).flatten(1).sum(-1)
    else:
        kl_term = kl
    # -(log_lik - beta * kl), written with one op fewer per step for the common beta = 1
    # (a - b is exactly -(b - a) in IEEE arithmetic)
    per_example_loss = (kl_term if beta == 1.0 else beta * kl_term) - log_lik
    return ELBOResult(
        loss=reduce(per_example_loss, reduction),
        elbo=log_lik - kl,
        log_likelihood=log_lik,
        kl=kl,
        kl_per_dim=kl_per_dim,
        z=z,
    )
