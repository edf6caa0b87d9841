"""CPU backend: hands raw pointers, sizes and strides to the C++ kernels in vae_fast._C.

Inputs arrive prepared by :mod:`vae_fast.ops` (contiguous, or 2-D with unit column stride where a
kernel reads row strides; one floating dtype; priors/log-variances expanded to 2-D views). float16/bfloat16 are computed in
float32; gradients and z are written back in the input dtype, reductions (log-likelihoods,
KL) stay float32.
"""
from __future__ import annotations

import math

import torch

from .._backend import cpu_extension
from ..ops.codes import TargetDtype

_C = cpu_extension()
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}
# the class indices' dtypes the categorical kernels read as they are (csrc/bindings.cpp: categorical's target_code)
_TARGET_DTYPE_CODE = {torch.int64: int(TargetDtype.INT64), torch.uint8: int(TargetDtype.UINT8)}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _DTYPE_CODE else torch.float32


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _extent(t: torch.Tensor | None) -> int:
    """Elements the buffer behind ``t`` holds from ``t.data_ptr()`` on; the C++ side checks that no
    kernel touches more (it never trusts the sizes and strides it is handed)."""
    if t is None:
        return 0
    if t.is_contiguous():  # holds at least numel() elements; cheaper than asking the storage
        return t.numel()
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


_NO_OPERAND = (0, 0, 0)


def _strided(t: torch.Tensor | None) -> tuple[int, int, int]:
    if t is None:
        return _NO_OPERAND
    strides = t.stride()  # (t.stride() is 4x cheaper than two t.stride(d) calls)
    return (t.data_ptr(), strides[0], strides[1])


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _cast_strided(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """:func:`_cast` of a 2-D operand the kernels read through its strides (a log-variance, a prior): a dim it
    is broadcast along (stride 0) stays broadcast, where a plain cast would copy it out (the per-row log-variance
    gradient needs the row-constant layout, column stride 0)."""
    if t is None or t.dtype == dtype:
        return t
    row_stride, col_stride = t.stride()
    return t[:1 if row_stride == 0 else None, :1 if col_stride == 0 else None].to(dtype).expand(t.shape)


_POOL_MIN_BYTES = 4 << 20


def _new_output(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """An uninitialised contiguous buffer of ``t``'s dtype and ``shape`` (default ``t``'s) for a kernel to fill.

    Buffers of 4 MiB and more come from the extension's buffer pool (csrc/buffer_pool.h): mapped
    once, on transparent huge pages, and reused after torch frees them, so a training step does
    not pay again for faulting in and zeroing its multi-megabyte outputs (glibc maps every
    allocation above 32 MiB afresh). See :func:`vae_fast.release_buffer_cache`.
    """
    elements = math.prod(shape) if shape else t.numel()
    if elements * t.element_size() >= _POOL_MIN_BYTES and t.dtype in _DTYPE_CODE:
        return torch.from_dlpack(_C.pooled_tensor(_DTYPE_CODE[t.dtype], list(shape or t.shape)))
    if not shape:  # (t's own shape: 0.8 us; new_empty(*t.shape) costs 1.2)
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return t.new_empty(*shape)  # (ints: 0.8 us; a torch.Size argument costs 1.5 us, a tuple 1.1)


new_output = _new_output  # for the op layer's own output buffers (ops/dmol.py)


def _to(outs, dtype, keep: int = 0):
    """outs cast to ``dtype`` except the first ``keep`` of them (reductions stay in float32)."""
    return tuple(o if i < keep or o is None or isinstance(o, int) else o.to(dtype) for i, o in enumerate(outs))


_NO_PRIOR_OR_NOISE = ((0, 0, 0, 0, 0, 0, 0), (0, 0, 0))


def _prior_and_noise(prior_mu, prior_logvar, eps) -> tuple[tuple, tuple]:
    """The latent kernels' optional operands: ((pointer, row stride, column stride) of each prior tensor and
    eps's pointer, their extents); all zero for the per-step call, which has none of them."""
    if prior_mu is None and eps is None:
        return _NO_PRIOR_OR_NOISE
    return ((*_strided(prior_mu), *_strided(prior_logvar), _ptr(eps)),
            (_extent(prior_mu), _extent(prior_logvar), _extent(eps)))


def latent_forward(mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples, want_kl_per_dim,
                   want_log_ratio=False):
    out_dtype = mu.dtype
    dtype = _compute_dtype(out_dtype)
    if dtype != out_dtype:
        mu, scale, eps = (_cast(t, dtype) for t in (mu, scale, eps))
        prior_mu, prior_logvar = _cast_strided(prior_mu, dtype), _cast_strided(prior_logvar, dtype)
    batch, dim = mu.shape
    n = batch * dim  # mu, scale: unit column stride, any row stride; eps contiguous; outputs made here
    z = _new_output(mu, batch, dim) if num_samples == 1 else _new_output(mu, num_samples, batch, dim)
    kl = mu.new_empty(batch)
    kl_per_dim = mu.new_empty(batch, dim) if want_kl_per_dim else None
    log_ratio = mu.new_zeros(num_samples, batch) if want_log_ratio else None  # the kernel accumulates into it
    operands, extents = _prior_and_noise(prior_mu, prior_logvar, eps)
    _C.latent_forward(
        _DTYPE_CODE[dtype], param, batch, dim, num_samples, mu.data_ptr(), mu.stride()[0], scale.data_ptr(),
        scale.stride()[0], *operands, int(seed), 0, z.data_ptr(), kl.data_ptr(), _ptr(kl_per_dim), _ptr(log_ratio),
        torch.get_num_threads(),
        [_extent(mu), _extent(scale), *extents, num_samples * n, batch, n if want_kl_per_dim else 0,
         num_samples * batch if want_log_ratio else 0],
    )
    return (z.to(out_dtype) if dtype != out_dtype else z), kl, kl_per_dim, log_ratio


def latent_backward(mu, scale, prior_mu, prior_logvar, eps, seed, grad_z, grad_kl, grad_kl_per_dim, param,
                    num_samples, want_prior_grad):
    out_dtype = mu.dtype
    dtype = _compute_dtype(out_dtype)
    if dtype != out_dtype:
        mu, scale, eps, grad_z, grad_kl, grad_kl_per_dim = (
            _cast(t, dtype) for t in (mu, scale, eps, grad_z, grad_kl, grad_kl_per_dim))
        prior_mu, prior_logvar = _cast_strided(prior_mu, dtype), _cast_strided(prior_logvar, dtype)
    batch, dim = mu.shape
    n = batch * dim
    grad_mu = _new_output(mu, batch, dim)
    grad_scale = _new_output(mu, batch, dim)
    grad_pm = mu.new_empty(batch, dim) if want_prior_grad else None
    grad_plv = mu.new_empty(batch, dim) if want_prior_grad else None
    operands, extents = _prior_and_noise(prior_mu, prior_logvar, eps)
    _C.latent_backward(
        _DTYPE_CODE[dtype], param, batch, dim, num_samples, mu.data_ptr(), mu.stride()[0], scale.data_ptr(),
        scale.stride()[0], *operands, int(seed), 0, _ptr(grad_z), _ptr(grad_kl), _ptr(grad_kl_per_dim),
        grad_mu.data_ptr(), grad_scale.data_ptr(), _ptr(grad_pm), _ptr(grad_plv), torch.get_num_threads(),
        [_extent(mu), _extent(scale), *extents, _extent(grad_z), _extent(grad_kl), _extent(grad_kl_per_dim), n, n,
         n if want_prior_grad else 0, n if want_prior_grad else 0],
    )
    outs = (grad_mu, grad_scale, grad_pm, grad_plv)
    return _to(outs, out_dtype) if dtype != out_dtype else outs


def elementwise_log_prob(theta, x, logvar, likelihood, want_grad, want_logvar_grad, expected_upstream=1.0,
                         logvar_grad_per_row=False):
    out_dtype = theta.dtype
    dtype = _compute_dtype(out_dtype)
    if dtype != out_dtype:
        theta, x, logvar = _cast(theta, dtype), _cast(x, dtype), _cast_strided(logvar, dtype)
    rows, dim = theta.shape
    n = rows * dim
    log_prob = theta.new_empty(rows)
    grad = _new_output(theta, rows, dim) if want_grad else None
    per_row = bool(want_logvar_grad and logvar_grad_per_row)
    grad_lv = (theta.new_empty(rows) if per_row else _new_output(theta, rows, dim)) if want_logvar_grad else None
    bad = _C.elementwise_likelihood(
        _DTYPE_CODE[dtype], likelihood, rows, x.shape[0], dim, theta.data_ptr(), x.data_ptr(),
        *_strided(logvar), log_prob.data_ptr(), _ptr(grad), _ptr(grad_lv), per_row, float(expected_upstream),
        torch.get_num_threads(),
        [_extent(theta), _extent(x), _extent(logvar), rows, n if want_grad else 0, _extent(grad_lv)],
    )
    if dtype != out_dtype:  # half inputs: the gradients back in their dtype (per-row sums stay float32)
        grad = _cast(grad, out_dtype)
        if not per_row:
            grad_lv = _cast(grad_lv, out_dtype)
    return log_prob, grad, grad_lv, bad


def categorical_log_prob(logits, target, want_grad, expected_upstream=1.0):
    out_dtype = logits.dtype
    dtype = _compute_dtype(out_dtype)
    logits = _cast(logits, dtype)
    rows, pixels, classes = logits.shape
    log_prob = logits.new_empty((rows,))
    grad = _new_output(logits) if want_grad else None
    bad = _C.categorical(
        _DTYPE_CODE[dtype], rows, target.shape[0], pixels, classes, logits.data_ptr(), target.data_ptr(),
        _TARGET_DTYPE_CODE[target.dtype], log_prob.data_ptr(), _ptr(grad), float(expected_upstream),
        torch.get_num_threads(),
        [_extent(t) for t in (logits, target, log_prob, grad)],
    )
    outs = (log_prob, grad, bad)
    return _to(outs, out_dtype, keep=1) if dtype != out_dtype else outs


# ---------------------------------------------------------------------------------------------
# The per-step calls. A training step sends the same shapes every iteration: float32/float64 (B, Z)
# latents with unit column stride and no prior or explicit noise; contiguous (B, ...) likelihood
# operands with no log-variance operand or a scalar one (fixed or learned), outputs below the buffer pool's
# size; contiguous categorical logits with int64 targets and packed logistic-mixture parameters (whose
# gradients, megabytes at image sizes, come from the pool). The op layer's step paths (ops/latent.py,
# ops/likelihood.py, ops/dmol.py) check exactly that and call these, which skip the general entry points'
# casts, optional operands and views (about 3 us of Python a call at 128 x 20, 40 us for the packed
# mixture; the kernels and their C++ checks are the same).
# ---------------------------------------------------------------------------------------------

STEP_DTYPES = _DTYPE_CODE  # the dtypes the step entry points take ...
# ... and the latent and elementwise step outputs' size limit (they allocate with torch, not the pool; the
# heads' step functions allocate their gradients with _new_output and are asked with a limit of 0)
STEP_MAX_OUTPUT_BYTES = _POOL_MIN_BYTES


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """(row stride, extent) of a 2-D operand with unit column stride (callers test the contiguous case inline)."""
    return t.stride()[0], _extent(t)


def latent_step_forward(mu, scale, seed, param, num_samples, want_kl_per_dim):
    """:func:`latent_forward` without prior or eps (``seed``: an int): z ((B, Z) for K = 1, else (K, B, Z)), kl (B,), kl_per_dim | None."""
    batch, dim = mu.shape
    z = mu.new_empty(batch, dim) if num_samples == 1 else mu.new_empty(num_samples, batch, dim)
    kl = mu.new_empty(batch)
    kl_per_dim = mu.new_empty(batch, dim) if want_kl_per_dim else None
    n = batch * dim
    mu_rows = (dim, n) if mu.is_contiguous() else _rows(mu)  # (row stride, extent)
    scale_rows = (dim, n) if scale.is_contiguous() else _rows(scale)
    _C.latent_step_forward(_DTYPE_CODE[mu.dtype], param, batch, dim, num_samples, mu.data_ptr(), *mu_rows,
                           scale.data_ptr(), *scale_rows, seed, z.data_ptr(), kl.data_ptr(),
                           0 if kl_per_dim is None else kl_per_dim.data_ptr(), torch.get_num_threads())
    return z, kl, kl_per_dim


def latent_step_backward(mu, scale, seed, grad_z, grad_kl, grad_kl_per_dim, param, num_samples):
    """:func:`latent_backward` of :func:`latent_step_forward` (upstream gradients contiguous or None) -> grad_mu,
    grad_scale (B, Z)."""
    batch, dim = mu.shape
    grad_mu = mu.new_empty(batch, dim)
    grad_scale = mu.new_empty(batch, dim)
    _C.latent_step_backward(_DTYPE_CODE[mu.dtype], param, batch, dim, num_samples, mu.data_ptr(), *_rows(mu),
                            scale.data_ptr(), *_rows(scale), seed, _ptr(grad_z),
                            _extent(grad_z), _ptr(grad_kl), _extent(grad_kl), _ptr(grad_kl_per_dim),
                            _extent(grad_kl_per_dim), grad_mu.data_ptr(), grad_scale.data_ptr(), torch.get_num_threads())
    return grad_mu, grad_scale


def elementwise_step_log_prob(theta, x, scale, rows, n, likelihood, want_grad, want_scale_grad, expected_upstream):
    """:func:`elementwise_log_prob` with no log-variance operand, a fixed one given as a float, or a 0-d tensor
    (``scale``: the Gaussian's log-variance, the Laplace's log-scale, of theta's dtype; a float is rounded to it
    as a tensor of it would be), theta and x of one dtype, shape and layout (B, ...) with B > 0 whose examples are
    contiguous blocks of D elements (contiguous, or channels-last), read as (B, D) (checked by the caller, which
    passes ``rows`` = B and ``n`` = B * D as it read them: the C++ side checks reads against the extents passed,
    here their sizes) -> log_prob (B,), grad_theta (theta's shape and layout) | None, grad_scale (B,) | None (each
    row's d log p / d scale, unscaled: see protocol.py; a tensor scale's only), num_invalid (int)."""
    log_prob = theta.new_empty(rows)
    grad = torch.empty_like(theta) if want_grad else None  # (theta's layout: contiguous, or channels-last)
    grad_scale = theta.new_empty(rows) if want_scale_grad else None
    if scale is None or type(scale) is float:
        scale_address, fixed_scale = 0, scale or 0.0
    else:
        scale_address, fixed_scale = scale.data_ptr(), 0.0
    bad = _C.elementwise_step(_DTYPE_CODE[theta.dtype], likelihood, rows, n // rows, theta.data_ptr(), n,
                              x.data_ptr(), n, scale_address, fixed_scale, log_prob.data_ptr(),
                              0 if grad is None else grad.data_ptr(), 0 if grad_scale is None else grad_scale.data_ptr(),
                              expected_upstream, torch.get_num_threads())
    return log_prob, grad, grad_scale, bad


def categorical_step_log_prob(logits, target, rows, classes, want_grad, expected_upstream):
    """:func:`categorical_log_prob` of contiguous logits (B, *pixels, C) of a step dtype with ``rows`` = B > 0 and
    ``classes`` = C > 0 and a contiguous int64 or uint8 target (B, *pixels) (checked by the caller, which read the
    shape) -> log_prob (B,), grad_logits (logits' shape, from the buffer pool when large) | None, num_invalid (int)."""
    n = logits.numel()
    log_prob = logits.new_empty(rows)
    grad = _new_output(logits) if want_grad else None
    bad = _C.categorical_step(_DTYPE_CODE[logits.dtype], rows, n // (rows * classes), classes, logits.data_ptr(), n,
                              target.data_ptr(), _TARGET_DTYPE_CODE[target.dtype], n // classes, log_prob.data_ptr(),
                              0 if grad is None else grad.data_ptr(), expected_upstream, torch.get_num_threads())
    return log_prob, grad, bad


def dmol_packed_step_log_prob(x, params, num_mixtures, num_bits, log_scale_min, want_grad, expected_upstream):
    """:func:`dmol_log_prob` of a packed parameter tensor (B, M + C * (3M or 2M), *pixels) and x (B, C, *pixels),
    both contiguous of one step dtype (checked by the caller; the C++ side lays the packed views out and checks
    them against the buffers' sizes) -> log_prob (B,), grad_params (params' shape, from the buffer pool when
    large) | None, num_invalid (int)."""
    rows, channels = x.shape[0], x.shape[1]
    n = x.numel()
    log_prob = params.new_empty(rows)
    grad = _new_output(params) if want_grad else None
    bad = _C.dmol_packed_step(_DTYPE_CODE[params.dtype], rows, channels, num_mixtures, n // (rows * channels),
                              x.data_ptr(), n, params.data_ptr(), params.numel(), 1.0 / (2**num_bits - 1),
                              log_scale_min, log_prob.data_ptr(), 0 if grad is None else grad.data_ptr(),
                              expected_upstream, torch.get_num_threads())
    return log_prob, grad, bad


def values_within(values: torch.Tensor, low: float, high: float) -> bool | None:
    """Whether every value of a float32/float64 CPU tensor lies in [low, high] (False if one is NaN), read
    in place by one C++ call; None for a dtype or layout it does not read (callers then reduce with torch).
    The saved-gradient ops ask it of their upstream gradient (``ops/_autograd.py``)."""
    code = _DTYPE_CODE.get(values.dtype)
    if code is None:
        return None
    if values.dim() == 1:
        stride = values.stride()[0]
    elif values.is_contiguous():
        stride = 1
    else:
        return None
    return _C.values_within(code, values.data_ptr(), values.numel(), stride, low, high, _extent(values))


def _dmol_view(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    # (N, M, P) -> (ptr, row, 0, mixture); (N, C, M, P) -> (ptr, row, channel, mixture); pixels contiguous
    if t is None:
        return (0, 0, 0, 0)
    if t.dim() == 3:
        return (t.data_ptr(), t.stride(0), 0, t.stride(1))
    return (t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def dmol_log_prob(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, coeffs_tanh, grads,
                  expected_upstream=1.0):
    """Discretised logistic mixture over (N, ., P) views with unit pixel stride; ``grads`` is None or
    four views (logit_probs, means, log_scales, coeffs-or-None) of the same shapes to fill (with the
    gradients times ``expected_upstream``)."""
    out_dtype = means.dtype
    dtype = _compute_dtype(out_dtype)
    if dtype != out_dtype:  # half precision: fp32 copies in, fp32 gradients copied back
        x, logit_probs, means, log_scales, coeffs = (_cast(t, dtype) for t in (x, logit_probs, means, log_scales, coeffs))
        targets = grads
        grads = None if grads is None else tuple(None if g is None else torch.empty(g.shape, dtype=dtype, device=g.device) for g in grads)
    rows, channels, mixtures, pixels = means.shape
    log_prob = means.new_empty((rows,))
    grads4 = (None, None, None, None) if grads is None else grads
    operands = (logit_probs, means, log_scales, coeffs)
    bad = _C.dmol(
        _DTYPE_CODE[dtype], rows, x.shape[0], channels, mixtures, pixels, x.data_ptr(),
        *(_dmol_view(t) for t in operands), bool(coeffs_tanh), 1.0 / (2**num_bits - 1), float(log_scale_min),
        log_prob.data_ptr(), *(_dmol_view(g) for g in grads4), float(expected_upstream), torch.get_num_threads(),
        [_extent(t) for t in (x, *operands, log_prob, *grads4)],
    )
    if dtype != out_dtype:
        if grads is not None:
            for target, g in zip(targets, grads):
                if g is not None:
                    target.copy_(g)
    return log_prob, bad
