"""Functional API: the fused latent and reconstruction ops, and the ELBO assembled from them.

Shapes: the encoder gives ``mu``, ``logvar`` of shape ``(*B, Z)``; the decoder output
has the data's shape ``(B, *event)``, or ``(K, B, *event)`` for K latent samples.
Log-likelihoods are summed over every event dim.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from . import ops  # noqa: F401  (registers torch.ops.vae_fast)
from ._validation import (
    check_broadcastable,
    check_choice,
    check_no_grad,
    check_positive_int,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from .ops._library import ELEMENTWISE_LIKELIHOODS, SCALE_PARAMS
from .ops.latent import LatentFunction
from .ops.dmol import DmolLogProb, DmolPackedLogProb, packed_views
from .ops.likelihood import CategoricalLogProb, ElementwiseLogProb

REDUCTIONS = ("none", "sum", "mean")

# --------------------------------------------------------------------------------------
# Latent block
# --------------------------------------------------------------------------------------


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
    z, kl, kl_per_dim, log_ratio = LatentFunction.apply(
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


# --------------------------------------------------------------------------------------
# Reconstruction log-likelihoods
# --------------------------------------------------------------------------------------


def _expected_grad(reduction: str, rows: int, given: float | None) -> float:
    """The upstream gradient each row's log-likelihood most likely receives: log-likelihoods are
    maximised, so the guess is a negative log-likelihood loss, ``-log_p.mean()`` (-1/N per row; also
    for reduction="none") or ``-log_p.sum()`` (-1). The kernels pre-scale their gradients by it, so
    that backward makes no pass over the gradient when the guess holds; any other upstream costs
    the usual scaling pass (see ops/likelihood.py)."""
    if given is not None:
        return given
    return -1.0 if reduction == "sum" or rows == 0 else -1.0 / rows


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    check_choice("reduction", reduction, REDUCTIONS)
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    return values


def _lead_ndim(name: str, param_shape, x_shape, what: str) -> int:
    """1 if the decoder output matches x (B, ...), 2 if it has an extra leading sample dim K."""
    if tuple(param_shape) == tuple(x_shape):
        return 1
    if len(param_shape) == len(x_shape) + 1 and tuple(param_shape[1:]) == tuple(x_shape):
        return 2
    raise ValueError(f"{name} of shape {tuple(param_shape)} must have {what} (B, ...) = {tuple(x_shape)} "
                     f"or (K, B, ...) for K decoder samples")


def _check_x(x, theta_name: str, theta: torch.Tensor) -> None:
    check_tensor("x", x, floating=False)
    if x.dim() < 1:
        raise ValueError(f"x must have a leading batch dim, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"x must be real, got dtype {x.dtype}")
    check_no_grad("x", x)
    check_same_device((theta_name, "x"), (theta, x))


def _elementwise(likelihood: str, theta_name: str, theta, x, logvar, reduction: str,
                 expected_grad: float | None = None) -> torch.Tensor:
    check_tensor(theta_name, theta)
    _check_x(x, theta_name, x if theta is None else theta)
    lead_ndim = _lead_ndim(theta_name, theta.shape, x.shape, "x's shape")
    rows = math.prod(theta.shape[:lead_ndim])
    dim = math.prod(x.shape[1:])
    if logvar is not None:
        check_broadcastable("logvar", logvar, theta.shape, theta_name)
    log_prob = ElementwiseLogProb.apply(
        theta.reshape(rows, dim), x.reshape(x.shape[0], dim), logvar, ELEMENTWISE_LIKELIHOODS[likelihood],
        theta.shape, lead_ndim, _expected_grad(reduction, rows, expected_grad),
    )
    return _reduce(log_prob.reshape(theta.shape[:lead_ndim]), reduction)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor, *, reduction: str = "none",
                       _expected_upstream: float | None = None) -> torch.Tensor:
    """Bernoulli log-likelihood from logits, fused with its gradient.

    ``sum_j x_j l_j - softplus(l_j)`` over the event dims (x may hold grey values in [0, 1],
    like ``binary_cross_entropy_with_logits``). logits ``(B, ...)`` or ``(K, B, ...)``, x ``(B, ...)``;
    returns ``(B,)`` or ``(K, B)`` for ``reduction="none"``.
    """
    return _elementwise("bernoulli", "logits", logits, x, None, reduction, _expected_upstream)


def continuous_bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor, *, reduction: str = "none",
                                  _expected_upstream: float | None = None) -> torch.Tensor:
    """Continuous Bernoulli log-likelihood (Loaiza-Ganem & Cunningham, 2019), normaliser included.

    Bernoulli term plus ``log C(lambda)``, ``C = l / tanh(l/2)`` in logits (a series near l = 0
    keeps it exact at lambda = 1/2). Shapes as :func:`bernoulli_log_prob`.
    """
    return _elementwise("continuous_bernoulli", "logits", logits, x, None, reduction, _expected_upstream)


def gaussian_log_prob(mean: torch.Tensor, x: torch.Tensor, logvar=0.0, *, reduction: str = "none",
                      _expected_upstream: float | None = None) -> torch.Tensor:
    """Diagonal Gaussian log-likelihood ``-1/2 sum_j [log 2 pi + lv_j + (x_j - mean_j)^2 e^-lv_j]``.

    ``logvar``: a float (fixed), a 0-d tensor (learned scalar) or any tensor broadcastable to
    ``mean`` (per pixel, per example, a second decoder head); gradients flow to mean and logvar.
    With a fixed ``logvar = 0`` this is ``-1/2 ||x - mean||^2 - D/2 log 2 pi``: maximising it is
    minimising the summed squared error (MSE * D) — so an "MSE VAE" is a unit-variance Gaussian
    VAE, and a fixed variance s^2 weights the MSE by 1 / (2 s^2) against the KL.
    """
    check_tensor("mean", mean)
    if isinstance(logvar, (int, float)) and not isinstance(logvar, bool):
        logvar = torch.tensor(float(logvar), dtype=mean.dtype, device=mean.device)
    check_tensor("logvar", logvar)
    check_same_device(("mean", "logvar"), (mean, logvar))
    return _elementwise("gaussian", "mean", mean, x, logvar, reduction, _expected_upstream)


def categorical_log_prob(logits: torch.Tensor, x: torch.Tensor, *, reduction: str = "none",
                         _expected_upstream: float | None = None) -> torch.Tensor:
    """Categorical log-likelihood per example, e.g. 256-way 8-bit pixels.

    logits ``(B, *pixels, C)`` or ``(K, B, *pixels, C)``; integer ``x`` ``(B, *pixels)`` in [0, C).
    log-softmax over the last dim is never materialised; its gradient is written in the same pass.
    """
    check_tensor("logits", logits)
    _check_x(x, "logits", logits)
    if x.is_floating_point() or x.dtype == torch.bool:
        raise TypeError(f"x must be an integer tensor of class indices, got dtype {x.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (B, ..., C), got {tuple(logits.shape)}")
    lead_ndim = _lead_ndim("logits", logits.shape[:-1], x.shape, "x's shape followed by C:")
    rows = math.prod(logits.shape[:lead_ndim])
    pixels = math.prod(x.shape[1:])
    log_prob = CategoricalLogProb.apply(logits.reshape(rows, pixels, logits.shape[-1]), x.reshape(x.shape[0], pixels),
                                        _expected_grad(reduction, rows, _expected_upstream))
    return _reduce(log_prob.reshape(logits.shape[:lead_ndim]), reduction)


# --------------------------------------------------------------------------------------
# Discretised logistic mixture (PixelCNN++, NVAE, VDVAE)
# --------------------------------------------------------------------------------------


class DMOLParams(NamedTuple):
    """The arguments of :func:`discretized_logistic_mixture_log_prob` split from a packed decoder
    output by :func:`dmol_from_packed`: logit_probs ``(B, M, H, W)``; means, log_scales
    ``(B, C, M, H, W)``; coeffs ``(B, 3, M, H, W)`` (tanh applied) or None."""

    logit_probs: torch.Tensor
    means: torch.Tensor
    log_scales: torch.Tensor
    coeffs: torch.Tensor | None


def _dmol_packed_channels(num_mixtures: int, channels: int) -> int:
    return num_mixtures + channels * (3 if channels == 3 else 2) * num_mixtures


def dmol_from_packed(params: torch.Tensor, num_mixtures: int, channels: int) -> DMOLParams:
    """Split a packed PixelCNN++ / NVAE decoder output into :class:`DMOLParams`.

    ``params`` ``(B, P, H, W)`` (or ``(K, B, P, H, W)``), channels first, with
    ``P = M + C * 3M`` for C = 3 and ``P = M + C * 2M`` otherwise, laid out as NVAE's
    ``DiscMixLogistic`` and PixelCNN++'s loss read it: the M mixture logits, then per channel
    M means, M log-scales and (3 channels) M coefficients, which are squashed with tanh here.
    PixelCNN++'s channels-last output ``(B, H, W, P)`` is ``params.permute(0, 3, 1, 2)``.
    log-scales are returned unclamped: the likelihood clamps them.
    The returned tensors are views (coeffs: a new tanh tensor); for the fastest path give the
    packed tensor itself to :func:`dmol_packed_log_prob` or ``elbo(likelihood="dmol")``, which
    read it in place and write its gradient in the same layout.
    """
    check_tensor("params", params)
    check_positive_int("num_mixtures", num_mixtures)
    check_positive_int("channels", channels)
    expected = _dmol_packed_channels(num_mixtures, channels)
    if params.dim() not in (4, 5) or params.shape[-3] != expected:
        raise ValueError(f"params must have shape (B, {expected}, H, W) (or (K, B, {expected}, H, W)) for "
                         f"num_mixtures={num_mixtures}, channels={channels}, got {tuple(params.shape)}")
    lead, spatial = params.shape[:-3], params.shape[-2:]
    flat = params.reshape(-1, expected, spatial[0] * spatial[1])
    logits, means, log_scales, coeffs = packed_views(flat, num_mixtures, channels)
    m = num_mixtures
    return DMOLParams(
        logit_probs=logits.reshape(*lead, m, *spatial),
        means=means.reshape(*lead, channels, m, *spatial),
        log_scales=log_scales.reshape(*lead, channels, m, *spatial),
        coeffs=None if coeffs is None else torch.tanh(coeffs.reshape(*lead, channels, m, *spatial)),
    )


def _check_dmol_x(x: torch.Tensor, like: torch.Tensor, name: str, num_bits) -> None:
    _check_x(x, name, like)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor in [-1, 1] (8-bit pixel p as p / 127.5 - 1), "
                        f"got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, C, *pixels), got {tuple(x.shape)}")
    check_positive_int("num_bits", num_bits)
    if num_bits > 30:
        raise ValueError(f"num_bits must be in [1, 30], got {num_bits}")


def _check_log_scale_min(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"log_scale_min must be a float (or -inf to disable the clamp), got {type(value).__name__}")
    if value != value or value == math.inf:
        raise ValueError(f"log_scale_min must be a finite float or -inf, got {value}")


def _dmol_lead_ndim(name: str, shape, expected_tail, x_batch: int) -> int:
    for lead in (1, 2):
        if len(shape) == lead + len(expected_tail) and tuple(shape[lead:]) == tuple(expected_tail) and \
                shape[lead - 1] == x_batch:
            return lead
    raise ValueError(f"{name} must have shape (B, {', '.join(map(str, expected_tail))}) or (K, B, ...) with "
                     f"B = {x_batch} (x's batch size), got {tuple(shape)}")


def discretized_logistic_mixture_log_prob(
    x: torch.Tensor,
    logit_probs: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    coeffs: torch.Tensor | None = None,
    *,
    num_bits: int = 8,
    log_scale_min: float = -7.0,
    reduction: str = "none",
    _expected_upstream: float | None = None,
) -> torch.Tensor:
    """Discretised mixture of logistics (PixelCNN++, Salimans et al. 2017), fused with its gradient.

    ``log p(x) = sum_pixels log sum_m pi_m prod_c [sigmoid((x_c - mu_cm + h) / s_cm) - sigmoid((x_c - mu_cm - h) / s_cm)]``
    with ``pi = softmax(logit_probs)``, ``log s = max(log_scales, log_scale_min)`` (PixelCNN++'s
    clamp; pass ``-inf`` to disable it), half bin width ``h = 1 / (2^num_bits - 1)`` and the
    first and last bins extended to -inf / +inf. The bin mass is computed exactly as
    ``log sigmoid(p) + log sigmoid(-q) + log(1 - e^(q - p))`` (no density fallback in the tails).

    Args:
        x: ``(B, C, H, W)`` (any number of pixel dims) in [-1, 1]: 8-bit pixel p is ``p / 127.5 - 1``.
        logit_probs: ``(B, M, H, W)``, mixture logits shared by the channels.
        means, log_scales: ``(B, C, M, H, W)``.
        coeffs: ``(B, 3, M, H, W)`` for C = 3: channel means depend on earlier channels,
            ``mu_g += c0 x_r``, ``mu_b += c1 x_r + c2 x_g`` (coefficients as given, e.g. already
            tanh-squashed); None for independent channels (any C).
        All parameters may carry a leading K (decoder samples): ``(K, B, ...)``.

    Returns:
        ``(B,)`` (or ``(K, B)``) log-likelihoods in nats for ``reduction="none"``.

    One pass over the parameters writes the log-likelihood and the gradients of all four
    parameter tensors; only those gradients are saved for backward (no mixture-sized temporaries).
    """
    for name, t in (("logit_probs", logit_probs), ("means", means), ("log_scales", log_scales)):
        check_tensor(name, t)
    _check_dmol_x(x, means, "means", num_bits)
    batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    if means.dim() < 3 + len(spatial):
        raise ValueError(f"means must have shape (B, C, M, *pixels) with x's pixel dims, got {tuple(means.shape)}")
    mixtures = means.shape[means.dim() - len(spatial) - 1]
    lead = _dmol_lead_ndim("means", means.shape, (channels, mixtures, *spatial), batch)
    lead_shape = means.shape[:lead]
    if tuple(log_scales.shape) != tuple(means.shape):
        raise ValueError(f"log_scales must have means' shape {tuple(means.shape)}, got {tuple(log_scales.shape)}")
    if tuple(logit_probs.shape) != (*lead_shape, mixtures, *spatial):
        raise ValueError(f"logit_probs must have shape {(*lead_shape, mixtures, *spatial)} (means' (..., M, *pixels) "
                         f"without C), got {tuple(logit_probs.shape)}")
    if coeffs is not None:
        check_tensor("coeffs", coeffs)
        if channels != 3:
            raise ValueError(f"coeffs couple the 3 channels of an RGB image; x has {channels} channels (pass coeffs=None)")
        if tuple(coeffs.shape) != tuple(means.shape):
            raise ValueError(f"coeffs must have means' shape {tuple(means.shape)}, got {tuple(coeffs.shape)}")
    names = ("logit_probs", "means", "log_scales", "coeffs")
    tensors = (logit_probs, means, log_scales, coeffs)
    check_same_device(("x", *names), (x, *tensors))
    check_same_dtype(names, tensors)
    _check_log_scale_min(log_scale_min)
    rows, pixels = math.prod(lead_shape), math.prod(spatial)
    log_prob = DmolLogProb.apply(
        x.reshape(batch, channels, pixels), logit_probs.reshape(rows, mixtures, pixels),
        means.reshape(rows, channels, mixtures, pixels), log_scales.reshape(rows, channels, mixtures, pixels),
        None if coeffs is None else coeffs.reshape(rows, channels, mixtures, pixels), int(num_bits),
        float(log_scale_min), _expected_grad(reduction, rows, _expected_upstream))
    return _reduce(log_prob.reshape(lead_shape), reduction)


def dmol_packed_log_prob(
    x: torch.Tensor,
    params: torch.Tensor,
    num_mixtures: int | None = None,
    *,
    num_bits: int = 8,
    log_scale_min: float = -7.0,
    reduction: str = "none",
    _expected_upstream: float | None = None,
) -> torch.Tensor:
    """:func:`discretized_logistic_mixture_log_prob` of a packed decoder output, read in place.

    ``params`` ``(B, P, H, W)`` or ``(K, B, P, H, W)`` in the layout of :func:`dmol_from_packed`
    (coefficients raw: tanh is applied inside the kernel); ``num_mixtures`` defaults to the
    one that P implies for x's channel count. The gradient is written in params' layout, so
    no slices, copies or tanh of the parameters are materialised in forward or backward.
    """
    check_tensor("params", params)
    _check_dmol_x(x, params, "params", num_bits)
    batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    per_mixture = _dmol_packed_channels(1, channels)
    if num_mixtures is None:
        packed = params.shape[params.dim() - len(spatial) - 1] if params.dim() > len(spatial) else 0
        if packed % per_mixture or packed == 0:
            raise ValueError(f"params must have shape (B, M * {per_mixture}, *pixels) for x's {channels} channels "
                             f"(M logits, then per channel M means, M log-scales{', M coefficients' if channels == 3 else ''}), "
                             f"got {tuple(params.shape)}")
        num_mixtures = packed // per_mixture
    check_positive_int("num_mixtures", num_mixtures)
    expected = _dmol_packed_channels(num_mixtures, channels)
    lead = _dmol_lead_ndim("params", params.shape, (expected, *spatial), batch)
    _check_log_scale_min(log_scale_min)
    rows, pixels = math.prod(params.shape[:lead]), math.prod(spatial)
    log_prob = DmolPackedLogProb.apply(
        x.reshape(batch, channels, pixels), params.reshape(rows, expected, pixels), num_mixtures, int(num_bits),
        float(log_scale_min), _expected_grad(reduction, rows, _expected_upstream))
    return _reduce(log_prob.reshape(params.shape[:lead]), reduction)


# --------------------------------------------------------------------------------------
# ELBO
# --------------------------------------------------------------------------------------

LikelihoodFn = Callable[[object, torch.Tensor], torch.Tensor]
LIKELIHOODS: dict[str, LikelihoodFn] = {}


def register_likelihood(name: str):
    """Decorator: make ``fn(decoder_output, x) -> log p(x | z)`` of shape ``(B,)`` or ``(K, B)``
    available as ``elbo(..., likelihood=name)``."""

    def decorate(fn: LikelihoodFn) -> LikelihoodFn:
        LIKELIHOODS[name] = fn
        return fn

    return decorate


# The built-in likelihoods take the upstream gradient elbo() expects for each row, so that their
# kernels can pre-scale the gradient and backward can skip its scaling pass.
def _builtin_likelihood(name: str):
    def decorate(fn):
        fn.takes_expected_upstream = True
        return register_likelihood(name)(fn)

    return decorate


@_builtin_likelihood("bernoulli")
def _bernoulli(logits, x, expected_upstream=None):
    return bernoulli_log_prob(logits, x, _expected_upstream=expected_upstream)


@_builtin_likelihood("continuous_bernoulli")
def _continuous_bernoulli(logits, x, expected_upstream=None):
    return continuous_bernoulli_log_prob(logits, x, _expected_upstream=expected_upstream)


@_builtin_likelihood("gaussian")
def _gaussian(output, x, expected_upstream=None):
    mean, logvar = output if isinstance(output, (tuple, list)) else (output, 0.0)
    return gaussian_log_prob(mean, x, logvar, _expected_upstream=expected_upstream)


@_builtin_likelihood("categorical")
def _categorical(logits, x, expected_upstream=None):
    return categorical_log_prob(logits, x, _expected_upstream=expected_upstream)


@_builtin_likelihood("dmol")
def _dmol(output, x, expected_upstream=None):
    # a packed decoder output (read in place) or (logit_probs, means, log_scales[, coeffs])
    if isinstance(output, torch.Tensor):
        return dmol_packed_log_prob(x, output, _expected_upstream=expected_upstream)
    return discretized_logistic_mixture_log_prob(x, *output, _expected_upstream=expected_upstream)


class ELBOResult(NamedTuple):
    """What :func:`elbo` returns.

    loss: the quantity to minimise, ``-(log_likelihood - beta * KL)`` with free bits, reduced.
    elbo: ``(B,)`` the true per-example ELBO ``log_likelihood - kl`` (never altered by beta or free bits).
    log_likelihood: ``(B,)`` E_q[log p(x|z)], averaged over the K samples.
    kl: ``(B,)``; kl_per_dim: ``(B, Z)``; z: ``(B, Z)`` or ``(K, B, Z)``.
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
    from .reference import gaussian_log_density, logvar_from_scale

    log_lik = log_lik if log_lik.dim() == 2 else log_lik.unsqueeze(0)
    lv = logvar_from_scale(scale, param)
    q_mu, q_lv = (mu.detach(), lv.detach()) if stop_q_params else (mu, lv)
    p_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu
    p_lv = torch.zeros_like(mu) if prior_logvar is None else prior_logvar
    return log_lik + gaussian_log_density(z, p_mu, p_lv) - gaussian_log_density(z, q_mu, q_lv)


def _check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
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
) -> ELBOResult:
    """The VAE objective on fused kernels: ``ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z))``.

    Args:
        x: data ``(B, ...)``.
        mu, logvar: encoder outputs ``(B, Z)`` (``logvar`` read as ``param``).
        decode: callable ``z -> decoder output``: logits for ``"bernoulli"``,
            ``"continuous_bernoulli"`` and ``"categorical"``; the mean or ``(mean, logvar)`` for
            ``"gaussian"``; for ``"dmol"`` the packed PixelCNN++/NVAE tensor (see
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
    """
    check_tensor("x", x, floating=False)
    check_positive_int("num_samples", num_samples)
    beta = _check_nonnegative("beta", beta)
    free_bits = _check_nonnegative("free_bits", free_bits)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("objective", objective, OBJECTIVES)
    if objective != "elbo" and (beta != 1.0 or free_bits > 0):
        raise ValueError(f"beta and free_bits apply to objective='elbo' only, got objective={objective!r} with "
                         f"beta={beta}, free_bits={free_bits}")
    if callable(likelihood):
        log_prob_fn = likelihood
    else:
        check_choice("likelihood", likelihood, LIKELIHOODS)
        log_prob_fn = LIKELIHOODS[likelihood]
    if not callable(decode):
        raise TypeError(f"decode must be callable (z -> decoder output), got {type(decode).__name__}")
    if mu.dim() >= 1 and x.dim() >= 1 and mu.shape[0] != x.shape[0]:
        raise ValueError(f"mu has batch size {mu.shape[0]} but x has {x.shape[0]}")

    z, kl, kl_per_dim = _latent(mu, logvar, prior_mu, prior_logvar, param, eps, generator, num_samples, True)
    if objective == "iwae_dreg" and z.requires_grad:
        z_for_decoder = z.view(num_samples, *mu.shape) if num_samples == 1 else z
        dreg_weights = []  # filled below, once the importance weights are known
        z_for_decoder.register_hook(lambda grad: grad * dreg_weights[0])
    else:
        z_for_decoder = z
    decoded = decode(z_for_decoder if num_samples > 1 else z_for_decoder.view(mu.shape))
    if getattr(log_prob_fn, "takes_expected_upstream", False):
        # d loss / d log p(x | z_k) for each row under the ELBO objective: -1/(B K) ("mean"), -1/K ("sum")
        batch = x.shape[0]
        upstream = {"mean": -1.0 / max(batch * num_samples, 1), "sum": -1.0 / num_samples}.get(reduction)
        log_lik = log_prob_fn(decoded, x, upstream if objective == "elbo" else None)
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
            dreg_weights.append(normalised.unsqueeze(-1))
        iwae_loss = -(torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0]))
    if num_samples > 1:
        log_lik = log_lik.mean(0)

    if objective != "elbo":
        return ELBOResult(loss=_reduce(iwae_loss, reduction), elbo=log_lik - kl, log_likelihood=log_lik, kl=kl,
                          kl_per_dim=kl_per_dim, z=z)
    if free_bits > 0:
        batch_mean_kl = kl_per_dim.mean(0, keepdim=True)
        kl_term = torch.where(batch_mean_kl >= free_bits, kl_per_dim, torch.full_like(kl_per_dim, free_bits)).sum(-1)
    else:
        kl_term = kl
    per_example_loss = -(log_lik - beta * kl_term)
    return ELBOResult(
        loss=_reduce(per_example_loss, reduction),
        elbo=log_lik - kl,
        log_likelihood=log_lik,
        kl=kl,
        kl_per_dim=kl_per_dim,
        z=z,
    )
