"""Discretised logistic mixture likelihood (PixelCNN++, NVAE, VDVAE), fused (``ops/dmol.py``)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._validation import STRIDED, check_positive_int, check_same_device, check_same_dtype, check_tensor
from ..ops import dmol as dmol_ops
from ..ops.dmol import packed_views
from ._common import check_x, default_expected_upstream, reduce


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
    check_x(x, name, like, differentiable=False)
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
    return _dmol_split(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, reduction, None)


def _dmol_split(x, logit_probs, means, log_scales, coeffs=None, num_bits=8, log_scale_min=-7.0, reduction="none",
                expected_upstream=None):
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
    if expected_upstream is None:
        expected_upstream = default_expected_upstream(reduction, rows)
    log_prob = dmol_ops.dmol_log_prob(
        x.reshape(batch, channels, pixels), logit_probs.reshape(rows, mixtures, pixels),
        means.reshape(rows, channels, mixtures, pixels), log_scales.reshape(rows, channels, mixtures, pixels),
        None if coeffs is None else coeffs.reshape(rows, channels, mixtures, pixels), int(num_bits),
        float(log_scale_min), expected_upstream)
    return reduce(log_prob.reshape(lead_shape), reduction)


def dmol_packed_log_prob(
    x: torch.Tensor,
    params: torch.Tensor,
    num_mixtures: int | None = None,
    *,
    num_bits: int = 8,
    log_scale_min: float = -7.0,
    reduction: str = "none",
) -> torch.Tensor:
    """:func:`discretized_logistic_mixture_log_prob` of a packed decoder output, read in place.

    ``params`` ``(B, P, H, W)`` or ``(K, B, P, H, W)`` in the layout of :func:`dmol_from_packed`
    (coefficients raw: tanh is applied inside the kernel); ``num_mixtures`` defaults to the
    one that P implies for x's channel count. The gradient is written in params' layout, so
    no slices, copies or tanh of the parameters are materialised in forward or backward.
    """
    return _dmol_packed(x, params, num_mixtures, num_bits, log_scale_min, reduction, None)


def _step_mixtures(x, params, num_mixtures, num_bits, log_scale_min) -> int:
    """M for the per-step call of :func:`_dmol_packed` — plain CPU tensors of one floating dtype, x (B, C, *pixels)
    without grad, params (B, M * per-mixture channels, *pixels), valid num_bits and log_scale_min: every check
    of the general path passes — tested in one expression; else 0."""
    # (each shape read once: a .shape costs 0.1 us)
    try:
        if not (type(params) is torch.Tensor and type(x) is torch.Tensor and params.dtype == x.dtype and params.is_cpu
                and x.is_cpu and params.layout is STRIDED and x.layout is STRIDED and params.is_floating_point()
                and (ndim := x.dim()) >= 2 and params.dim() == ndim
                and (shape := x.shape)[0] == (packed := params.shape)[0] and packed[2:] == shape[2:]
                and not x.requires_grad and type(num_bits) is int and 1 <= num_bits <= 30
                and type(log_scale_min) is float and -math.inf <= log_scale_min < math.inf):
            return 0
    except RuntimeError:  # a nested tensor's shape (see _validation.STRIDED)
        return 0
    per_mixture = _dmol_packed_channels(1, shape[1])
    if num_mixtures is None:
        return packed[1] // per_mixture if packed[1] % per_mixture == 0 else 0
    if type(num_mixtures) is int and num_mixtures > 0 and packed[1] == num_mixtures * per_mixture:
        return num_mixtures
    return 0


def _dmol_packed(x, params, num_mixtures=None, num_bits=8, log_scale_min=-7.0, reduction="none",
                 expected_upstream=None):
    mixtures = _step_mixtures(x, params, num_mixtures, num_bits, log_scale_min)
    if mixtures:
        if expected_upstream is None:
            expected_upstream = default_expected_upstream(reduction, x.shape[0])
        log_prob = dmol_ops.dmol_packed_step(x, params, mixtures, num_bits, log_scale_min, expected_upstream)
        if log_prob is not None:
            return log_prob if reduction == "none" else reduce(log_prob, reduction)
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
    if expected_upstream is None:
        expected_upstream = default_expected_upstream(reduction, rows)
    log_prob = dmol_ops.dmol_packed_log_prob(
        x.reshape(batch, channels, pixels), params.reshape(rows, expected, pixels), num_mixtures, int(num_bits),
        float(log_scale_min), expected_upstream)
    return reduce(log_prob.reshape(params.shape[:lead]), reduction)


