"""Discretised logistic mixture (PixelCNN++) ops, gradient computed in the forward pass.

Op schemas (``torch.ops.vae_fast``), pixels flattened to P = H * W::

    dmol_log_prob(x (Bx,C,P), logit_probs (N,M,P), means (N,C,M,P), log_scales (N,C,M,P),
                  coeffs? (N,3,M,P), num_bits, log_scale_min, want_grad, expected_upstream=1.0)
        -> log_prob (N,), grad_logit_probs, grad_means, grad_log_scales, grad_coeffs
           (each the input's shape, or (0,)), num_invalid () int64
    dmol_packed_log_prob(x (Bx,C,P), params (N, M + C*(2M or 3M), P), num_mixtures, num_bits,
                         log_scale_min, want_grad, expected_upstream=1.0)
        -> log_prob (N,), grad_params (params' shape or (0,)), num_invalid () int64

Row r is scored against x row r % Bx (K decoder samples share x). The packed op reads the
PixelCNN++/NVAE decoder output in place (logits, then per channel M means, M log-scales and,
for 3 channels, M raw coefficients squashed with tanh inside the kernel) and writes its
gradient in the same layout, so no slice, copy or tanh of the parameters is materialised.
Backward scales the saved gradients by the per-row upstream gradient (they carry
``expected_upstream``, see ops/_autograd.py). Double backward is not supported (a clear
RuntimeError): the mixture's second derivatives are not needed by any published model.
"""
from __future__ import annotations

import torch

from .._validation import raise_if_invalid
from ._autograd import (eager_function_apply, fast_apply, mark_non_differentiable, no_forward_ad, saved_gradients,
                        scale_saved, setup_saved_gradient, setup_step_gradient, step_ctx_constants)
from ._library import acc_dtype, call, kernels_for, register_op, step_kernels_for


def _unit_pixel_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    # the kernels read pixels contiguously and everything else through strides: slices of a
    # packed tensor need no copy
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def packed_views(params: torch.Tensor, num_mixtures: int, channels: int):
    """(logit_probs (N,M,P), means (N,C,M,P), log_scales, raw coeffs or None) as views of a packed
    ``params`` (N, M + C*(2M or 3M), P): the layout of PixelCNN++ and NVAE decoders."""
    rows, _, pixels = params.shape
    m = num_mixtures
    per_channel = 3 * m if channels == 3 else 2 * m
    rest = params[:, m:].reshape(rows, channels, per_channel, pixels)
    coeffs = rest[:, :, 2 * m:3 * m] if channels == 3 else None
    return params[:, :m], rest[:, :, :m], rest[:, :, m:2 * m], coeffs


def _new_gradient(kernels, t: torch.Tensor) -> torch.Tensor:
    """A contiguous buffer of t's shape; the CPU backend serves large ones from its buffer cache."""
    new_output = getattr(kernels, "new_output", None)
    return t.new_empty(t.shape) if new_output is None else new_output(t)


def _dmol_kernel(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, want_grad, expected_upstream=1.0):
    kernels = kernels_for(means)
    operands = [_unit_pixel_stride(t) for t in (logit_probs, means, log_scales, coeffs)]
    grads = tuple(None if t is None else _new_gradient(kernels, t) for t in operands) if want_grad else None
    log_prob, bad = kernels.dmol_log_prob(
        x.to(means.dtype).contiguous(), *operands, num_bits, log_scale_min, False, grads, expected_upstream)
    return (log_prob, *(grads if grads is not None else (None,) * 4), bad)


def _dmol_packed_kernel(x, params, num_mixtures, num_bits, log_scale_min, want_grad, expected_upstream=1.0):
    params = params.contiguous()
    channels = x.shape[1]
    kernels = kernels_for(params)
    grad = _new_gradient(kernels, params) if want_grad else None
    grads = packed_views(grad, num_mixtures, channels) if want_grad else None
    log_prob, bad = kernels.dmol_log_prob(
        x.to(params.dtype).contiguous(), *packed_views(params, num_mixtures, channels), num_bits, log_scale_min,
        True, grads, expected_upstream)
    return log_prob, grad, bad


def _dmol_fake(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, want_grad, expected_upstream=1.0):
    def grad_like(t):
        return t.new_empty(t.shape) if want_grad and t is not None else means.new_empty(0)

    return (means.new_empty(means.shape[:1], dtype=acc_dtype(means.dtype)), grad_like(logit_probs), grad_like(means),
            grad_like(log_scales), grad_like(coeffs), means.new_empty((), dtype=torch.int64))


def _dmol_packed_fake(x, params, num_mixtures, num_bits, log_scale_min, want_grad, expected_upstream=1.0):
    grad = params.new_empty(params.shape) if want_grad else params.new_empty(0)
    return (params.new_empty(params.shape[:1], dtype=acc_dtype(params.dtype)), grad,
            params.new_empty((), dtype=torch.int64))


SUPPORT_MESSAGE = ("x must lie in [-1, 1] for the discretized logistic mixture likelihood "
                   "(pixel p maps to p / 127.5 - 1)")


def _no_double_backward(op_name: str) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(f"vae_fast.{op_name}: double backward (create_graph=True) is not supported by the fused "
                           "logistic mixture; use vae_fast.reference.discretized_logistic_mixture_log_prob for "
                           "higher-order gradients")


class DmolLogProb(torch.autograd.Function):
    """``torch.ops.vae_fast.dmol_log_prob`` with its autograd: only the gradients of the parameters
    that need one are saved (no mixture-sized temporaries)."""

    @staticmethod
    def forward(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, want_grad, expected_upstream=1.0):
        return call(torch.ops.vae_fast.dmol_log_prob.default, _dmol_kernel, x, logit_probs, means, log_scales, coeffs,
                    num_bits, log_scale_min, want_grad, expected_upstream)

    @staticmethod
    def setup_context(ctx, inputs, output):
        params, want_grad = inputs[1:5], inputs[7]
        mark_non_differentiable(ctx, *output[1:])
        wanted = [want_grad and t is not None and t.requires_grad for t in params]
        setup_saved_gradient(ctx, "dmol_log_prob", inputs, 8,
                             tuple(g if want else None for g, want in zip(output[1:5], wanted)))

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        if grad_out is None:
            return (None,) * 9
        _no_double_backward(ctx.op_name)
        grads = []
        for g, needed in zip(saved_gradients(ctx), ctx.needs_input_grad[1:5]):
            if needed and g is None:
                raise RuntimeError("vae_fast.dmol_log_prob: call with want_grad=True to differentiate")
            grads.append(scale_saved(ctx, g, grad_out) if needed else None)
        return (None, *grads, None, None, None, None)


class DmolPackedLogProb(torch.autograd.Function):
    """``torch.ops.vae_fast.dmol_packed_log_prob`` with its autograd: one gradient buffer of params' size."""

    @staticmethod
    def forward(x, params, num_mixtures, num_bits, log_scale_min, want_grad, expected_upstream=1.0):
        return call(torch.ops.vae_fast.dmol_packed_log_prob.default, _dmol_packed_kernel, x, params, num_mixtures,
                    num_bits, log_scale_min, want_grad, expected_upstream)

    @staticmethod
    def setup_context(ctx, inputs, output):
        mark_non_differentiable(ctx, *output[1:])
        setup_saved_gradient(ctx, "dmol_packed_log_prob", inputs, 6, (output[1] if inputs[5] else None,))

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        if grad_out is None or not ctx.needs_input_grad[1]:
            return (None,) * 7
        _no_double_backward(ctx.op_name)
        (grad,) = saved_gradients(ctx)
        if grad is None:
            raise RuntimeError("vae_fast.dmol_packed_log_prob: call with want_grad=True to differentiate")
        return None, scale_saved(ctx, grad, grad_out), None, None, None, None, None


register_op(
    "dmol_log_prob",
    "(Tensor x, Tensor logit_probs, Tensor means, Tensor log_scales, Tensor? coeffs, int num_bits, "
    "float log_scale_min, bool want_grad, float expected_upstream=1.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _dmol_kernel, _dmol_fake, DmolLogProb)
register_op(
    "dmol_packed_log_prob",
    "(Tensor x, Tensor params, int num_mixtures, int num_bits, float log_scale_min, bool want_grad, "
    "float expected_upstream=1.0) -> (Tensor, Tensor, Tensor)",
    _dmol_packed_kernel, _dmol_packed_fake, DmolPackedLogProb)


_apply_split = fast_apply(DmolLogProb, _dmol_kernel, eager_outputs=(0, 5),  # log_prob, num_invalid
                          jvp=no_forward_ad("discretized_logistic_mixture_log_prob"))
_apply_packed = fast_apply(DmolPackedLogProb, _dmol_packed_kernel, eager_outputs=(0, 2),
                           jvp=no_forward_ad("dmol_packed_log_prob"))


def dmol_log_prob(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, expected_upstream):
    """(N,) log-likelihoods of the split parameters; raises ValueError for x outside [-1, 1]."""
    want_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (logit_probs, means, log_scales, coeffs))
    log_prob, *_, num_invalid = _apply_split(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min,
                                                  want_grad, expected_upstream)
    raise_if_invalid(num_invalid, SUPPORT_MESSAGE)
    return log_prob


def dmol_packed_log_prob(x, params, num_mixtures, num_bits, log_scale_min, expected_upstream):
    """(N,) log-likelihoods of a packed parameter tensor; raises ValueError for x outside [-1, 1]."""
    want_grad = torch.is_grad_enabled() and params.requires_grad
    log_prob, _, num_invalid = _apply_packed(x, params, num_mixtures, num_bits, log_scale_min, want_grad,
                                                       expected_upstream)
    raise_if_invalid(num_invalid, SUPPORT_MESSAGE)
    return log_prob


class DmolPackedStep(torch.autograd.Function):
    """The per-step call of :class:`DmolPackedLogProb` (see :func:`dmol_packed_step`): forward(x, params,
    (kernels, num_mixtures, num_bits, log_scale_min, want_grad, expected_upstream)) -> log_prob (B,), raising
    ValueError itself for x outside [-1, 1], with ctx holding what ``DmolPackedLogProb.setup_context`` holds;
    backward *is* ``DmolPackedLogProb.backward``."""

    @staticmethod
    def forward(ctx, x, params, plan):
        kernels, num_mixtures, num_bits, log_scale_min, want_grad, expected_upstream = plan
        log_prob, grad, num_invalid = kernels.dmol_packed_step_log_prob(x, params, num_mixtures, num_bits,
                                                                        log_scale_min, want_grad, expected_upstream)
        if num_invalid:
            raise_if_invalid(num_invalid, SUPPORT_MESSAGE)
        setup_step_gradient(ctx, expected_upstream, (grad,))
        return log_prob

    backward = staticmethod(DmolPackedLogProb.backward)


step_ctx_constants(DmolPackedStep, op_name="dmol_packed_log_prob", num_saved=1)


_apply_packed_step = eager_function_apply(DmolPackedStep)


def dmol_packed_step(x, params, num_mixtures: int, num_bits: int, log_scale_min: float,
                     expected_upstream: float) -> torch.Tensor | None:
    """:func:`dmol_packed_log_prob` of the per-step call (x (B, C, *pixels), params (B, P, *pixels)) through the
    backend's step kernel; None when the call does not qualify (the caller then uses :func:`dmol_packed_log_prob`).

    The caller passes plain CPU tensors of one floating dtype with matching shapes and checked arguments (the
    functional layer's per-step check). The call qualifies when it is plain eager (see :func:`step_kernels_for`),
    both tensors are contiguous, B > 0, C > 0 and the backend has a step kernel for their dtype; the gradient
    buffer comes from the backend's buffer pool when it is large."""
    if not (params.is_contiguous() and x.is_contiguous() and x.shape[0] > 0 and x.shape[1] > 0):
        return None
    kernels = step_kernels_for(params, 0)
    if kernels is None:
        return None
    want_grad = torch.is_grad_enabled() and params.requires_grad
    return _apply_packed_step(x, params, (kernels, num_mixtures, num_bits, log_scale_min, want_grad,
                                          expected_upstream))
