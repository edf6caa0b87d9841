"""Discretised logistic mixture (PixelCNN++) ops, gradient computed in the forward pass.

Op schemas (``torch.ops.vae_fast``), pixels flattened to P = H * W::

    dmol_log_prob(x (Bx,C,P), logit_probs (N,M,P), means (N,C,M,P), log_scales (N,C,M,P),
                  coeffs? (N,3,M,P), num_bits, log_scale_min, want_grad, grad_scale=1.0)
        -> log_prob (N,), grad_logit_probs, grad_means, grad_log_scales, grad_coeffs
           (each the input's shape, or (0,)), num_invalid () int64
    dmol_packed_log_prob(x (Bx,C,P), params (N, M + C*(2M or 3M), P), num_mixtures, num_bits,
                         log_scale_min, want_grad, grad_scale=1.0)
        -> log_prob (N,), grad_params (params' shape or (0,)), num_invalid () int64

Row r is scored against x row r % Bx (K decoder samples share x). The packed op reads the
PixelCNN++/NVAE decoder output in place (logits, then per channel M means, M log-scales and,
for 3 channels, M raw coefficients squashed with tanh inside the kernel) and writes its
gradient in the same layout, so no slice, copy or tanh of the parameters is materialised.
Backward scales the saved gradient by the per-row upstream gradient (gradients carry
``grad_scale``, the expected upstream gradient, as in ops/likelihood.py).
"""
from __future__ import annotations

import torch

from .._validation import raise_if_invalid
from ._library import LIB, call, kernels_for, register_kernel
from .likelihood import (_check_not_consumed, _scale_rows, _scale_saved_rows, expected_upstream,
                         register_saved_gradient_autograd)

LIB.define(
    "dmol_log_prob(Tensor x, Tensor logit_probs, Tensor means, Tensor log_scales, Tensor? coeffs, int num_bits, "
    "float log_scale_min, bool want_grad, float grad_scale=1.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "dmol_packed_log_prob(Tensor x, Tensor params, int num_mixtures, int num_bits, float log_scale_min, "
    "bool want_grad, float grad_scale=1.0) -> (Tensor, Tensor, Tensor)"
)


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
    return t.new_empty(t.shape) if new_output is None else new_output(t, t.shape)


def _dmol_kernel(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, want_grad, grad_scale=1.0):
    kernels = kernels_for(means)
    operands = [_unit_pixel_stride(t) for t in (logit_probs, means, log_scales, coeffs)]
    grads = tuple(None if t is None else _new_gradient(kernels, t) for t in operands) if want_grad else None
    log_prob, bad = kernels.dmol_log_prob(
        x.to(means.dtype).contiguous(), *operands, num_bits, log_scale_min, False, grads, grad_scale)
    return (log_prob, *(grads if grads is not None else (None,) * 4), bad)


def _dmol_packed_kernel(x, params, num_mixtures, num_bits, log_scale_min, want_grad, grad_scale=1.0):
    params = params.contiguous()
    channels = x.shape[1]
    kernels = kernels_for(params)
    grad = _new_gradient(kernels, params) if want_grad else None
    grads = packed_views(grad, num_mixtures, channels) if want_grad else None
    log_prob, bad = kernels.dmol_log_prob(
        x.to(params.dtype).contiguous(), *packed_views(params, num_mixtures, channels), num_bits, log_scale_min,
        True, grads, grad_scale)
    return log_prob, grad, bad


register_kernel("dmol_log_prob", _dmol_kernel)
register_kernel("dmol_packed_log_prob", _dmol_packed_kernel)


@torch.library.register_fake("vae_fast::dmol_log_prob")
def _dmol_fake(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, want_grad, grad_scale=1.0):
    def grad_like(t):
        return t.new_empty(t.shape) if want_grad and t is not None else means.new_empty(0)

    return (means.new_empty(means.shape[:1]), grad_like(logit_probs), grad_like(means), grad_like(log_scales),
            grad_like(coeffs), means.new_empty((), dtype=torch.int64))


@torch.library.register_fake("vae_fast::dmol_packed_log_prob")
def _dmol_packed_fake(x, params, num_mixtures, num_bits, log_scale_min, want_grad, grad_scale=1.0):
    grad = params.new_empty(params.shape) if want_grad else params.new_empty(0)
    return params.new_empty(params.shape[:1]), grad, params.new_empty((), dtype=torch.int64)


_SUPPORT = "x must lie in [-1, 1] for the discretized logistic mixture likelihood (pixel p maps to p / 127.5 - 1)"


class DmolLogProb(torch.autograd.Function):
    """x (Bx, C, P); logit_probs (N, M, P); means, log_scales, coeffs (N, C, M, P)  ->  log_prob (N,).
    Saved for backward: only the gradients of the parameters that need one."""

    @staticmethod
    def forward(ctx, x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, expected_grad=1.0):
        want_grad = any(ctx.needs_input_grad[1:5])
        ctx.grad_scale = expected_upstream(expected_grad)
        log_prob, *grads, num_invalid = call(
            torch.ops.vae_fast.dmol_log_prob.default, _dmol_kernel, x, logit_probs, means, log_scales, coeffs,
            num_bits, log_scale_min, want_grad, ctx.grad_scale)
        raise_if_invalid(num_invalid, _SUPPORT)
        kept = [g if want_grad and needed else None for g, needed in zip(grads, ctx.needs_input_grad[1:5])]
        ctx.save_for_backward(*kept)
        return log_prob

    @staticmethod
    def backward(ctx, grad_out):
        _check_not_consumed(ctx)
        grads = [None if g is None else _scale_saved_rows(ctx, g, grad_out) for g in ctx.saved_tensors]
        return (None, *grads, None, None, None)


class DmolPackedLogProb(torch.autograd.Function):
    """x (Bx, C, P), packed params (N, M + C*(2M or 3M), P)  ->  log_prob (N,); saves one
    gradient buffer of params' size."""

    @staticmethod
    def forward(ctx, x, params, num_mixtures, num_bits, log_scale_min, expected_grad=1.0):
        want_grad = ctx.needs_input_grad[1]
        ctx.grad_scale = expected_upstream(expected_grad)
        log_prob, grad, num_invalid = call(
            torch.ops.vae_fast.dmol_packed_log_prob.default, _dmol_packed_kernel, x, params, num_mixtures, num_bits,
            log_scale_min, want_grad, ctx.grad_scale)
        raise_if_invalid(num_invalid, _SUPPORT)
        ctx.save_for_backward(grad if want_grad else None)
        return log_prob

    @staticmethod
    def backward(ctx, grad_out):
        _check_not_consumed(ctx)
        (grad,) = ctx.saved_tensors
        return None, (None if grad is None else _scale_saved_rows(ctx, grad, grad_out)), None, None, None, None


# Op-level autograd (for direct torch.ops.vae_fast.* users and opcheck).
def _dmol_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:5])
    ctx.grad_scale = inputs[8] if len(inputs) > 8 else 1.0


def _dmol_backward(ctx, grad_out, *_unused):
    grad_out = grad_out / ctx.grad_scale  # the saved gradients carry the requested scale
    grads = []
    for g, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[1:5]):
        if needed and g.numel() == 0:
            raise RuntimeError("vae_fast.dmol_log_prob: call with want_grad=True to differentiate")
        grads.append(_scale_rows(g, grad_out) if needed else None)
    return (None, *grads, None, None, None, None)


torch.library.register_autograd("vae_fast::dmol_log_prob", _dmol_backward, setup_context=_dmol_setup)
register_saved_gradient_autograd("dmol_packed_log_prob", grad_index=1, scale_index=6, num_inputs=7)
