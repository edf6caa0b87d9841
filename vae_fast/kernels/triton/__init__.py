"""Triton backend: launchers for the kernels in ``latent.py`` and ``likelihood.py``.

On CUDA, block sizes and warps are autotuned per shape class
(``VAE_FAST_TRITON_AUTOTUNE=0`` uses one fixed configuration instead). Under
``TRITON_INTERPRET=1`` (CPU tensors, used by CI) the smallest configuration is used
directly: the interpreter gives no timing to tune on. Outputs that were not asked
for are None (a kernel argument that is not written gets a placeholder pointer).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpreting
from ...ops.codes import HEAD_CATEGORICAL
from .latent import latent_backward_kernel, latent_forward_kernel
from .dmol import dmol_kernel
from .likelihood import (categorical_kernel, elementwise_kernel, linear_categorical_kernel, linear_elementwise_kernel,
                         scale_rows_kernel)

MAX_CATEGORICAL_CLASSES = 16384

# Row kernels' autotuning spaces, sized by `make triton-aot` (benchmarks/triton_aot.py) so that no
# configuration spills on sm_80 / sm_90. The likelihood rows: up to 2048 elements on 8 warps
# (4096 on 16 warps spilled 16 B for the Gaussian with a logvar gradient on sm_80). The latent rows
# draw Philox + Box-Muller noise per element: 4 elements per thread at most (8 spilled 28 B on sm_80
# with a prior, softplus and the log-ratio; 16 spilled 216-248 B).
LATENT_CONFIGS = [
    triton.Config({"BLOCK": 64}, num_warps=1),
    triton.Config({"BLOCK": 256}, num_warps=2),
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 1024}, num_warps=8),
    triton.Config({"BLOCK": 2048}, num_warps=16),
]
ROW_CONFIGS = [
    triton.Config({"BLOCK": 64}, num_warps=1),
    triton.Config({"BLOCK": 256}, num_warps=2),
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
]


# Rows longer than this many elements are cut into chunks of it, one program each (grid (rows, chunks)): a few long
# rows (a batch of 1-8 SD-sized images or conv latents) otherwise ran on as many SMs as rows. A chunk's sums are
# stored per (row, chunk) and added afterwards in a fixed order (deterministic, no atomics; one reduction launch,
# for long rows only). A multiple of every config's BLOCK, and so of 4: a chunk starts on a block and a Philox
# group boundary. Read at each call (tests shrink it to cut interpreter-sized rows).
ROW_CHUNK = 8192


def row_chunks(dim: int) -> tuple[int, int]:
    """(chunks per row, the kernels' CHUNK) of a row of ``dim`` elements. CHUNK is a compile-time constant:
    the compiler then bounds each program's loop (a runtime chunk length made ptxas spill 24 B in the latent
    forward kernel with a prior and the log-ratio on sm_80); with a single chunk CHUNK >= dim covers the row."""
    return max(1, triton.cdiv(dim, ROW_CHUNK)), ROW_CHUNK


def _chunk_sums(t: torch.Tensor, shape: tuple, chunks: int, zeros: bool = False, **kwargs) -> torch.Tensor:
    """A buffer for per-chunk sums of an output of ``shape`` (the row kernels' chunks, the categorical and mixture
    kernels' pixel blocks): ``shape`` itself for one chunk a row (the kernels' slot row * 1 + 0 is the row), else
    ``(*shape, chunks)``, reduced by :func:`_row_sums`."""
    full = shape if chunks == 1 else (*shape, chunks)
    return t.new_zeros(full, **kwargs) if zeros else t.new_empty(full, **kwargs)


def _row_sums(partial: torch.Tensor, chunks: int) -> torch.Tensor:
    """The output of a :func:`_chunk_sums` buffer: itself for one chunk a row (no launch; not a view either: an
    autograd.Function's outputs that are views cannot be modified in place), else its chunks summed in order."""
    return partial if chunks == 1 else partial.sum(-1)


class _FixedConfig:
    """Launches a jit function with one fixed config (interpreter mode)."""

    def __init__(self, fn, config):
        self.fn, self.kwargs = fn, dict(config.kwargs)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.fn[grid](*args, **kwargs, **self.kwargs)


def _tuned(fn, configs, key):
    # VAE_FAST_TRITON_AUTOTUNE=0 skips tuning (each new shape class otherwise compiles and
    # times every config once): useful for test suites touching many shapes
    if triton_interpreting() or os.environ.get("VAE_FAST_TRITON_AUTOTUNE", "1") == "0":
        return _FixedConfig(fn, configs[2] if not triton_interpreting() else configs[0])
    return triton.autotune(configs=configs, key=key)(fn)


_latent_forward = _tuned(latent_forward_kernel, LATENT_CONFIGS, ["dim", "samples"])
_latent_backward = _tuned(latent_backward_kernel, LATENT_CONFIGS, ["dim", "samples"])
_elementwise = _tuned(elementwise_kernel, ROW_CONFIGS, ["dim", "LIKELIHOOD", "WANT_GRAD"])


_scale_tensors: dict = {}


def _upstream_tensor(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-element tensor holding the gradient scale in the accumulation dtype (a float kernel
    argument would be rounded to float32), cached: on CUDA, creating it is a kernel launch."""
    key = (float(value), dtype, device)
    t = _scale_tensors.get(key)
    if t is None:
        if len(_scale_tensors) > 256:  # one per batch size and dtype in practice
            _scale_tensors.clear()
        with torch.inference_mode(False):  # (a normal tensor whatever mode the first call ran in)
            t = _scale_tensors[key] = torch.full((1,), float(value), dtype=dtype, device=device)
    return t


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _strided(t, fallback):
    return (fallback, 0, 0) if t is None else (t, t.stride(0), t.stride(1))


def latent_forward(mu, scale, prior_mu, prior_logvar, eps, seed, param, num_samples, want_kl_per_dim,
                   want_log_ratio=False):
    batch, dim = mu.shape
    chunks, chunk = row_chunks(dim)
    z = mu.new_empty((batch, dim) if num_samples == 1 else (num_samples, batch, dim))
    acc = _acc_dtype(mu.dtype)  # reductions in float32 for half inputs
    kl = _chunk_sums(mu, (batch,), chunks, dtype=acc)
    kl_per_dim = mu.new_empty((batch, dim), dtype=acc) if want_kl_per_dim else None
    # (accumulated block by block in each program's slot)
    log_ratio = _chunk_sums(mu, (num_samples, batch), chunks, zeros=True, dtype=acc) if want_log_ratio else None
    if batch > 0:
        _latent_forward[(batch, chunks)](
            mu, mu.stride(0), scale, scale.stride(0), *_strided(prior_mu, mu), *_strided(prior_logvar, mu),
            mu if eps is None else eps, seed, z, kl, kl if kl_per_dim is None else kl_per_dim,
            kl if log_ratio is None else log_ratio,
            batch, dim, num_samples,
            PARAM=param, HAS_PRIOR=prior_mu is not None, HAS_EPS=eps is not None,
            WANT_KL_PER_DIM=want_kl_per_dim, WANT_LOG_RATIO=want_log_ratio, DIM_MULTIPLE_OF_4=dim % 4 == 0,
            ACC=_acc(mu.dtype), CHUNK=chunk,
        )
    return z, _row_sums(kl, chunks), kl_per_dim, None if log_ratio is None else _row_sums(log_ratio, chunks)


def latent_backward(mu, scale, prior_mu, prior_logvar, eps, seed, grad_z, grad_kl, grad_kl_per_dim, param,
                    num_samples, want_prior_grad):
    batch, dim = mu.shape
    grad_mu = mu.new_empty(mu.shape)  # contiguous, whatever mu's row stride
    grad_scale = mu.new_empty(mu.shape)
    grad_pm = mu.new_empty(mu.shape) if want_prior_grad else None
    grad_plv = mu.new_empty(mu.shape) if want_prior_grad else None
    if batch == 0:
        return grad_mu, grad_scale, grad_pm, grad_plv
    chunks, chunk = row_chunks(dim)
    _latent_backward[(batch, chunks)](
        mu, mu.stride(0), scale, scale.stride(0), *_strided(prior_mu, mu), *_strided(prior_logvar, mu),
        mu if eps is None else eps, seed,
        mu if grad_z is None else grad_z, mu if grad_kl is None else grad_kl,
        mu if grad_kl_per_dim is None else grad_kl_per_dim,
        grad_mu, grad_scale, grad_pm if want_prior_grad else mu, grad_plv if want_prior_grad else mu,
        batch, dim, num_samples,
        PARAM=param, HAS_PRIOR=prior_mu is not None, HAS_EPS=eps is not None, HAS_GRAD_Z=grad_z is not None,
        HAS_GRAD_KL=grad_kl is not None, HAS_GRAD_KL_PER_DIM=grad_kl_per_dim is not None,
        WANT_PRIOR_GRAD=want_prior_grad, DIM_MULTIPLE_OF_4=dim % 4 == 0, ACC=_acc(mu.dtype), CHUNK=chunk,
    )
    return grad_mu, grad_scale, grad_pm, grad_plv


def elementwise_log_prob(theta, x, logvar, likelihood, want_grad, want_logvar_grad, expected_upstream=1.0,
                         logvar_grad_per_row=False):
    rows, dim = theta.shape
    chunks, chunk = row_chunks(dim)
    per_row = bool(logvar_grad_per_row and want_logvar_grad)
    log_prob = _chunk_sums(theta, (rows,), chunks, dtype=_acc_dtype(theta.dtype))
    grad = torch.empty_like(theta) if want_grad else None
    grad_lv = ((_chunk_sums(theta, (rows,), chunks, dtype=_acc_dtype(theta.dtype)) if per_row  # (kernels/protocol.py)
                else torch.empty_like(theta)) if want_logvar_grad else None)
    invalid = _chunk_sums(theta, (rows,), chunks, dtype=torch.int32)  # every program writes its count
    if rows > 0:
        _elementwise[(rows, chunks)](
            theta, x, *_strided(logvar, theta), log_prob,
            grad if want_grad else theta, grad_lv if want_logvar_grad else theta, invalid,
            _upstream_tensor(expected_upstream, _acc_dtype(theta.dtype), theta.device),
            x.shape[0], dim,
            LIKELIHOOD=likelihood, WANT_GRAD=want_grad, WANT_LOGVAR_GRAD=want_logvar_grad, ACC=_acc(theta.dtype),
            LOGVAR_GRAD_PER_ROW=per_row, CHUNK=chunk,
        )
    return _row_sums(log_prob, chunks), grad, _row_sums(grad_lv, chunks) if per_row else grad_lv, invalid


MAX_HEAD_FEATURES = 256  # the fused-head kernel keeps a row block's H features (and d/dh) in registers


def head_tile(block_h: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_O, warps) of the fused-head kernel for BLOCK_H features, sized by `make triton-aot`
    (sm_80 and sm_90) with the continuous Bernoulli, the heaviest likelihood: 64x64 tiles spilled
    kilobytes at every H, 32x32 still spilled 16-24 B on sm_90 at H = 128; 16-row blocks do not."""
    return (16, 32, 4) if block_h <= 64 else (16, 32, 8)


def linear_elementwise_log_prob(h, weight, bias, x, log_scale, likelihood, want_grad, expected_upstream=1.0,
                                row_factor=None):
    """A fused Linear head (``linear_elementwise_kernel``, or ``linear_categorical_kernel`` for
    ``likelihood=HEAD_CATEGORICAL`` with integer targets x (Xr,)): h (R, H) read
    through its strides, weight (O, H), bias (O,) or None, x (Xr, O) with row r scored against r % Xr,
    log_scale a 1-element tensor or None, row_factor (R,) or None (then the gradients are times
    ``expected_upstream``). Returns per-row log p (R,), d/dh (R, H), d/dW and d/db (float32; None when
    not wanted) and the number of x outside the support per row (R,) int32."""
    rows, features = h.shape
    out_features = weight.shape[0]
    acc = _acc_dtype(h.dtype)
    log_prob = h.new_empty((rows,), dtype=acc)
    invalid = torch.empty((rows,), dtype=torch.int32, device=h.device)
    grad_h = h.new_empty((rows, features), dtype=acc) if want_grad else None
    grad_w = torch.zeros((out_features, features), dtype=acc, device=h.device) if want_grad else None
    grad_b = torch.zeros((out_features,), dtype=acc, device=h.device) if want_grad and bias is not None else None
    if rows > 0:
        block_h = max(16, triton.next_power_of_2(features))
        block_m, block_o, num_warps = (16, 16, 1) if triton_interpreting() else head_tile(block_h)
        weight = weight.contiguous()
        common = dict(HAS_BIAS=bias is not None, HAS_ROW_FACTOR=row_factor is not None, WANT_GRAD=want_grad,
                      ACC=_acc(h.dtype), BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_H=block_h, num_warps=num_warps)
        outputs = (log_prob, h if grad_h is None else grad_h, log_prob if grad_w is None else grad_w,
                   log_prob if grad_b is None else grad_b, invalid, _upstream_tensor(expected_upstream, acc, h.device))
        grid = (triton.cdiv(rows, block_m),)
        factor = weight if row_factor is None else row_factor.to(acc)
        if likelihood == HEAD_CATEGORICAL:  # x: (Xr,) integer targets
            linear_categorical_kernel[grid](
                h, h.stride(0), h.stride(1), weight, weight if bias is None else bias, x, factor, *outputs,
                rows, x.shape[0], out_features, features, **common)
        else:
            linear_elementwise_kernel[grid](
                h, h.stride(0), h.stride(1), weight, weight if bias is None else bias, x,
                weight if log_scale is None else log_scale.to(acc), factor, *outputs,
                rows, x.shape[0], out_features, features, LIKELIHOOD=likelihood, **common)
    return log_prob, grad_h, grad_w, grad_b, invalid


def categorical_log_prob(logits, target, want_grad, expected_upstream=1.0):
    rows, pixels, classes = logits.shape
    if classes > MAX_CATEGORICAL_CLASSES:
        raise ValueError(
            f"logits: the Triton categorical kernel supports at most {MAX_CATEGORICAL_CLASSES} classes "
            f"(one tile per pixel), got {classes}")
    class_block = triton.next_power_of_2(classes)
    pixel_block = max(1, min(triton.next_power_of_2(max(pixels, 1)), 4096 // class_block))
    num_blocks = triton.cdiv(pixels, pixel_block)
    partial = _chunk_sums(logits, (rows,), num_blocks, dtype=_acc_dtype(logits.dtype))
    invalid = _chunk_sums(logits, (rows,), num_blocks, dtype=torch.int32)  # written by every program
    grad = torch.empty_like(logits) if want_grad else None
    if rows > 0 and pixels > 0:
        categorical_kernel[(rows, num_blocks)](
            logits, target, partial, grad if want_grad else logits, invalid,
            _upstream_tensor(expected_upstream, _acc_dtype(logits.dtype), logits.device),
            target.shape[0], pixels, classes, num_blocks,
            WANT_GRAD=want_grad, ACC=_acc(logits.dtype), PIXELS=pixel_block, CLASSES=class_block,
            num_warps=4,
        )
    return _row_sums(partial, num_blocks), grad, invalid


def _dmol_view(t, fallback):
    # (pointer, row, channel, mixture) strides of an (N, M, P) or (N, C, M, P) view
    if t is None:
        return (fallback, 0, 0, 0)
    if t.dim() == 3:
        return (t, t.stride(0), 0, t.stride(1))
    return (t, t.stride(0), t.stride(1), t.stride(2))


MAX_DMOL_MIXTURES = 256


def dmol_tile(channels: int) -> tuple[int, int]:
    """(elements of the (M, PIX) tile, warps) of the mixture kernel for ``channels`` channels."""
    return (1024, 8) if channels == 3 else (2048, 4)


def dmol_log_prob(x, logit_probs, means, log_scales, coeffs, num_bits, log_scale_min, coeffs_tanh, grads,
                  expected_upstream=1.0):
    rows, channels, mixtures, pixels = means.shape
    if mixtures > MAX_DMOL_MIXTURES:
        raise ValueError(f"means: the Triton mixture kernel supports at most {MAX_DMOL_MIXTURES} components "
                         f"(one tile per pixel block), got {mixtures}")
    mix_block = triton.next_power_of_2(mixtures)
    # an (M, PIX) tile per channel: coupled RGB keeps three channels' terms live, so its tile is
    # half as large and spread over 8 warps (`make triton-aot`: 2048-element RGB tiles on 4 warps
    # used 255 registers and spilled 2.8 KB; 1024 on 8 warps: 128 registers, no spill)
    tile_budget, num_warps = dmol_tile(channels)
    pixel_block = max(1, min(triton.next_power_of_2(max(pixels, 1)), max(1, tile_budget // mix_block)))
    if triton_interpreting():
        pixel_block = min(pixel_block, 16)
    num_blocks = triton.cdiv(pixels, pixel_block)
    partial = _chunk_sums(means, (rows,), num_blocks, dtype=_acc_dtype(means.dtype))
    invalid = _chunk_sums(means, (rows,), num_blocks, dtype=torch.int32)  # written by every program
    grads4 = (None, None, None, None) if grads is None else grads
    if rows > 0 and pixels > 0:
        l_view = _dmol_view(logit_probs, means)
        gl_view = _dmol_view(grads4[0], means)
        dmol_kernel[(rows, num_blocks)](
            x, l_view[0], l_view[1], l_view[3], *_dmol_view(means, means), *_dmol_view(log_scales, means),
            *_dmol_view(coeffs, means), partial, invalid,
            _upstream_tensor(expected_upstream, _acc_dtype(means.dtype), means.device),
            gl_view[0], gl_view[1], gl_view[3], *_dmol_view(grads4[1], means), *_dmol_view(grads4[2], means),
            *_dmol_view(grads4[3], means),
            x.shape[0], mixtures, pixels, num_blocks,
            CHANNELS=channels, HAS_COEFFS=coeffs is not None, COEFF_TANH=bool(coeffs_tanh), WANT_GRAD=grads is not None,
            HALF_BIN=1.0 / (2**num_bits - 1), LOG_SCALE_MIN=float(log_scale_min), ACC=_acc(means.dtype),
            MIX=mix_block, PIX=pixel_block, num_warps=num_warps,
        )
    return _row_sums(partial, num_blocks), invalid


def scale_rows_inplace(grad: torch.Tensor, factor: torch.Tensor, tolerance: float) -> torch.Tensor:
    """grad (N, ...) contiguous: row r multiplied in place by factor[r], rows whose factor is 1
    to within ``tolerance`` left untouched. The skip is decided on the device: no host sync, and
    the expected upstream gradient costs no pass over the gradient."""
    rows = grad.shape[0]
    row_len = grad.numel() // rows if rows else 0
    if rows and row_len:
        block = 16 if triton_interpreting() else 1024
        scale_rows_kernel[(rows, triton.cdiv(row_len, block))](
            grad, factor.to(_acc_dtype(grad.dtype)).contiguous(), row_len, TOLERANCE=float(tolerance), BLOCK=block, num_warps=4)
    return grad
