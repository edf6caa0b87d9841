"""Reconstruction log-likelihood ops with the gradient computed in the forward pass.

Op schemas (``torch.ops.vae_fast``)::

    elementwise_log_prob(theta (N,D), x (Bx,D), logvar? (N,D) view, likelihood, want_grad, want_logvar_grad,
                         grad_scale=1.0)
        -> log_prob (N,), grad_theta (N,D) or (0,), grad_logvar (N,D) or (0,), num_invalid () int64
    categorical_log_prob(logits (N,P,C), target (Bx,P) int64, want_grad, grad_scale=1.0)
        -> log_prob (N,), grad_logits (N,P,C) or (0,), num_invalid () int64

Row r of theta is scored against row r % Bx of x (K decoder samples share x).
Backward multiplies the saved gradient by the per-row upstream gradient: a scale,
not a second sweep over the data. With ``grad_scale`` the kernels write the gradient already
multiplied by the upstream gradient the caller expects; when that arrives, backward leaves
the saved buffer untouched (see ``_scale_saved_rows``).
"""
from __future__ import annotations

import math

import torch

from .._validation import raise_if_invalid
from ._library import ELEMENTWISE_LIKELIHOODS, LIB, call, kernels_for, register_kernel

LIB.define(
    "elementwise_log_prob(Tensor theta, Tensor x, Tensor? logvar, int likelihood, bool want_grad, "
    "bool want_logvar_grad, float grad_scale=1.0) -> (Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "categorical_log_prob(Tensor logits, Tensor target, bool want_grad, float grad_scale=1.0) -> (Tensor, Tensor, Tensor)")


def _elementwise_kernel(theta, x, logvar, likelihood, want_grad, want_logvar_grad, grad_scale=1.0):
    theta = theta.contiguous()
    logvar = None if logvar is None else logvar.to(theta.dtype).expand(theta.shape)
    return kernels_for(theta).elementwise_log_prob(
        theta, x.to(theta.dtype).contiguous(), logvar, likelihood, want_grad, want_logvar_grad and logvar is not None,
        grad_scale)


def _categorical_kernel(logits, target, want_grad, grad_scale=1.0):
    logits = logits.contiguous()
    return kernels_for(logits).categorical_log_prob(logits, target.to(torch.int64).contiguous(), want_grad, grad_scale)


register_kernel("elementwise_log_prob", _elementwise_kernel)
register_kernel("categorical_log_prob", _categorical_kernel)

_LIKELIHOOD_NAMES = {code: name for name, code in ELEMENTWISE_LIKELIHOODS.items()}


@torch.library.register_fake("vae_fast::elementwise_log_prob")
def _elementwise_fake(theta, x, logvar, likelihood, want_grad, want_logvar_grad, grad_scale=1.0):
    grad = theta.new_empty(theta.shape) if want_grad else theta.new_empty(0)
    grad_lv = theta.new_empty(theta.shape) if want_logvar_grad and logvar is not None else theta.new_empty(0)
    return theta.new_empty(theta.shape[:1]), grad, grad_lv, theta.new_empty((), dtype=torch.int64)


@torch.library.register_fake("vae_fast::categorical_log_prob")
def _categorical_fake(logits, target, want_grad, grad_scale=1.0):
    grad = logits.new_empty(logits.shape) if want_grad else logits.new_empty(0)
    return logits.new_empty(logits.shape[:1]), grad, logits.new_empty((), dtype=torch.int64)


def _scale_rows(saved_grad: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    # d loss / d theta[r, ...] = grad_out[r] * d log p_r / d theta[r, ...]
    return saved_grad * grad_out.reshape(-1, *([1] * (saved_grad.dim() - 1)))


_inplace_backward = True


def set_inplace_backward(enabled: bool) -> None:
    """Choose how the fused likelihoods' backward scales the gradient saved in forward.

    In place (default, as Liger-Kernel does): the saved buffer becomes the gradient, so
    backward allocates nothing and makes one pass. The graph can then be backpropagated
    through only once; a second backward (``retain_graph=True``) raises. Out of place:
    a new gradient buffer per backward, any number of backward passes.
    """
    global _inplace_backward
    _inplace_backward = bool(enabled)


def _check_not_consumed(ctx) -> None:
    # before ctx.saved_tensors, whose version check would raise a less helpful error
    if getattr(ctx, "grad_consumed", False):
        raise RuntimeError(
            "vae_fast: the fused likelihood's saved gradient was already used by an earlier backward pass "
            "(it is scaled in place); call vae_fast.set_inplace_backward(False) to backpropagate through it "
            "more than once (retain_graph=True, gradcheck)")


# Expected upstream gradients: the kernels write d log p / d theta already multiplied by the
# upstream gradient the caller expects (e.g. -1/B per row under `loss = -log_p.mean()`;
# vae_fast.elbo and reduction="mean"/"sum" know it). If backward receives that value, the
# saved buffer is the answer and backward makes no pass over it; otherwise it is rescaled by
# grad_out / expected. "Receives that value" means to a few ulps (autograd and Python round
# 1/(B K) differently). The C++ backend checks on the host (a pass over B values, only for
# gradients big enough for the skipped pass to matter); the Triton backend decides per row
# on the device, inside its rescaling kernel, so CUDA needs no host sync for it.
_SKIP_CHECK_MIN_ELEMENTS = 1 << 18
_SKIP_CHECK_ULPS = 4


def expected_upstream(expected: float) -> float:
    """The gradient scale to request from the kernels (1 where ``expected`` is unusable)."""
    return expected if expected != 0.0 and math.isfinite(expected) else 1.0


def _host_checked_factor(saved_grad: torch.Tensor, grad_out: torch.Tensor, expected: float):
    """None if grad_out equals ``expected`` in every row (checked on CPU tensors only: elsewhere
    it would be a host sync), else the per-row factor to apply to the saved gradient."""
    if (saved_grad.device.type == "cpu" and saved_grad.numel() >= _SKIP_CHECK_MIN_ELEMENTS
            and not torch.compiler.is_compiling()):
        tolerance = _SKIP_CHECK_ULPS * torch.finfo(grad_out.dtype).eps * abs(expected)
        if bool(((grad_out - expected).abs() <= tolerance).all()):
            return None
    return grad_out if expected == 1.0 else grad_out / expected


def _scale_saved_rows(ctx, saved_grad: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    expected = getattr(ctx, "grad_scale", 1.0)
    if not _inplace_backward or torch.compiler.is_compiling():
        return _scale_rows(saved_grad, grad_out if expected == 1.0 else grad_out / expected)
    ctx.grad_consumed = True
    scale_rows_inplace = getattr(kernels_for(saved_grad), "scale_rows_inplace", None)
    if scale_rows_inplace is not None:  # Triton: rows whose factor is 1 are skipped on the device
        factor = grad_out if expected == 1.0 else grad_out / expected
        return scale_rows_inplace(saved_grad, factor, _SKIP_CHECK_ULPS * torch.finfo(grad_out.dtype).eps)
    factor = _host_checked_factor(saved_grad, grad_out, expected)
    if factor is None:
        return saved_grad
    return saved_grad.mul_(factor.reshape(-1, *([1] * (saved_grad.dim() - 1))))


class ElementwiseLogProb(torch.autograd.Function):
    """theta (N, D) viewed from shape ``theta_shape`` (N = product of its ``lead_ndim`` leading dims),
    x (Bx, D), logvar broadcastable to ``theta_shape`` or None  ->  log_prob (N,).

    Raises ValueError if x lies outside the likelihood's support (counted in the kernel)."""

    @staticmethod
    def forward(ctx, theta, x, logvar, likelihood, theta_shape, lead_ndim, expected_grad=1.0):
        want_grad = ctx.needs_input_grad[0]
        want_lv = logvar is not None and ctx.needs_input_grad[2]
        lv_rows = None if logvar is None else logvar.expand(theta_shape).reshape(theta.shape)
        ctx.grad_scale = expected_upstream(expected_grad)
        log_prob, grad, grad_lv, num_invalid = call(
            torch.ops.vae_fast.elementwise_log_prob.default, _elementwise_kernel, theta, x, lv_rows, likelihood,
            want_grad, want_lv, ctx.grad_scale)
        if likelihood != ELEMENTWISE_LIKELIHOODS["gaussian"]:
            raise_if_invalid(num_invalid, f"x must lie in [0, 1] for the {_LIKELIHOOD_NAMES[likelihood]} likelihood")
        if want_lv:
            # A logvar constant within each row (scalar, per example) needs only per-row sums of its
            # gradient: keep (N, 1) instead of a second decoder-sized buffer.
            row_constant = lv_rows.stride(1) == 0 or lv_rows.shape[1] <= 1
            if row_constant:
                grad_lv = grad_lv.sum(1, keepdim=True)
            ctx.lv_shape = logvar.shape
            lead_shape = theta_shape[:lead_ndim]
            ctx.lv_grad_shape = (*lead_shape, *([1] * (len(theta_shape) - lead_ndim))) if row_constant else theta_shape
        ctx.save_for_backward(grad if want_grad else None, grad_lv if want_lv else None)
        return log_prob

    @staticmethod
    def backward(ctx, grad_out):
        _check_not_consumed(ctx)
        grad, grad_lv = ctx.saved_tensors
        grad_logvar = None
        if grad_lv is not None:
            upstream = grad_out if ctx.grad_scale == 1.0 else grad_out / ctx.grad_scale
            grad_logvar = _scale_rows(grad_lv, upstream).reshape(ctx.lv_grad_shape).sum_to_size(ctx.lv_shape)
        grad_theta = None if grad is None else _scale_saved_rows(ctx, grad, grad_out)
        return grad_theta, None, grad_logvar, None, None, None, None


class CategoricalLogProb(torch.autograd.Function):
    """logits (N, P, C), target (Bx, P) -> log_prob (N,); raises ValueError for targets outside [0, C)."""

    @staticmethod
    def forward(ctx, logits, target, expected_grad=1.0):
        want_grad = ctx.needs_input_grad[0]
        ctx.grad_scale = expected_upstream(expected_grad)
        log_prob, grad, num_invalid = call(
            torch.ops.vae_fast.categorical_log_prob.default, _categorical_kernel, logits, target, want_grad,
            ctx.grad_scale)
        raise_if_invalid(num_invalid, f"x must hold class indices in [0, {logits.shape[-1]})")
        ctx.save_for_backward(grad if want_grad else None)
        return log_prob

    @staticmethod
    def backward(ctx, grad_out):
        _check_not_consumed(ctx)
        (grad,) = ctx.saved_tensors
        return (None if grad is None else _scale_saved_rows(ctx, grad, grad_out)), None, None


# Op-level autograd (for direct torch.ops.vae_fast.* users and opcheck).
def _elementwise_setup(ctx, inputs, output):
    theta, x, logvar, likelihood, want_grad, want_lv = inputs[:6]
    _, grad, grad_lv, _ = output
    ctx.save_for_backward(grad, grad_lv)
    ctx.lv_shape = None if logvar is None else logvar.shape
    ctx.grad_scale = inputs[6] if len(inputs) > 6 else 1.0


def _elementwise_backward(ctx, grad_out, _grad, _grad_lv, _invalid):
    grad, grad_lv = ctx.saved_tensors
    grad_out = grad_out / ctx.grad_scale  # the saved gradients carry the requested scale
    if ctx.needs_input_grad[0] and grad.numel() == 0:
        raise RuntimeError("vae_fast.elementwise_log_prob: call with want_grad=True to differentiate w.r.t. theta")
    grad_theta = _scale_rows(grad, grad_out) if ctx.needs_input_grad[0] else None
    grad_logvar = None
    if ctx.needs_input_grad[2]:
        if grad_lv.numel() == 0:
            raise RuntimeError("vae_fast.elementwise_log_prob: call with want_logvar_grad=True to differentiate w.r.t. logvar")
        grad_logvar = _scale_rows(grad_lv, grad_out).sum_to_size(ctx.lv_shape)
    return grad_theta, None, grad_logvar, None, None, None, None


def register_saved_gradient_autograd(op: str, grad_index: int, scale_index: int, num_inputs: int) -> None:
    """Op-level autograd for an op whose second output is the per-row gradient of its first with
    respect to input ``grad_index`` (present when called with want_grad=True), written multiplied
    by the op's ``grad_scale`` input (input ``scale_index``)."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.grad_scale = inputs[scale_index] if len(inputs) > scale_index else 1.0

    def backward(ctx, grad_out, *_unused):
        (grad,) = ctx.saved_tensors
        grads = [None] * num_inputs
        if ctx.needs_input_grad[grad_index]:
            if grad.numel() == 0:
                raise RuntimeError(f"vae_fast.{op}: call with want_grad=True to differentiate")
            grads[grad_index] = _scale_rows(grad, grad_out / ctx.grad_scale)
        return tuple(grads)

    torch.library.register_autograd(f"vae_fast::{op}", backward, setup_context=setup)


torch.library.register_autograd("vae_fast::elementwise_log_prob", _elementwise_backward, setup_context=_elementwise_setup)
register_saved_gradient_autograd("categorical_log_prob", grad_index=0, scale_index=3, num_inputs=4)

