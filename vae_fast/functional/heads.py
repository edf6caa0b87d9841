"""Fused decoder heads: ``log p(x | F.linear(h, weight, bias))`` without the head's output in memory
(``ops/head.py``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_positive_int, check_same_device, check_tensor, raise_if_invalid
from ..ops import head as head_ops
from ..ops import likelihood as likelihood_ops
from ..ops.codes import Likelihood
from ._common import check_x, default_expected_upstream, reduce

# likelihood name -> (kernel code, the keyword naming its scale operand or None)
HEAD_LIKELIHOODS = {
    "bernoulli": (int(Likelihood.BERNOULLI), None),
    "continuous_bernoulli": (int(Likelihood.CONTINUOUS_BERNOULLI), None),
    "gaussian": (int(Likelihood.GAUSSIAN), "logvar"),
    "laplace": (int(Likelihood.LAPLACE), "log_scale"),
    "categorical": (head_ops.CATEGORICAL, None),
    "dmol": (head_ops.DMOL, None),
}
_DMOL_KWARGS = {"num_mixtures", "num_bits", "log_scale_min"}


def _scale_frame(name: str, value, out_shape, channel_dim: int, lead: int, dtype, device) -> torch.Tensor:
    """The Gaussian logvar / Laplace log_scale (broadcastable to the head's output) as an
    (Nl, Pl, Ol) tensor in the op's (example, position, channel) frame, each dim 1 or full."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor(float(value), dtype=dtype, device=device)
    check_tensor(name, value)
    if value.device != torch.device(device):
        raise ValueError(f"{name} is on {value.device} but h is on {device}; move them to one device")
    ndim = len(out_shape)
    shape = (1,) * (ndim - value.dim()) + tuple(value.shape)
    try:
        ok = value.dim() <= ndim and torch.broadcast_shapes(shape, tuple(out_shape)) == tuple(out_shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(value.shape)} must broadcast to the head's output {tuple(out_shape)}")
    view = value.reshape(shape).movedim(channel_dim, -1)
    out_last = tuple(out_shape[:channel_dim]) + tuple(out_shape[channel_dim + 1:])
    frame = []
    for dims, full in ((view.shape[:lead], out_last[:lead]), (view.shape[lead:-1], out_last[lead:])):
        if all(d == 1 for d in dims):
            frame.append(1)
        elif tuple(dims) == tuple(full):
            frame.append(math.prod(full))
        else:
            raise ValueError(
                f"{name} of shape {tuple(value.shape)}: the fused head takes a {name} that is constant or full "
                "along the example dims, and constant or full along the pixel dims (a scalar, per channel, per "
                "pixel, per example, or the output's own shape)")
    return view.reshape(frame[0], frame[1], view.shape[-1])


def _step(h, weight, bias, x, likelihood, channel_dim, reduction, max_chunk_bytes, likelihood_kwargs):
    """:func:`vae_fast.ops.head.linear_step` for a Linear head over h's last dim with an elementwise likelihood (its
    scale, if any, a number) or the categorical, and no sample dim: None for any other call, or one the step does
    not take (the caller then checks the arguments and takes the chunked op)."""
    entry = HEAD_LIKELIHOODS.get(likelihood) if type(likelihood) is str else None
    if (entry is None or entry[0] == head_ops.DMOL or type(channel_dim) is not int
            or not (channel_dim == -1 or channel_dim == h.dim() - 1)
            or not (max_chunk_bytes is None or (type(max_chunk_bytes) is int and max_chunk_bytes > 0))):
        return None
    code, scale_name = entry
    scale = None
    if likelihood_kwargs:
        if scale_name is None or len(likelihood_kwargs) > 1 or type(scale := likelihood_kwargs.get(scale_name)) not in (
                float, int):
            return None
        scale = float(scale)
    elif scale_name is not None:
        scale = 0.0  # (the default log-variance / log-scale)
    return head_ops.linear_step(h, weight, bias, x, code, scale, reduction, max_chunk_bytes)


def linear_log_prob(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, *,
                    likelihood: str, channel_dim: int = -1, reduction: str = "none",
                    max_chunk_bytes: int | None = None, **likelihood_kwargs) -> torch.Tensor:
    """``log p(x | F.linear(h, weight, bias))`` summed per example, the head's output never held in full.

    channel_dim = -1: a Linear over h's last dim, h ``(B, *, H)`` (or ``(K, B, *, H)``), weight ``(O, H)``;
    the output ``(B, *, O)`` holds the likelihood's parameters for x ``(B, *, O)`` (categorical: logits
    ``(B, *pixels, K)`` for integer x ``(B, *pixels)``). channel_dim = 1: a 1x1 conv over channels-first
    h ``(B, H, *pixels)``, weight ``(O, H)`` or ``(O, H, 1, 1)``, output ``(B, O, *pixels)`` (categorical:
    logits ``(B, K, *pixels)`` as for ``F.cross_entropy``).

    Likelihoods: ``"bernoulli"``, ``"continuous_bernoulli"``, ``"gaussian"`` (``logvar=`` float or a
    tensor broadcastable to the output), ``"laplace"`` (``log_scale=``), ``"categorical"``. The output is
    produced, scored and differentiated in chunks of at most ``max_chunk_bytes`` per buffer (default: 1 MiB, or
    1024 rows of the output if that is more, up to 8 MiB, as smaller GEMMs run slower; 2 MiB for ``"dmol"``, one
    64x64 example's 100 channels); d/dh, d/dweight (accumulated in float32) and d/dbias are computed in the same
    pass. Under torch.compile a head whose output fits one chunk is traced as F.linear and the likelihood's own
    function (the op's backward would recompute every chunk there: it cannot read the upstream on the host).

    Returns ``(B,)`` (``(K, B)`` with samples) for ``reduction="none"``, else reduced.
    """
    log_prob = _step(h, weight, bias, x, likelihood, channel_dim, reduction, max_chunk_bytes, likelihood_kwargs)
    if log_prob is not None:
        return reduce(log_prob, reduction)
    check_choice("likelihood", likelihood, HEAD_LIKELIHOODS)
    code, scale_name = HEAD_LIKELIHOODS[likelihood]
    allowed = ({scale_name} if scale_name else set()) | (_DMOL_KWARGS if code == head_ops.DMOL else set())
    unknown = set(likelihood_kwargs) - allowed
    if unknown:
        raise TypeError(f"linear_log_prob: unexpected keyword arguments {sorted(unknown)} for likelihood "
                        f"{likelihood!r}" + (f" (it takes {sorted(allowed)})" if allowed else ""))
    check_tensor("h", h)
    check_tensor("weight", weight)
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
    if h.dim() < 2:
        raise ValueError(f"h must have a batch dim and a feature dim, got shape {tuple(h.shape)}")
    if channel_dim not in (-1, h.dim() - 1, 1):
        raise ValueError(f"channel_dim must be -1 (a Linear over h's last dim) or 1 (a 1x1 conv over channels-first "
                         f"h), got {channel_dim}")
    channel_dim = channel_dim % h.dim()
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        weight = weight.flatten(1)
    if weight.dim() != 2 or weight.shape[1] != h.shape[channel_dim]:
        raise ValueError(f"weight must have shape (out_features, {h.shape[channel_dim]}) (or (O, H, 1, 1)) for h of "
                         f"shape {tuple(h.shape)} with channel_dim={channel_dim}, got {tuple(weight.shape)}")
    out_features = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    check_same_device(("h", "weight", "bias"), (h, weight, bias))
    if max_chunk_bytes is not None:
        check_positive_int("max_chunk_bytes", max_chunk_bytes)
    out_shape = h.shape[:channel_dim] + (out_features,) + h.shape[channel_dim + 1:]
    if code == head_ops.DMOL:
        return _dmol_head(h, weight, bias, x, channel_dim, reduction, max_chunk_bytes, **likelihood_kwargs)
    categorical = code == head_ops.CATEGORICAL
    check_x(x, "h", h, differentiable=False)
    x_event = (out_shape[:channel_dim] + out_shape[channel_dim + 1:]) if categorical else out_shape
    if tuple(x.shape) == tuple(x_event):
        samples = 1
    elif tuple(x.shape) == tuple(x_event[1:]) and channel_dim == len(out_shape) - 1:
        samples = out_shape[0]
    else:
        raise ValueError(f"x of shape {tuple(x.shape)} must have the head's output shape {tuple(x_event)}"
                         + (" without its class dim" if categorical else "") + f" (out_features = {out_features})"
                         + " or that shape without a leading sample dim K")
    if categorical:
        if x.is_floating_point() or x.dtype == torch.bool:
            raise TypeError(f"x must be an integer tensor of class indices, got dtype {x.dtype}")
    # the op's frame: (examples, positions, features) views of h, x and the scale operand
    h_last = h.movedim(channel_dim, -1)
    lead = 2 if samples > 1 else 1
    examples = math.prod(h_last.shape[:lead])
    positions = math.prod(h_last.shape[lead:-1])
    h3 = h_last.reshape(examples, positions, h.shape[channel_dim])
    x_rows = x.shape[0] if x.dim() else 1
    x3 = (x.reshape(x_rows, positions) if categorical else
          x.movedim(channel_dim - (lead - 1), -1).reshape(x_rows, positions, out_features))
    scale = None
    if scale_name is not None:
        scale = _scale_frame(scale_name, likelihood_kwargs.get(scale_name, 0.0), out_shape, channel_dim, lead, h.dtype,
                             h.device)
    chunk_elements = head_ops.chunk_elements_for(max_chunk_bytes, h.element_size(), out_features=out_features,
                                                 positions=positions)
    if torch.compiler.is_compiling() and examples * positions * out_features <= chunk_elements:
        scale_value = likelihood_kwargs.get(scale_name, 0.0) if scale_name is not None else None
        return _traced_unfused(h, weight, bias, x, likelihood, channel_dim, scale_value, reduction)
    grad_mode = torch.is_grad_enabled()
    want_grads = grad_mode and (h.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
                                or (scale is not None and scale.requires_grad))
    want_lv = bool(want_grads and scale is not None and scale.requires_grad)
    expected = default_expected_upstream(reduction, examples)
    log_prob, *_, num_invalid = head_ops.apply_linear_log_prob(
        h3, weight, bias, x3, scale, code, chunk_elements, expected, None, bool(want_grads), want_lv)
    if categorical:
        raise_if_invalid(num_invalid, likelihood_ops.categorical_support_message(out_features))
    else:
        raise_if_invalid(num_invalid, likelihood_ops.SUPPORT_MESSAGES[code])
    if lead == 2:  # (K, B); (a view of (B,) as (B,) would add an autograd node to every call's graph)
        log_prob = log_prob.view(h_last.shape[:lead])
    return reduce(log_prob, reduction)


def _dmol_head(h, weight, bias, x, channel_dim, reduction, max_chunk_bytes, num_mixtures=None, num_bits=8,
               log_scale_min=-7.0):
    """The logistic-mixture head: a 1x1 conv to NVAE's packed (B, M + C(2M or 3M), *pixels) parameters."""
    from .dmol import _check_dmol_x, _check_log_scale_min, _dmol_packed_channels
    from ..ops.dmol import SUPPORT_MESSAGE

    if channel_dim != 1:
        raise ValueError("channel_dim must be 1 for the logistic-mixture head (a 1x1 conv to NVAE's packed "
                         "channels-first parameters)")
    check_tensor("x", x)
    if x.dim() != h.dim() or x.shape[0] != h.shape[0] or tuple(x.shape[2:]) != tuple(h.shape[2:]) or \
            x.shape[1] not in (1, 3):
        raise ValueError(f"x must have shape (B, 1 or 3, *pixels) = ({h.shape[0]}, C, {', '.join(map(str, h.shape[2:]))})"
                         f" for h of shape {tuple(h.shape)}, got {tuple(x.shape)}")
    channels = x.shape[1]
    per_mixture = _dmol_packed_channels(1, channels)
    if num_mixtures is None:
        num_mixtures = weight.shape[0] // per_mixture
    if num_mixtures < 1 or _dmol_packed_channels(num_mixtures, channels) != weight.shape[0]:
        raise ValueError(f"weight has {weight.shape[0]} outputs, but a {channels}-channel mixture packs "
                         f"{per_mixture} per component (M = {num_mixtures}): out_features must be a multiple")
    _check_dmol_x(x, h, "h", num_bits)
    _check_log_scale_min(log_scale_min)
    examples, positions = h.shape[0], math.prod(h.shape[2:])
    h3 = h.movedim(1, -1).reshape(examples, positions, h.shape[1])
    x3 = x.reshape(examples, channels, positions).transpose(1, 2)  # (B, P, C) view
    chunk_elements = head_ops.chunk_elements_for(max_chunk_bytes, h.element_size(),
                                                 head_ops.DEFAULT_MIXTURE_CHUNK_BYTES, weight.shape[0], positions)
    if torch.compiler.is_compiling() and examples * positions * weight.shape[0] <= chunk_elements:
        return _traced_unfused(h, weight, bias, x, "dmol", channel_dim, None, reduction,
                               (int(num_mixtures), int(num_bits), float(log_scale_min)))
    grad_mode = torch.is_grad_enabled()
    want_grads = grad_mode and (h.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    log_prob, *_, num_invalid = head_ops.apply_linear_log_prob(
        h3, weight, bias, x3, None, head_ops.DMOL, chunk_elements, default_expected_upstream(reduction, examples),
        None, bool(want_grads), False, int(num_mixtures), int(num_bits), float(log_scale_min))
    raise_if_invalid(num_invalid, SUPPORT_MESSAGE)
    return reduce(log_prob, reduction)


def _traced_unfused(h, weight, bias, x, likelihood: str, channel_dim: int, scale, reduction: str, mixture=None):
    """What torch.compile traces for a head whose output fits one chunk: F.linear (a 1x1 conv for channel_dim=1)
    and the likelihood's own function on its output. The op's backward cannot read the upstream gradient on the
    host in a traced graph, so it recomputes every chunk with per-row weights there: the MNIST head's compiled
    training step took 5.7 ms against 3.9 for compiled eager. Here autograd differentiates the Linear for any
    upstream, and the output held is at most one chunk's. (The arguments were checked by the caller.)"""
    from .dmol import dmol_packed_log_prob
    from .likelihoods import (bernoulli_log_prob, categorical_log_prob, continuous_bernoulli_log_prob,
                              gaussian_log_prob, laplace_log_prob)

    last = channel_dim == h.dim() - 1  # (no identity permutes in the traced graph)
    out_last = F.linear(h if last else h.movedim(channel_dim, -1), weight, bias)  # (..., O): channels last
    if likelihood == "categorical":  # logits (B, *pixels, K) for x (B, *pixels), either layout of h
        return categorical_log_prob(out_last, x, reduction=reduction)
    out = out_last if last else out_last.movedim(-1, channel_dim)  # the output in x's layout
    if likelihood == "dmol":
        num_mixtures, num_bits, log_scale_min = mixture
        return dmol_packed_log_prob(x, out.contiguous(), num_mixtures, num_bits=num_bits, log_scale_min=log_scale_min,
                                    reduction=reduction)
    if likelihood == "gaussian":
        return gaussian_log_prob(out, x, scale, reduction=reduction)
    if likelihood == "laplace":
        return laplace_log_prob(out, x, scale, reduction=reduction)
    function = bernoulli_log_prob if likelihood == "bernoulli" else continuous_bernoulli_log_prob
    return function(out, x, reduction=reduction)
