"""Reconstruction log-likelihood ops with the gradient computed in the forward pass.

Op schemas (``torch.ops.vae_fast``), theta (B, *event) or (K, B, *event) (``lead_ndim`` 1 or 2),
x (B, *event), logvar broadcastable to theta::

    elementwise_log_prob(theta, x, logvar?, likelihood, lead_ndim, want_grad, want_logvar_grad,
                         expected_upstream=1.0)      [logvar: the Gaussian's log-variance, the Laplace's log-scale]
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

import functools
import math

import torch

from .._validation import STRIDED, raise_if_invalid
from ._autograd import (eager_function_apply, fast_apply, mark_non_differentiable,
                        row_factor, saved_and_inputs, save_for_jvp, scale_saved, setup_saved_gradient,
                        setup_step_gradient, step_ctx_constants, tangent_sum)
from ._library import (acc_dtype, call, inverse_permutation, kernels_for, register_op, step_kernels_for, with_layout,
                       with_shape)
from .codes import Likelihood


def _logvar_grad_shape(theta_shape, lead_ndim: int, logvar_shape) -> tuple:
    """Shape of grad_logvar: per row (theta's lead dims) and, over the event dims, logvar's own
    extent (1 where it broadcasts: a learned scalar keeps one value per row, not D)."""
    full = (1,) * (len(theta_shape) - len(logvar_shape)) + tuple(logvar_shape)
    return tuple(theta_shape[:lead_ndim]) + full[lead_ndim:]


def _logvar_grad_per_row(theta_shape, lead_ndim: int, logvar_shape) -> bool:
    """Whether the kernel writes grad_logvar as each row's sum (unscaled, accumulation dtype; see
    kernels/protocol.py) rather than per element: a logvar without extent over the event dims (a learned scalar,
    a per-example one), whose gradient is that sum; backward then multiplies the rows by the upstream gradient."""
    return math.prod(_logvar_grad_shape(theta_shape, lead_ndim, logvar_shape)[lead_ndim:]) == 1


def _as_rows(t: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """t as a contiguous (rows, dim) tensor; t itself when it already is one (a reshape costs a view
    per call, which matters at 128 x 784)."""
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] != dim:
        t = t.reshape(rows, dim)
    return t.contiguous()


# channels-last layouts by dim count: (memory format, the dim order that makes such a tensor contiguous)
_CHANNELS_LAST = {4: (torch.channels_last, (0, 2, 3, 1)), 5: (torch.channels_last_3d, (0, 2, 3, 4, 1))}


def channels_last_order(theta: torch.Tensor, x: torch.Tensor, lead_ndim: int) -> tuple[int, ...] | None:
    """The dim order in which a channels-last ``theta`` (B, C, *spatial) is contiguous, (0, *spatial dims, 1), for a
    call with one lead dim and x of theta's shape whose theta is channels-last and not also contiguous (a conv
    decoder run in ``torch.channels_last``); else None. The elementwise ops then run on the permuted (contiguous)
    operands, so nothing is copied for a channels-last theta and x, and hand back theta's gradient channels-last,
    as torch's elementwise ops do (the fake implementation gives the same strides)."""
    layout = _CHANNELS_LAST.get(theta.dim()) if lead_ndim == 1 else None
    if layout is None or theta.is_contiguous() or not theta.is_contiguous(memory_format=layout[0]) \
            or x.shape != theta.shape:
        return None
    return layout[1]


def _permuted_logvar(logvar, order, ndim: int):
    """logvar (broadcastable to theta) in theta's permuted dim order, contiguous (its own size: a broadcast copy of
    a strided permutation would be theta-sized)."""
    aligned = logvar.reshape((1,) * (ndim - logvar.dim()) + tuple(logvar.shape))
    return aligned.permute(order).contiguous()


def _elementwise_kernel(theta, x, logvar, likelihood, lead_ndim, want_grad, want_logvar_grad, expected_upstream=1.0):
    order = channels_last_order(theta, x, lead_ndim)
    if order is not None:  # run on the contiguous permutation; hand the gradients back in theta's layout
        inverse = inverse_permutation(order)
        lv = None if logvar is None else _permuted_logvar(logvar, order, theta.dim())
        log_prob, grad, grad_lv, bad = _elementwise_kernel(theta.permute(order), x.permute(order), lv, likelihood, 1,
                                                           want_grad, want_logvar_grad, expected_upstream)
        if grad is not None:
            grad = with_layout(grad, grad.permute(inverse))
        if grad_lv is not None:
            grad_lv = grad_lv.permute(inverse)
        return log_prob, grad, grad_lv, bad
    shape = theta.shape
    if len(shape) == 2 and lead_ndim == 1 and x.shape == shape and x.dtype == theta.dtype and theta.is_contiguous() \
            and x.is_contiguous():  # (B, D) operands as the kernels take them: the per-step call of an MLP decoder
        theta2, x2, (rows, dim) = theta, x, shape
    else:
        rows = math.prod(shape[:lead_ndim])
        dim = math.prod(shape[lead_ndim:])
        theta2 = _as_rows(theta, rows, dim)
        x2 = _as_rows(x if x.dtype == theta.dtype else x.to(theta.dtype), x.shape[0], dim)
    lv2 = None if logvar is None else logvar.to(theta.dtype).expand(shape).reshape(rows, dim)
    want_lv = want_logvar_grad and logvar is not None
    lv_per_row = want_lv and _logvar_grad_per_row(shape, lead_ndim, logvar.shape)
    if lv_per_row and lv2.stride(1) != 0:  # (dim 1: the kernels read a row-constant logvar with column stride 0)
        lv2 = lv2.as_strided((rows, dim), (lv2.stride(0), 0))
    log_prob, grad, grad_lv, bad = kernels_for(theta2).elementwise_log_prob(
        theta2, x2, lv2, likelihood, want_grad, want_lv, expected_upstream, lv_per_row)
    if grad is not None and theta2 is not theta:
        grad = with_shape(grad, shape)
    if grad_lv is not None:
        lv_grad_shape = _logvar_grad_shape(shape, lead_ndim, logvar.shape)
        grad_lv = grad_lv.view(lv_grad_shape) if lv_per_row else grad_lv.view(shape).sum_to_size(lv_grad_shape)
    return (log_prob if lead_ndim == 1 else with_shape(log_prob, shape[:lead_ndim])), grad, grad_lv, bad


def _elementwise_fake(theta, x, logvar, likelihood, lead_ndim, want_grad, want_logvar_grad, expected_upstream=1.0):
    order = channels_last_order(theta, x, lead_ndim)  # (the gradients' strides as the kernel path gives them)
    if order is None:
        grad = theta.new_empty(theta.shape) if want_grad else theta.new_empty(0)
    elif want_grad:  # (contiguous in the permuted order, as the kernel path writes it)
        permuted = theta.permute(order)
        grad = permuted.new_empty(permuted.shape).permute(inverse_permutation(order))
    else:
        grad = theta.new_empty(0)
    if want_logvar_grad and logvar is not None:
        per_row = _logvar_grad_per_row(theta.shape, lead_ndim, logvar.shape)
        lv_dtype = acc_dtype(theta.dtype) if per_row else theta.dtype
        if order is None or per_row:
            grad_lv = theta.new_empty(_logvar_grad_shape(theta.shape, lead_ndim, logvar.shape), dtype=lv_dtype)
        else:
            permuted_lv = _permuted_logvar(logvar, order, theta.dim())
            permuted_shape = _logvar_grad_shape(theta.permute(order).shape, 1, permuted_lv.shape)
            grad_lv = theta.new_empty(permuted_shape, dtype=lv_dtype).permute(inverse_permutation(order))
    else:
        grad_lv = theta.new_empty(0)
    log_prob = theta.new_empty(theta.shape[:lead_ndim], dtype=acc_dtype(theta.dtype))
    return log_prob, grad, grad_lv, theta.new_empty((), dtype=torch.int64)


# logits whose x must lie in [0, 1] and whose d/dx is theta itself
_LOGIT_FAMILY = (Likelihood.BERNOULLI, Likelihood.CONTINUOUS_BERNOULLI)
_SCALE_FAMILY = (Likelihood.GAUSSIAN, Likelihood.LAPLACE)  # (their scale operand: log-variance, log-scale)


def _continuous_bernoulli_dlog_norm(logits):
    """d/dl log C(l) = 1/l - 1/sinh(l) for C = l / tanh(l / 2), by its series l/6 - 7 l^3/360 near 0
    (both branches finite, so autograd through the select stays finite)."""
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)
    return torch.where(small, logits / 6 - 7 * logits ** 3 / 360, 1 / safe - 1 / torch.sinh(safe))


def _elementwise_derivatives(likelihood: int, theta, x, logvar, lead_ndim: int):
    """(d log p / d theta, d log p / d x, d log p / d logvar) per element, in differentiable torch
    ops: the create_graph / torch.func path of backward (the kernels give the first-order values)."""
    x = x.to(theta.dtype)
    if likelihood == Likelihood.MEAN_SQUARED_ERROR:  # -1/D sum (x - mean)^2 over the event
        d_mean = (x - theta) * (2.0 / max(math.prod(theta.shape[lead_ndim:]), 1))
        return d_mean, -d_mean, None
    if likelihood == Likelihood.GAUSSIAN:
        inv_var = torch.exp(-logvar.to(theta.dtype))
        d_mean = (x - theta) * inv_var
        return d_mean, -d_mean, 0.5 * ((x - theta) ** 2 * inv_var - 1)
    if likelihood == Likelihood.LAPLACE:  # logvar holds the log-scale s = log b
        inv_b = torch.exp(-logvar.to(theta.dtype))
        d_mean = torch.sign(x - theta) * inv_b
        return d_mean, -d_mean, (x - theta).abs() * inv_b - 1
    d_theta = x - torch.sigmoid(theta)
    if likelihood == Likelihood.CONTINUOUS_BERNOULLI:
        d_theta = d_theta + _continuous_bernoulli_dlog_norm(theta)
    return d_theta, theta, None


def _per_row_logvar_grad(row_sums: torch.Tensor, grad_out: torch.Tensor, lv_shape) -> torch.Tensor:
    """d loss / d logvar from each row's unscaled d log p / d logvar (``row_sums``, theta's lead dims then ones)
    and the upstream gradient per row: one dot product for a 0-d logvar (a learned scalar: about 3 us less than
    checking the upstream and reducing a scaled copy), else the product summed to logvar's shape."""
    upstream = grad_out if grad_out.dtype == row_sums.dtype else grad_out.to(row_sums.dtype)
    if not lv_shape:  # (the step path's row sums and upstream are 1-D already: a reshape costs 0.7 us)
        return torch.dot(row_sums if row_sums.dim() == 1 else row_sums.reshape(-1),
                         upstream if upstream.dim() == 1 else upstream.reshape(-1))
    return (row_sums * row_factor(upstream, row_sums.dim())).sum_to_size(lv_shape)


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
        ctx.likelihood, ctx.lead_ndim = likelihood, lead_ndim
        ctx.shapes = (theta.shape, x.shape, None if logvar is None else logvar.shape)
        ctx.logvar_per_row = logvar is not None and _logvar_grad_per_row(theta.shape, lead_ndim, logvar.shape)
        # d/dx of the Bernoulli family is theta itself: keep it when x needs a gradient
        setup_saved_gradient(ctx, "elementwise_log_prob", inputs, 7,
                             (grad if want_grad else None, grad_lv if want_lv and logvar is not None else None),
                             (theta, x, logvar), keep_inputs=x.requires_grad and likelihood in _LOGIT_FAMILY)
        save_for_jvp(ctx, theta, x, logvar)

    @staticmethod
    def backward(ctx, grad_out, _grad_theta=None, _grad_logvar=None, _num_invalid=None):
        if grad_out is None:
            return (None,) * 8
        needs = ctx.needs_input_grad
        theta_shape, x_shape, lv_shape = ctx.shapes
        double = torch.is_grad_enabled()  # create_graph=True: recompute in differentiable torch ops
        want_theta = needs[1] and ctx.likelihood in _LOGIT_FAMILY
        (grad, grad_lv), inputs = saved_and_inputs(ctx, "the decoder output (theta)", double or want_theta)
        if double:
            theta, x, logvar = inputs
            if logvar is None and ctx.likelihood in _SCALE_FAMILY:  # a fixed scale given as a float (the step path)
                logvar = theta.new_full((), ctx.fixed_scale)
            d_theta, d_x, d_lv = _elementwise_derivatives(ctx.likelihood, theta, x, logvar, ctx.lead_ndim)
            upstream = row_factor(grad_out, theta.dim()).to(theta.dtype)
            grad_theta = (d_theta * upstream).sum_to_size(theta_shape) if needs[0] else None
            grad_x = (d_x * upstream).sum_to_size(x_shape) if needs[1] else None
            grad_logvar = (d_lv * upstream).sum_to_size(lv_shape) if needs[2] else None
            return grad_theta, grad_x, grad_logvar, None, None, None, None, None
        if (needs[0] or needs[1]) and grad is None and not (needs[1] and ctx.likelihood in _LOGIT_FAMILY):
            raise RuntimeError("vae_fast.elementwise_log_prob: call with want_grad=True to differentiate w.r.t. theta")
        grad_theta = grad_x = grad_logvar = None
        if needs[1]:
            if ctx.likelihood not in _LOGIT_FAMILY:  # Gaussian, mean squared error, Laplace: d/dx = -d/dmean
                grad_x = -(grad * row_factor(grad_out / ctx.expected_upstream, grad.dim()).to(grad.dtype))
            else:  # d/dx [x l - softplus(l) (+ log C(l))] = l
                theta = inputs[0]
                grad_x = theta * row_factor(grad_out, theta.dim()).to(theta.dtype)
            grad_x = grad_x.sum_to_size(x_shape)
        if needs[0]:
            grad_theta = scale_saved(ctx, grad, grad_out)
        if needs[2]:
            if grad_lv is None:
                raise RuntimeError(
                    "vae_fast.elementwise_log_prob: call with want_logvar_grad=True to differentiate w.r.t. logvar")
            if ctx.logvar_per_row:
                grad_logvar = _per_row_logvar_grad(grad_lv, grad_out, lv_shape)
            else:
                grad_logvar = scale_saved(ctx, grad_lv, grad_out).sum_to_size(lv_shape)
        return grad_theta, grad_x, grad_logvar, None, None, None, None, None


def _elementwise_jvp(ctx, tangent_theta, tangent_x, tangent_logvar, *_):
    """:class:`ElementwiseLogProb`'s forward-mode AD (torch.func.jvp / jacfwd / hessian, dual tensors; see
    ``fast_apply``): sum over the event dims of d log p / d input * tangent, by the closed forms of the
    create_graph path."""
    theta, x, logvar = ctx.saved_tensors
    d_theta, d_x, d_lv = _elementwise_derivatives(ctx.likelihood, theta, x, logvar, ctx.lead_ndim)
    per_element = tangent_sum(((d_theta, tangent_theta), (d_x, tangent_x), (d_lv, tangent_logvar)), theta)
    return per_element.sum(dim=tuple(range(ctx.lead_ndim, theta.dim()))).to(acc_dtype(theta.dtype)), None, None, None


register_op(
    "elementwise_log_prob",
    "(Tensor theta, Tensor x, Tensor? logvar, int likelihood, int lead_ndim, bool want_grad, bool want_logvar_grad, "
    "float expected_upstream=1.0) -> (Tensor, Tensor, Tensor, Tensor)",
    _elementwise_kernel, _elementwise_fake, ElementwiseLogProb)


_apply_elementwise = fast_apply(ElementwiseLogProb, _elementwise_kernel, eager_outputs=(0, 3),  # log_prob, num_invalid
                                jvp=_elementwise_jvp)


class ElementwiseStep(torch.autograd.Function):
    """The per-step call of :class:`ElementwiseLogProb` (see :func:`elementwise_step`) through the backend's
    step kernel: forward(theta, x, scale, (kernels, theta.shape, B, B * D, likelihood, want_grad, want_scale_grad,
    expected_upstream))
    -> log_prob (B,), raising ValueError itself for x outside the support, with ctx holding what
    ``ElementwiseLogProb.setup_context`` holds; backward *is* ``ElementwiseLogProb.backward`` (one
    autograd implementation; its gradients beyond (theta, x, scale, plan) are None). ``scale``: None, a fixed
    log-variance / log-scale given as a float (kept in ctx as ``fixed_scale`` for double backward), or a 0-d tensor,
    fixed or learned (the kernel then writes each row's d log p / d scale, unscaled, which backward multiplies by the
    upstream gradient: a dot product)."""

    @staticmethod
    def forward(ctx, theta, x, scale, plan):
        kernels, shape, rows, elements, likelihood, want_grad, want_scale_grad, expected_upstream = plan
        log_prob, grad, grad_scale, num_invalid = kernels.elementwise_step_log_prob(
            theta, x, scale, rows, elements, likelihood, want_grad, want_scale_grad, expected_upstream)
        if num_invalid:
            raise_if_invalid(num_invalid, SUPPORT_MESSAGES[likelihood])
        ctx.likelihood = likelihood  # (x has theta's shape)
        if scale is None or type(scale) is float:
            ctx.shapes = (shape, shape, None)
            if scale is not None:
                ctx.fixed_scale = scale
                scale = None
        else:
            ctx.shapes = (shape, shape, _SCALAR_SHAPE)
        setup_step_gradient(ctx, expected_upstream, (grad, grad_scale), (theta, x, scale),
                            x.requires_grad and likelihood in _LOGIT_FAMILY)
        return log_prob

    backward = staticmethod(ElementwiseLogProb.backward)


_SCALAR_SHAPE = torch.Size(())
# (a 0-d scale's gradient is per row)
step_ctx_constants(ElementwiseStep, op_name="elementwise_log_prob", num_saved=2, lead_ndim=1, logvar_per_row=True)


_apply_elementwise_step = eager_function_apply(ElementwiseStep)
# a learned scale is usually a module's nn.Parameter (LDM's ``self.logvar``): a plain tensor to the kernels
_PLAIN_SCALE_TYPES = (torch.Tensor, torch.nn.Parameter)


def elementwise_step(theta, x, scale, likelihood: int, reduction: str, expected_upstream: float | None
                     ) -> torch.Tensor | None:
    """:func:`elementwise_log_prob` (theta, x, scale, likelihood, 1, expected_upstream) of the per-step call,
    through the backend's step kernel; None when the call does not qualify (the caller then checks its arguments
    and uses :func:`elementwise_log_prob`). ``expected_upstream`` None: the public functions' guess for
    ``reduction`` (:func:`default_expected_upstream`).

    The call qualifies when it is plain eager (see :func:`step_kernels_for`), theta and x are plain dense CPU
    tensors of one step dtype and one shape (B, ...) with B > 0, both contiguous (an MLP's (B, D) logits, a conv
    decoder's (B, C, H, W)) or both channels-last with the same strides (each example's D elements are then one
    contiguous block too, in another order, which a row sum does not see; the gradient is allocated like theta),
    ``scale`` is None (Bernoulli, continuous Bernoulli, mean squared error), a float or an int (a fixed Gaussian
    log-variance / Laplace log-scale, passed on as a float) or a plain 0-d CPU tensor of theta's dtype (fixed, or
    learned as in the LDM / Stable Diffusion autoencoder), and the backend has a step kernel for them. The tests
    are attribute reads, none repeated, and the functional layer makes none before them (this runs on every call
    of a training step: each read costs 0.02-0.09 us here, each Python call about 0.1)."""
    try:
        if not (type(theta) is torch.Tensor and type(x) is torch.Tensor and theta.layout is STRIDED
                and x.layout is STRIDED and x.is_cpu and (shape := theta.shape) == x.shape and shape
                and (rows := shape[0]) > 0 and x.dtype == theta.dtype
                and ((theta.is_contiguous() and x.is_contiguous())
                     or (channels_last_order(theta, x, 1) is not None and x.stride() == theta.stride()))):
            return None
    except RuntimeError:  # a nested tensor's shape (see _validation.STRIDED)
        return None
    if type(scale) is int:  # (a bool is no number here: the general path rejects it)
        scale = float(scale)
    tensor_scale = scale is not None and type(scale) is not float
    if tensor_scale and not (type(scale) in _PLAIN_SCALE_TYPES and scale.dim() == 0 and scale.dtype == theta.dtype
                             and scale.is_cpu and scale.layout is STRIDED):
        return None
    kernels = step_kernels_for(theta, (elements := theta.numel()) + rows)  # (also: theta's dtype has a step kernel)
    if kernels is None:
        return None
    if torch.is_grad_enabled():
        want_grad = theta.requires_grad or (likelihood not in _LOGIT_FAMILY and x.requires_grad)
        want_scale_grad = tensor_scale and scale.requires_grad
    else:
        want_grad = want_scale_grad = False
    if expected_upstream is None:  # (default_expected_upstream, inline: a call costs more than the rule; rows > 0)
        expected_upstream = -1.0 if reduction == "sum" else -1.0 / rows
    return _apply_elementwise_step(theta, x, scale, (kernels, shape, rows, elements, likelihood, want_grad,
                                                     want_scale_grad, expected_upstream))


def elementwise_log_prob(theta, x, logvar, likelihood: int, lead_ndim: int, expected_upstream: float) -> torch.Tensor:
    """log p(x | theta) of shape theta.shape[:lead_ndim]; raises ValueError for x outside the support."""
    grad_mode = torch.is_grad_enabled()
    want_grad = grad_mode and (theta.requires_grad or (likelihood not in _LOGIT_FAMILY and x.requires_grad))
    want_lv = grad_mode and logvar is not None and logvar.requires_grad
    log_prob, _, _, num_invalid = _apply_elementwise(theta, x, logvar, int(likelihood), lead_ndim, want_grad,
                                                           want_lv, expected_upstream)
    # (raise_if_invalid skips the check under torch.compile; the message lookup would guard the graph on the dict)
    if not torch.compiler.is_compiling():
        raise_if_invalid(num_invalid, SUPPORT_MESSAGES[likelihood])
    return log_prob


# x outside each elementwise likelihood's support, by code (made once: an f-string with the enum's name cost a
# microsecond per call); the fused heads raise the same
SUPPORT_MESSAGES = {code: f"x must lie in [0, 1] for the {Likelihood(code).name.lower()} likelihood"
                     if code in _LOGIT_FAMILY else f"x must not hold NaN for the {Likelihood(code).name.lower()} likelihood"
                     for code in Likelihood}


# ---------------------------------------------------------------------------------------------
# Categorical
# ---------------------------------------------------------------------------------------------


def _categorical_kernel(logits, target, lead_ndim, want_grad, expected_upstream=1.0):
    lead_shape = logits.shape[:lead_ndim]
    rows = math.prod(lead_shape)
    pixels = math.prod(target.shape[1:])
    logits3 = logits.reshape(rows, pixels, logits.shape[-1]).contiguous()
    if target.dtype != torch.uint8:  # (uint8, 8-bit pixels, is read as it is: no int64 copy)
        target = target.to(torch.int64)
    log_prob, grad, bad = kernels_for(logits3).categorical_log_prob(
        logits3, target.reshape(target.shape[0], pixels).contiguous(), want_grad, expected_upstream)
    return with_shape(log_prob, lead_shape), None if grad is None else with_shape(grad, logits.shape), bad


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
        ctx.lead_ndim = lead_ndim
        setup_saved_gradient(ctx, "categorical_log_prob", inputs, 4, (grad if want_grad else None,), (logits, target))
        save_for_jvp(ctx, logits, target)

    @staticmethod
    def backward(ctx, grad_out, _grad_logits=None, _num_invalid=None):
        if grad_out is None or not ctx.needs_input_grad[0]:
            return (None,) * 5
        double = torch.is_grad_enabled()
        (grad,), inputs = saved_and_inputs(ctx, "the decoder output (logits)", double)
        if double:  # d log softmax(l)[t] / d l = onehot(t) - softmax(l), differentiable
            logits, target = inputs
            classes = logits.shape[-1]
            onehot = torch.nn.functional.one_hot(target.long().clamp(0, classes - 1), classes).to(logits.dtype)
            d_logits = onehot - torch.softmax(logits, dim=-1)
            return (d_logits * row_factor(grad_out, logits.dim()).to(logits.dtype), None, None, None, None)
        if grad is None:
            raise RuntimeError("vae_fast.categorical_log_prob: call with want_grad=True to differentiate w.r.t. logits")
        return scale_saved(ctx, grad, grad_out), None, None, None, None


def _categorical_jvp(ctx, tangent_logits, *_):
    """:class:`CategoricalLogProb`'s forward-mode AD (see ``fast_apply``): sum over the pixels of
    tangent[target] - sum_c softmax(l)_c tangent_c."""
    logits, target = ctx.saved_tensors
    dtype = acc_dtype(logits.dtype)
    if tangent_logits is None:  # (zeros: torch.func wants a tangent for every differentiable output)
        return logits.new_zeros(logits.shape[:ctx.lead_ndim], dtype=dtype), None, None
    tangent = tangent_logits.to(dtype)
    index = target.long().clamp(0, logits.shape[-1] - 1).expand(logits.shape[:-1]).unsqueeze(-1)
    per_pixel = tangent.gather(-1, index).squeeze(-1) - (torch.softmax(logits.to(dtype), dim=-1) * tangent).sum(-1)
    return per_pixel.sum(dim=tuple(range(ctx.lead_ndim, per_pixel.dim()))), None, None


register_op(
    "categorical_log_prob",
    "(Tensor logits, Tensor target, int lead_ndim, bool want_grad, float expected_upstream=1.0) -> (Tensor, Tensor, Tensor)",
    _categorical_kernel, _categorical_fake, CategoricalLogProb)


_apply_categorical = fast_apply(CategoricalLogProb, _categorical_kernel, eager_outputs=(0, 2),  # log_prob, num_invalid
                                jvp=_categorical_jvp)


def categorical_log_prob(logits, target, lead_ndim: int, expected_upstream: float) -> torch.Tensor:
    """log p(target | logits) of shape logits.shape[:lead_ndim]; raises ValueError for targets outside [0, C)."""
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    log_prob, _, num_invalid = _apply_categorical(logits, target, lead_ndim, want_grad, expected_upstream)
    if not torch.compiler.is_compiling():  # (raise_if_invalid skips the check there; dynamo warns on lru_cache)
        raise_if_invalid(num_invalid, categorical_support_message(logits.shape[-1]))
    return log_prob


@functools.lru_cache(maxsize=64)  # (made once per class count: an f-string costs a microsecond per call)
def categorical_support_message(classes: int) -> str:
    """The ValueError's text for class indices outside [0, classes) (the categorical likelihood's and the fused
    categorical head's)."""
    return f"x must hold class indices in [0, {classes})"


class CategoricalStep(torch.autograd.Function):
    """The per-step call of :class:`CategoricalLogProb` (see :func:`categorical_step`): forward(logits, target,
    (kernels, B, C, want_grad, expected_upstream)) -> log_prob (B,), raising ValueError itself for targets outside
    [0, C), with ctx holding what ``CategoricalLogProb.setup_context`` holds; backward *is*
    ``CategoricalLogProb.backward``."""

    @staticmethod
    def forward(ctx, logits, target, plan):
        kernels, rows, classes, want_grad, expected_upstream = plan
        log_prob, grad, num_invalid = kernels.categorical_step_log_prob(logits, target, rows, classes, want_grad,
                                                                        expected_upstream)
        if num_invalid:
            raise_if_invalid(num_invalid, categorical_support_message(classes))
        setup_step_gradient(ctx, expected_upstream, (grad,), (logits, target))
        return log_prob

    backward = staticmethod(CategoricalLogProb.backward)


step_ctx_constants(CategoricalStep, op_name="categorical_log_prob", num_saved=1, lead_ndim=1)


_apply_categorical_step = eager_function_apply(CategoricalStep)


def categorical_step(logits, target, reduction: str, expected_upstream: float | None) -> torch.Tensor | None:
    """:func:`categorical_log_prob` (logits, target, 1, expected_upstream) of the per-step call through the
    backend's step kernel; None when the call does not qualify (the caller then checks its arguments and uses
    :func:`categorical_log_prob`). ``expected_upstream`` None: the public functions' guess for ``reduction``.

    The call qualifies when it is plain eager (see :func:`step_kernels_for`), logits (B, *pixels, C) and an int64
    or uint8 target (B, *pixels) are plain dense contiguous CPU tensors with B > 0 and C > 0, and the backend has a
    step kernel for logits' dtype; the gradient buffer comes from the backend's buffer pool when it is large (a
    256-way image likelihood's is). The tests are attribute reads in one expression, as in
    :func:`elementwise_step`."""
    try:
        if not (type(logits) is torch.Tensor and type(target) is torch.Tensor
                and ((dtype := target.dtype) == torch.int64 or dtype == torch.uint8) and target.is_cpu
                and logits.layout is STRIDED and target.layout is STRIDED
                and len(shape := logits.shape) > 1 and shape[:-1] == target.shape
                and (rows := shape[0]) > 0 and (classes := shape[-1]) > 0
                and logits.is_contiguous() and target.is_contiguous()):
            return None
    except RuntimeError:  # a nested tensor's shape (see _validation.STRIDED)
        return None
    kernels = step_kernels_for(logits, 0)  # (also: logits' dtype has a step kernel)
    if kernels is None:
        return None
    if expected_upstream is None:  # (default_expected_upstream, inline: a call costs more than the rule; rows > 0)
        expected_upstream = -1.0 if reduction == "sum" else -1.0 / rows
    return _apply_categorical_step(logits, target, (kernels, rows, classes,
                                                    torch.is_grad_enabled() and logits.requires_grad, expected_upstream))
