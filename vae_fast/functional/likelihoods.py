"""Reconstruction log-likelihoods, fused with their gradients (``ops/likelihood.py``).

Each public function checks its arguments and calls a private implementation that also takes
``expected_upstream``, the upstream gradient per row that :func:`vae_fast.elbo` knows exactly
(the public functions guess a negative log-likelihood loss, see ``_common.default_expected_upstream``).
"""
from __future__ import annotations

import math

import torch

from .._validation import STRIDED, check_broadcastable, check_same_device, check_tensor
from ..ops import likelihood as likelihood_ops
from ..ops._autograd import cached_scalar
from ..ops.codes import Likelihood
from ._common import check_x, default_expected_upstream, lead_ndim, reduce


def _is_common_call(theta, x) -> bool:
    """Plain dense tensors of one floating dtype, same shape with a batch dim, on the CPU: arguments every check
    below passes, tested in one expression (about 1 us instead of several checks' calls), for the calls the
    per-step path does not take (a per-pixel log-variance, a dtype without a step kernel)."""
    try:
        return (type(theta) is torch.Tensor and type(x) is torch.Tensor and theta.dtype == x.dtype
                and theta.is_floating_point() and theta.is_cpu and x.is_cpu and theta.layout is STRIDED
                and x.layout is STRIDED and theta.dim() > 0 and theta.shape == x.shape)
    except RuntimeError:  # a nested tensor's shape (see _validation.STRIDED)
        return False


def _elementwise(likelihood: Likelihood, theta_name: str, theta, x, logvar, reduction: str,
                 expected_upstream: float | None, scale_name: str | None = None) -> torch.Tensor:
    # scale_name None: a likelihood without a scale operand (logvar None). Else the Gaussian's / Laplace's scale
    # operand's name and logvar as the caller gave it: a number or a tensor, or None, an error raised below.
    # First the per-step call, which checks what it needs itself (a fixed scale given as a float reaches its kernel
    # as a number, an int too)
    if logvar is not None or scale_name is None:
        log_prob = likelihood_ops.elementwise_step(theta, x, logvar, likelihood, reduction, expected_upstream)
        if log_prob is not None:
            return log_prob if reduction == "none" else reduce(log_prob, reduction)
    if _is_common_call(theta, x):
        lead = 1
    else:
        check_tensor(theta_name, theta)
        check_x(x, theta_name, theta, differentiable=True)
        if x.requires_grad and not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor to differentiate w.r.t. it, got dtype {x.dtype}")
        lead = lead_ndim(theta_name, theta.shape, x.shape, "x's shape")
    if scale_name is not None:
        logvar = _scale_operand(scale_name, theta, logvar)  # (raises for None, naming it)
        check_broadcastable(scale_name, logvar, theta.shape, theta_name)
    if expected_upstream is None:
        expected_upstream = default_expected_upstream(reduction, math.prod(theta.shape[:lead]))
    log_prob = likelihood_ops.elementwise_log_prob(theta, x, logvar, likelihood, lead, expected_upstream)
    return log_prob if reduction == "none" else reduce(log_prob, reduction)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor, *, reduction: str = "none") -> torch.Tensor:
    """Bernoulli log-likelihood from logits, fused with its gradient.

    ``sum_j x_j l_j - softplus(l_j)`` over the event dims (x may hold grey values in [0, 1],
    like ``binary_cross_entropy_with_logits``; its gradient w.r.t. x is l). logits ``(B, ...)``
    or ``(K, B, ...)``, x ``(B, ...)``; returns ``(B,)`` or ``(K, B)`` for ``reduction="none"``.
    """
    return _elementwise(Likelihood.BERNOULLI, "logits", logits, x, None, reduction, None)


def _bernoulli(logits, x, reduction="none", expected_upstream=None):
    return _elementwise(Likelihood.BERNOULLI, "logits", logits, x, None, reduction, expected_upstream)


def continuous_bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor, *, reduction: str = "none") -> torch.Tensor:
    """Continuous Bernoulli log-likelihood (Loaiza-Ganem & Cunningham, 2019), normaliser included.

    Bernoulli term plus ``log C(lambda)``, ``C = l / tanh(l/2)`` in logits (a series near l = 0
    keeps it exact at lambda = 1/2). Shapes as :func:`bernoulli_log_prob`.
    """
    return _elementwise(Likelihood.CONTINUOUS_BERNOULLI, "logits", logits, x, None, reduction, None)


def _continuous_bernoulli(logits, x, reduction="none", expected_upstream=None):
    return _elementwise(Likelihood.CONTINUOUS_BERNOULLI, "logits", logits, x, None, reduction, expected_upstream)


def gaussian_log_prob(mean: torch.Tensor, x: torch.Tensor, logvar=0.0, *, reduction: str = "none") -> torch.Tensor:
    """Diagonal Gaussian log-likelihood ``-1/2 sum_j [log 2 pi + lv_j + (x_j - mean_j)^2 e^-lv_j]``.

    ``logvar``: a float (fixed), a 0-d tensor (learned scalar) or any tensor broadcastable to
    ``mean`` (per pixel, per example, a second decoder head); gradients flow to mean, logvar and
    x (in any combination of which require grad). With a fixed ``logvar = 0`` this is
    ``-1/2 ||x - mean||^2 - D/2 log 2 pi``: maximising it is minimising the summed squared error
    (MSE * D) — so an "MSE VAE" is a unit-variance Gaussian VAE, and a fixed variance s^2 weights
    the MSE by 1 / (2 s^2) against the KL.
    """
    return _elementwise(Likelihood.GAUSSIAN, "mean", mean, x, logvar, reduction, None, "logvar")


def _scale_operand(name: str, mean, value) -> torch.Tensor:
    """The Gaussian's / Laplace's scale operand as a tensor: a number (fixed) becomes a cached 0-d tensor of mean's
    dtype (the general path's kernels read tensors); a tensor is checked, not converted."""
    check_tensor("mean", mean)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = cached_scalar(float(value), mean.dtype, mean.device)
    check_tensor(name, value)
    check_same_device(("mean", name), (mean, value))
    return value


def _gaussian(mean, x, logvar=0.0, reduction="none", expected_upstream=None):
    return _elementwise(Likelihood.GAUSSIAN, "mean", mean, x, logvar, reduction, expected_upstream, "logvar")


def laplace_log_prob(mean: torch.Tensor, x: torch.Tensor, log_scale=0.0, *, reduction: str = "none") -> torch.Tensor:
    """Laplace log-likelihood ``-sum_j [log 2 + s_j + |x_j - mean_j| e^-s_j]``, scale b = e^s, fused with
    its gradients (d/dmean = sign(x - mean) e^-s, 0 where x = mean as for ``torch.abs``; d/ds = |x - mean| e^-s - 1).

    ``log_scale``: a float (fixed), a 0-d tensor (learned scalar) or any tensor broadcastable to
    ``mean`` (per pixel, per example, a second decoder head); gradients flow to mean, log_scale and x.
    The L1 reconstruction of the LDM / Stable Diffusion autoencoder, ``|x - mean| / e^lv + lv`` with
    its learned scalar ``lv`` (``LPIPSWithDiscriminator``'s ``nll_loss`` without the perceptual term),
    is exactly the Laplace NLL with ``log_scale = lv`` minus log 2 per element:
    ``(|x - mean| / e^lv + lv).sum(dims) == -laplace_log_prob(mean, x, lv) - D log 2``.
    Shapes as :func:`gaussian_log_prob`.
    """
    return _elementwise(Likelihood.LAPLACE, "mean", mean, x, log_scale, reduction, None, "log_scale")


def _laplace(mean, x, log_scale=0.0, reduction="none", expected_upstream=None):
    return _elementwise(Likelihood.LAPLACE, "mean", mean, x, log_scale, reduction, expected_upstream, "log_scale")


def mse_log_prob(mean: torch.Tensor, x: torch.Tensor, *, reduction: str = "none") -> torch.Tensor:
    """Negative per-example mean squared error ``-1/D sum_j (x_j - mean_j)^2``, fused with its gradient.

    The reconstruction term of "MSE + weighted KL" VAEs, number for number:
    ``-mse_log_prob(recons, x).mean() == F.mse_loss(recons, x)``, so
    ``elbo(x, mu, logvar, decode, likelihood="mse", beta=kld_weight).loss`` is AntixK PyTorch-VAE's
    ``F.mse_loss(recons, x) + kld_weight * kld_loss`` without its constant-free Gaussian detour
    (a unit-variance Gaussian differs by D/2 log 2 pi per example, which swamps a float32 loss).
    Shapes as :func:`gaussian_log_prob`; gradients flow to mean and x.
    """
    return _mse(mean, x, reduction, None)


def _mse(mean, x, reduction="none", expected_upstream=None):
    # (the kernel divides each row's sum by D itself: one op, as for the other likelihoods)
    return _elementwise(Likelihood.MEAN_SQUARED_ERROR, "mean", mean, x, None, reduction, expected_upstream)


def categorical_log_prob(logits: torch.Tensor, x: torch.Tensor, *, reduction: str = "none") -> torch.Tensor:
    """Categorical log-likelihood per example, e.g. 256-way 8-bit pixels.

    logits ``(B, *pixels, C)`` or ``(K, B, *pixels, C)``; integer ``x`` ``(B, *pixels)`` in [0, C).
    log-softmax over the last dim is never materialised; its gradient is written in the same pass.
    """
    return _categorical(logits, x, reduction, None)


def _categorical(logits, x, reduction="none", expected_upstream=None):
    log_prob = likelihood_ops.categorical_step(logits, x, reduction, expected_upstream)  # (checks what it needs)
    if log_prob is not None:
        return log_prob if reduction == "none" else reduce(log_prob, reduction)
    check_tensor("logits", logits)
    check_x(x, "logits", logits, differentiable=False)
    if x.is_floating_point() or x.dtype == torch.bool:
        raise TypeError(f"x must be an integer tensor of class indices, got dtype {x.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (B, ..., C), got {tuple(logits.shape)}")
    lead = lead_ndim("logits", logits.shape[:-1], x.shape, "x's shape followed by C:")
    if expected_upstream is None:
        expected_upstream = default_expected_upstream(reduction, math.prod(logits.shape[:lead]))
    return reduce(likelihood_ops.categorical_log_prob(logits, x, lead, expected_upstream), reduction)
