"""Reconstruction log-likelihood ops with the gradient computed in the forward pass.

Op schemas (``torch.ops.vae_fast``), theta (B, *event) or (K, B, *event) (``lead_ndim`` 1 or 2),
x (B, *event), logvar broadcastable to theta::

    elementwise_log_prob(theta, x, logvar?, likelihood, lead_ndim, want_grad, want_logvar_grad,
                         expected_upstream=1.0)
        -> log_prob theta.shape[:lead_ndim] (float32 for half inputs), grad_theta (theta's shape) or (0,),
           grad_logvar (theta's lead dims + logvar's event dims) or (0,), num_invalid () int64
    categorical_log_prob(logits (*lead, *pixels, C), target (B, *pixels) integer, lead_ndim, want_grad,
                         expected_upstream=1.0)
        -> log_prob (*lead,), grad_logits (logits' shape) or (0,), num_invalid () int64

Row r of theta is scored against row r % B of x (K decoder samples share x). The gradients are
written multiplied by ``expected_upstream`` (see ops/_autograd.py for what backward does with
them); x gets a gradient where the log-density is differentiable in x (the elementwise ones).
"""
from __future__ import annotations

import math

import torch

from .. import config, reference as ref
from .._validation import raise_if_invalid
from ._autograd import (InputRefs, differentiable_backward, loop_vmap, mark_non_differentiable, row_factor,
                        saved_gradients, scale_saved)
from ._library import acc_dtype, call, kernels_for, register_op, with_shape
from .codes import Likelihood


def _logvar_grad_shape(theta_shape, lead_ndim: int, logvar_shape) -> tuple:
    """Shape of grad_logvar: per row (theta's lead dims) and, over the event dims, logvar's own
    extent (1 where it broadcasts: a learned scalar keeps one value per row, not D)."""
    full = (1,) * (len(theta_shape) - len(logvar_shape)) + tuple(logvar_shape)
    return tuple(theta_shape[:lead_ndim]) + full[lead_ndim:]


def _elementwise_kernel(theta, x, logvar, likelihood, lead_ndim, want_grad, want_logvar_grad, expected_upstream=1.0):
    lead_shape = theta.shape[:lead_ndim]
    rows = math.prod(lead_shape)
    dim = math.prod(theta.shape[lead_ndim:])
    theta2 = theta.reshape(rows, dim).contiguous()
    lv2 = None if logvar is None else logvar.to(theta.dtype).expand(theta.shape).reshape(rows, dim)
    want_lv = want_logvar_grad and logvar is not None
    log_prob, grad, grad_lv, bad = kernels_for(theta2).elementwise_log_prob(
        theta2, x.to(theta.dtype).reshape(x.shape[0], dim).contiguous(), lv2, likelihood, want_grad, want_lv,
        expected_upstream)
    if grad is not None:
        grad = with_shape(grad, theta.shape)
    if grad_lv is not None:
        grad_lv = grad_lv.view(theta.shape).sum_to_size(_logvar_grad_shape(theta.shape, lead_ndim, logvar.shape))
    return log_prob.view(lead_shape), grad, grad_lv, bad


def _elementwise_fake(theta, x, logvar, likelihood, lead_ndim, want_grad, want_logvar_grad, expected_upstream=1.0):
    grad = theta.new_empty(theta.shape) if want_grad else theta.new_empty(0)
    grad_lv = (theta.new_empty(_logvar_grad_shape(theta.shape, lead_ndim, logvar.shape))
               if want_logvar_grad and logvar is not None else theta.new_empty(0))
    log_prob = theta.new_empty(theta.shape[:lead_ndim], dtype=acc_dtype(theta.dtype))
    return log_prob, grad, grad_lv, theta.new_empty((), dtype=torch.int64)


def _reference_elementwise(likelihood: int, lead_ndim: int):
    """The op's log-likelihood in differentiable torch ops (double backward)."""

    def log_prob(theta, x, logvar):
        x = x.to(theta.dtype)
        if likelihood == Likelihood.GAUSSIAN:
            return ref.gaussian_log_prob(theta, x, logvar, batch_dims=lead_ndim)
        if likelihood == Likelihood.BERNOULLI:
            return ref.bernoulli_log_prob(theta, x, batch_dims=lead_ndim)
        return ref.continuous_bernoulli_log_prob(theta, x, batch_dims=lead_ndim)

    return log_prob


class ElementwiseLogProb(torch.autograd.Function):
    """``torch.ops.vae_fast.elementwise_log_prob`` with its autograd (one implementation for both)."""

    @staticmethod
    def forward(theta, x, logvar, likelihood, lead_ndim, want_grad, want_logvar_grad, expected_upstream=1.0):
        return call(torch.ops.vae_fast.elementwise_log_prob.default, _elementwise_kernel, theta, x, logvar,
                    likelihood, lead_ndim, want_grad, want_logvar_grad, expected_upstream)

    @staticmethod
    def setup_context(ctx, inputs, output):
        theta, x, logvar, likelihood, lead_ndim, want_grad, want_lv = inputs[:7]
        _, grad, grad_lv, num_invalid = output
        mark_non_differentiable(ctx, grad, grad_lv, num_invalid)
        ctx.set_materialize_grads(False)
        ctx.op_name = "elementwise_log_prob"
        ctx.expected_upstream = inputs[7] if len(inputs) > 7 else 1.0
        ctx.inplace_backward = config.INPLACE_BACKWARD.get()
        ctx.likelihood, ctx.lead_ndim = likelihood, lead_ndim
        ctx.shapes = (theta.shape, x.shape, None if logvar is None else logvar.shape)
        # d/dx of the Bernoulli family is theta itself: keep it when x needs a gradient
        keep = config.SAVE_INPUTS.get() or (x.requires_grad and likelihood != Likelihood.GAUSSIAN)
        ctx.inputs = InputRefs((theta, x, logvar), strong=keep)
        ctx.save_for_backward(grad if want_grad else None, grad_lv if want_lv and logvar is not None else None)

    @staticmethod
    def backward(ctx, grad_out, _grad_theta=None, _grad_logvar=None, _num_invalid=None):
        if grad_out is None:
            return (None,) * 8
        needs = ctx.needs_input_grad
        theta_shape, x_shape, lv_shape = ctx.shapes
        if torch.is_grad_enabled():  # create_graph=True: recompute in differentiable torch ops
            inputs = ctx.inputs.get(ctx.op_name, "the decoder output (theta)")
            grads = differentiable_backward(ctx.op_name, _reference_elementwise(ctx.likelihood, ctx.lead_ndim),
                                            inputs, needs[:3], (grad_out,))
            return (*grads, None, None, None, None, None)
        grad, grad_lv = saved_gradients(ctx)
        if (needs[0] or needs[1]) and grad is None and not (needs[1] and ctx.likelihood != Likelihood.GAUSSIAN):
            raise RuntimeError("vae_fast.elementwise_log_prob: call with want_grad=True to differentiate w.r.t. theta")
        grad_theta = grad_x = grad_logvar = None
        if needs[1]:
            if ctx.likelihood == Likelihood.GAUSSIAN:  # d/dx = -d/dmean
                grad_x = -(grad * row_factor(grad_out / ctx.expected_upstream, grad.dim()).to(grad.dtype))
            else:  # d/dx [x l - softplus(l) (+ log C(l))] = l
                theta = ctx.inputs.get(ctx.op_name, "theta")[0]
                grad_x = theta * row_factor(grad_out, theta.dim()).to(theta.dtype)
            grad_x = grad_x.sum_to_size(x_shape)
        if needs[0]:
            grad_theta = scale_saved(ctx, grad, grad_out)
        if needs[2]:
            if grad_lv is None:
                raise RuntimeError(
                    "vae_fast.elementwise_log_prob: call with want_logvar_grad=True to differentiate w.r.t. logvar")
            factor = row_factor(grad_out / ctx.expected_upstream, grad_lv.dim()).to(grad_lv.dtype)
            grad_logvar = (grad_lv * factor).sum_to_size(lv_shape)
        return grad_theta, grad_x, grad_logvar, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return loop_vmap(torch.ops.vae_fast.elementwise_log_prob.default)(info, in_dims, *args)


register_op(
    "elementwise_log_prob",
    "(Tensor theta, Tensor x, Tensor? logvar, int likelihood, int lead_ndim, bool want_grad, bool want_logvar_grad, "
    "float expected_upstream=1.0) -> (Tensor, Tensor, Tensor, Tensor)",
    _elementwise_kernel, _elementwise_fake, ElementwiseLogProb)


def elementwise_log_prob(theta, x, logvar, likelihood: int, lead_ndim: int, expected_upstream: float) -> torch.Tensor:
    """log p(x | theta) of shape theta.shape[:lead_ndim]; raises ValueError for x outside the support."""
    grad_mode = torch.is_grad_enabled()
    want_grad = grad_mode and (theta.requires_grad or (likelihood == Likelihood.GAUSSIAN and x.requires_grad))
    want_lv = grad_mode and logvar is not None and logvar.requires_grad
    log_prob, _, _, num_invalid = ElementwiseLogProb.apply(theta, x, logvar, int(likelihood), lead_ndim, want_grad,
                                                           want_lv, expected_upstream)
    if likelihood != Likelihood.GAUSSIAN:
        raise_if_invalid(num_invalid, f"x must lie in [0, 1] for the {Likelihood(likelihood).name.lower()} likelihood")
    return log_prob


# ---------------------------------------------------------------------------------------------
# Categorical
# ---------------------------------------------------------------------------------------------


def _categorical_kernel(logits, target, lead_ndim, want_grad, expected_upstream=1.0):
    lead_shape = logits.shape[:lead_ndim]
    rows = math.prod(lead_shape)
    pixels = math.prod(target.shape[1:])
    logits3 = logits.reshape(rows, pixels, logits.shape[-1]).contiguous()
    log_prob, grad, bad = kernels_for(logits3).categorical_log_prob(
        logits3, target.to(torch.int64).reshape(target.shape[0], pixels).contiguous(), want_grad, expected_upstream)
    return log_prob.view(lead_shape), None if grad is None else with_shape(grad, logits.shape), bad


def _categorical_fake(logits, target, lead_ndim, want_grad, expected_upstream=1.0):
    grad = logits.new_empty(logits.shape) if want_grad else logits.new_empty(0)
    return (logits.new_empty(logits.shape[:lead_ndim], dtype=acc_dtype(logits.dtype)), grad,
            logits.new_empty((), dtype=torch.int64))


class CategoricalLogProb(torch.autograd.Function):
    """``torch.ops.vae_fast.categorical_log_prob`` with its autograd."""

    @staticmethod
    def forward(logits, target, lead_ndim, want_grad, expected_upstream=1.0):
        return call(torch.ops.vae_fast.categorical_log_prob.default, _categorical_kernel, logits, target, lead_ndim,
                    want_grad, expected_upstream)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, lead_ndim, want_grad = inputs[:4]
        _, grad, num_invalid = output
        mark_non_differentiable(ctx, grad, num_invalid)
        ctx.set_materialize_grads(False)
        ctx.op_name = "categorical_log_prob"
        ctx.expected_upstream = inputs[4] if len(inputs) > 4 else 1.0
        ctx.inplace_backward = config.INPLACE_BACKWARD.get()
        ctx.lead_ndim = lead_ndim
        ctx.inputs = InputRefs((logits, target), strong=config.SAVE_INPUTS.get())
        ctx.save_for_backward(grad if want_grad else None)

    @staticmethod
    def backward(ctx, grad_out, _grad_logits=None, _num_invalid=None):
        if grad_out is None or not ctx.needs_input_grad[0]:
            return (None,) * 5
        if torch.is_grad_enabled():
            logits, target = ctx.inputs.get(ctx.op_name, "the decoder output (logits)")
            fn = lambda lg: ref.categorical_log_prob(lg, target.expand(lg.shape[:-1]), batch_dims=ctx.lead_ndim)  # noqa: E731
            (grad_logits,) = differentiable_backward(ctx.op_name, fn, [logits], [True], (grad_out,))
            return grad_logits, None, None, None, None
        (grad,) = saved_gradients(ctx)
        if grad is None:
            raise RuntimeError("vae_fast.categorical_log_prob: call with want_grad=True to differentiate w.r.t. logits")
        return scale_saved(ctx, grad, grad_out), None, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return loop_vmap(torch.ops.vae_fast.categorical_log_prob.default)(info, in_dims, *args)


register_op(
    "categorical_log_prob",
    "(Tensor logits, Tensor target, int lead_ndim, bool want_grad, float expected_upstream=1.0) -> (Tensor, Tensor, Tensor)",
    _categorical_kernel, _categorical_fake, CategoricalLogProb)


def categorical_log_prob(logits, target, lead_ndim: int, expected_upstream: float) -> torch.Tensor:
    """log p(target | logits) of shape logits.shape[:lead_ndim]; raises ValueError for targets outside [0, C)."""
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    log_prob, _, num_invalid = CategoricalLogProb.apply(logits, target, lead_ndim, want_grad, expected_upstream)
    raise_if_invalid(num_invalid, f"x must hold class indices in [0, {logits.shape[-1]})")
    return log_prob
