"""Fused decoder head: the last Linear / 1x1 conv and the likelihood in one op, its output never
held in full.

Op schema (``torch.ops.vae_fast``)::

    linear_log_prob(h (N, P, H), weight (O, H), bias (O,)?,
                    x (Bx, P, O) float, (Bx, P) integer (categorical) or (Bx, P, C) in [-1, 1] (mixture),
                    logvar (Nl, Pl, Ol)?, likelihood, chunk_elements, expected_upstream, row_weights (N,)?,
                    want_grads, want_logvar_grad, num_mixtures, num_bits, log_scale_min)
        -> log_prob (N,), grad_h (N, P, H) or (0,), grad_weight (O, H) or (0,), grad_bias (O,) or (0,),
           grad_logvar (Nl, Pl, Ol) or (0,), num_invalid () int64

N examples (K samples x B), each P positions (pixels) of H features; example n is scored against
x row n % Bx. The head's output ``h @ weight.T + bias`` (N, P, O) is computed chunk by chunk (at
most ``chunk_elements`` output elements at a time): each chunk goes through the fused likelihood
kernel of its backend (which returns d log p / d output already times ``expected_upstream``, or
times ``row_weights[n]`` when given), and the chunk's gradient is turned into grad_h (a matmul),
and accumulated into grad_weight and grad_bias in float32 (float64 for float64 inputs) before the
chunk's buffers are reused. ``logvar`` (the Gaussian's log-variance, the Laplace's log-scale) is
in the output frame with each of its three dims either 1 (broadcast) or full.

Choice on CPU: chunks of torch matmuls around the existing fused kernels, as the issue allows. The
matmuls are the head's own cost in any implementation; what the fusion removes is the (N, P, O)
output and its gradient (one chunk of each is live instead), and the separate likelihood pass over
them. On the Triton backend a Linear head with an elementwise likelihood (fixed scale) or a
categorical one is a single CCE-style kernel instead (``kernels/triton/likelihood.py``:
``linear_elementwise_kernel``, ``linear_categorical_kernel``), whose output tiles live in registers;
the mixture and learned-scale heads take the chunked path there too.
"""
from __future__ import annotations

import math

import torch

from .._validation import STRIDED, is_legacy_batched, is_plain, raise_if_invalid
from ._autograd import (SKIP_CHECK_ULPS, eager_function_apply, fast_apply, mark_non_differentiable, no_forward_ad,
                        step_ctx_constants)
from ._library import acc_dtype, call, kernels_for, register_op, step_kernels_for
from .codes import HEAD_CATEGORICAL, HEAD_DMOL
from .likelihood import SUPPORT_MESSAGES, categorical_support_message

CATEGORICAL, DMOL = HEAD_CATEGORICAL, HEAD_DMOL  # the elementwise heads use ops.codes.Likelihood
DEFAULT_CHUNK_BYTES = 1 << 20  # per chunk buffer (output, gradient), unless the chunk's GEMMs need more rows:
# a chunk's three GEMMs (output, d/dh, d/dW) run (rows, H) x (H, O) and slow down below about 1024 rows here: the
# 784-400 MNIST head at B = 1024 took 7.3 ms fwd+bwd in 1 MiB chunks (334 rows) and 6.2 ms in one; the categorical
# head at 4x3x16x16 (768 rows an example) 2.17 ms in 1 MiB chunks of one example, 1.96 in chunks of two; at
# 16x3x32x32 (pixel blocks) 27.5 ms in 1 MiB blocks of 1024 rows, 27.4 in 2 MiB ones. So the default budget grows
# to DEFAULT_MIN_CHUNK_ROWS rows of the output (whole examples, rounded up), at most DEFAULT_MAX_CHUNK_BYTES (a
# 50,000-way output keeps 8 MiB).
DEFAULT_MIN_CHUNK_ROWS = 1024
DEFAULT_MAX_CHUNK_BYTES = 8 << 20
# The mixture head's chunks: 2 MiB holds one 64x64 example's 100 channels (1.6 MB), so each GEMM spans an
# example's pixels: 14.2 ms vs 19.1 ms at 1 MiB (two pixel blocks per example) for 8x3x64x64, peak 0.26x -> see
# benchmarks/results/heads-*.md for the peak at this default.
DEFAULT_MIXTURE_CHUNK_BYTES = 2 << 20


def chunk_elements_for(max_chunk_bytes: int | None, itemsize: int = 4, default: int = DEFAULT_CHUNK_BYTES,
                       out_features: int = 1, positions: int = 1) -> int:
    """Output elements per chunk buffer: ``max_chunk_bytes`` // ``itemsize`` when given; else ``default`` bytes,
    grown to DEFAULT_MIN_CHUNK_ROWS rows of ``out_features`` (rounded up to whole examples of ``positions`` rows
    where an example has fewer), at most DEFAULT_MAX_CHUNK_BYTES."""
    if max_chunk_bytes is not None:
        return max(1, int(max_chunk_bytes) // itemsize)
    elements, row = default // itemsize, max(out_features, 1)
    positions, min_rows = max(positions, 1), DEFAULT_MIN_CHUNK_ROWS
    rows = elements // row  # the rows the default budget holds
    if positions <= max(rows, min_rows):  # chunks of whole examples (see _chunks)
        examples = max(rows // positions, 1)
        if examples * positions < min_rows:
            examples = -(-min_rows // positions)
        elements = max(elements, examples * positions * row)
    else:  # pixel blocks of one example
        elements = max(elements, min_rows * row)
    return min(elements, max(default, DEFAULT_MAX_CHUNK_BYTES) // itemsize)


def _chunks(num_examples: int, positions: int, out_features: int, chunk_elements: int):
    """(n0, n1, p0, p1) blocks covering (N, P): whole examples while they fit the budget (equal numbers of them),
    else pixel blocks of one example (so a single 1024x1024 image still streams through a small buffer)."""
    per_example = positions * out_features
    if per_example <= chunk_elements:
        per_chunk = max(1, chunk_elements // max(per_example, 1))
        blocks = -(-num_examples // per_chunk)
        # equal chunks (four of 256 examples rather than 3 x 334 + 22): no short GEMM at the end
        for block in range(blocks):
            yield num_examples * block // blocks, num_examples * (block + 1) // blocks, 0, positions
        return
    # equal blocks (two of 2048 pixels rather than 2621 + 1475): no short GEMM at each example's end
    blocks = -(-positions * out_features // chunk_elements)
    pixels = -(-positions // blocks)
    for n0 in range(num_examples):
        for p0 in range(0, positions, pixels):
            yield n0, n0 + 1, p0, min(positions, p0 + pixels)


def _x_rows(x, n0: int, n1: int, p0: int, p1: int):
    rows = x.shape[0]
    if n0 // rows == (n1 - 1) // rows:  # the chunk stays within one sample's copy of x
        return x[n0 % rows:(n1 - 1) % rows + 1, p0:p1]
    index = torch.arange(n0, n1, device=x.device) % rows
    return x[index, p0:p1]


def _new_grad_h(h: torch.Tensor) -> torch.Tensor:
    """d/dh (N, P, H) in h's memory layout (channels-first for a 1x1 conv head: autograd returns it as is); the fake
    kernel allocates it the same way, so that compiled graphs see the strides the kernels give."""
    if h.stride(1) == 1 and h.stride(2) != 1:
        return h.new_empty((h.shape[0], h.shape[2], h.shape[1])).transpose(1, 2)
    return h.new_empty(h.shape)


def _traceable_layout(h: torch.Tensor) -> torch.Tensor:
    """h as the op gets it: itself, or contiguous while torch.compile traces. d/dh takes h's layout, and a compiled
    backward handed the kernel a channels-first h where inductor had planned the op's outputs for a contiguous one
    (an assert_size_stride error); a contiguous h has one layout everywhere."""
    return h.contiguous() if torch.compiler.is_compiling() else h


class _Head:
    """What every chunk of one call reads and accumulates into (one object, so that each chunk's
    buffers are locals of its function and are freed before the next chunk allocates its own)."""

    def __init__(self, backend, h, weight, bias, logvar, likelihood, expected_upstream, row_weights, want_grads,
                 want_logvar_grad, num_mixtures, num_bits, log_scale_min):
        self.h, self.weight, self.bias, self.logvar = h, weight, bias, logvar
        self.likelihood, self.row_weights, self.want_grads = likelihood, row_weights, want_grads
        self.mixture = (num_mixtures, num_bits, log_scale_min)
        self.upstream = 1.0 if row_weights is not None else expected_upstream  # row weights carry it instead
        self.backend = backend
        self.num_examples, self.positions, _ = h.shape
        self.acc = acc = acc_dtype(h.dtype)
        # log p: whole-example chunks' (N_chunk,) results, concatenated at the end; or a zeroed (N,) accumulator
        # that pixel blocks add into. The accumulators of d/dW and d/db are the first chunk's own products (no
        # zeroed buffer to add them into: zeroing the MNIST head's 1.2 MB d/dW cost 30 us a call).
        self.log_prob_parts, self.log_prob = [], None
        self.invalid = 0  # out-of-support counts: an int (C++ kernels), or a 0-d tensor once a kernel gave counts
        self.grad_h = self.grad_w = self.grad_b = self.grad_lv = None
        if want_grads:
            self.grad_h = _new_grad_h(h)
            if want_logvar_grad and logvar is not None:
                self.grad_lv = torch.zeros(logvar.shape, dtype=acc, device=h.device)

    def weighted(self, g, n0, n1):
        return g if self.row_weights is None else g * self.row_weights[n0:n1].view(-1, 1, 1).to(g.dtype)

    def add_log_prob(self, lp: torch.Tensor, n0: int, n1: int, p0: int, p1: int) -> None:
        """A chunk's log p (n1 - n0,): the examples' own (all their positions) or a pixel block's part of them."""
        if p0 == 0 and p1 == self.positions:
            self.log_prob_parts.append(lp)
            return
        if self.log_prob is None:
            self.log_prob = lp.new_zeros((self.num_examples,), dtype=self.acc)
        self.log_prob[n0:n1].add_(lp)  # (add_ on the slice: `+=` would write it back through __setitem__, a copy)

    def add_weight_grad(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """d/dW += a @ b, in the accumulation dtype (float32 for half inputs)."""
        a, b = a.to(self.acc), b.to(self.acc)
        if self.grad_w is None:
            self.grad_w = torch.mm(a, b)
        else:
            self.grad_w.addmm_(a, b)

    def add_bias_grad(self, g: torch.Tensor, dims) -> None:
        """d/db += g summed over ``dims``, in the accumulation dtype."""
        column_sums = g.sum(dims, dtype=self.acc)
        if self.grad_b is None:
            self.grad_b = column_sums
        else:
            self.grad_b += column_sums

    def results(self) -> tuple:
        """(log_prob (N,) in the accumulation dtype, d/dh, d/dW, d/db, d/dlogvar in their operands' dtypes,
        out-of-support count); the gradients None without want_grads."""
        log_prob = self.log_prob
        if log_prob is None:
            parts = self.log_prob_parts
            log_prob = (parts[0].to(self.acc) if len(parts) == 1 else
                        torch.cat(parts).to(self.acc) if parts else self.h.new_zeros((0,), dtype=self.acc))
        grad_w = grad_b = None
        if self.want_grads:
            weight, bias = self.weight, self.bias
            grad_w = (weight.new_zeros(weight.shape) if self.grad_w is None else  # (no chunks: a batch of 0)
                      self.grad_w.to(weight.dtype))
            if bias is not None:
                grad_b = bias.new_zeros(bias.shape) if self.grad_b is None else self.grad_b.to(bias.dtype)
        grad_lv = None if self.grad_lv is None else self.grad_lv.to(self.logvar.dtype)
        return log_prob, self.grad_h, grad_w, grad_b, grad_lv, self.invalid


def _linear_output(head: _Head, h2: torch.Tensor) -> torch.Tensor:
    """h2 (rows, H) @ weight.T + bias as one GEMM (the bias is the GEMM's C operand, not a second pass)."""
    if head.bias is None:
        return torch.mm(h2, head.weight.t())
    return torch.addmm(head.bias, h2, head.weight.t())


def _gemm_into(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> None:
    """target = a @ b, written in place when BLAS can address target (row- or column-major with a
    leading dimension), else through a temporary."""
    rows_ok = target.stride(1) == 1 and target.stride(0) >= max(1, target.shape[1])
    cols_ok = target.stride(0) == 1 and target.stride(1) >= max(1, target.shape[0])
    if rows_ok or cols_ok:
        torch.mm(a, b, out=target)
    else:
        target.copy_(torch.mm(a, b))


def _elementwise_chunk(head: _Head, hb, xb, n0, n1, p0, p1):
    """One chunk of a Linear head with an elementwise or categorical likelihood; (n, p, O) channels-last."""
    n, p = n1 - n0, p1 - p0
    weight, logvar, out_features = head.weight, head.logvar, head.weight.shape[0]
    h2 = hb.reshape(n * p, hb.shape[-1])
    out = _linear_output(head, h2).view(n, p, out_features)  # the only output-sized buffer, one chunk of it
    # the logvar operand's block: full dims sliced with the chunk, broadcast ones kept at 1
    lv_rows = slice(n0, n1) if logvar is not None and logvar.shape[0] > 1 else slice(0, 1)
    lv_cols = slice(p0, p1) if logvar is not None and logvar.shape[1] > 1 else slice(0, 1)
    g_lv = None
    if head.likelihood == CATEGORICAL:
        lp, g, bad = head.backend.categorical_log_prob(out, xb.to(torch.int64).contiguous(), head.want_grads,
                                                       head.upstream)
    else:
        lv = None
        if logvar is not None:
            lv = logvar[lv_rows, lv_cols].to(out.dtype).expand(n, p, out_features).reshape(n, p * out_features)
        lp, g, g_lv, bad = head.backend.elementwise_log_prob(
            out.view(n, p * out_features), xb.to(out.dtype).reshape(n, p * out_features).contiguous(), lv,
            head.likelihood, head.want_grads, head.grad_lv is not None, head.upstream)
    del out
    head.add_log_prob(lp, n0, n1, p0, p1)
    if not head.want_grads:
        return bad
    g = head.weighted(g.view(n, p, out_features), n0, n1)
    g2 = g.view(n * p, out_features)
    target = head.grad_h[n0:n1, p0:p1]  # (n, p, H); channels-first storage for a 1x1 conv head
    if n == 1 or target.is_contiguous():  # one (p, H) block (row- or column-major) or all n*p rows
        _gemm_into(g2, weight, target[0] if n == 1 else target.view(n * p, target.shape[-1]))
    else:
        target.copy_(torch.mm(g2, weight).view(target.shape))
    head.add_weight_grad(g2.t(), h2)
    if head.bias is not None:
        head.add_bias_grad(g2, 0)
    if head.grad_lv is not None:
        g_lv = head.weighted(g_lv.view(n, p, out_features).to(head.acc), n0, n1)
        dims = tuple(d for d in range(3) if logvar.shape[d] == 1)
        head.grad_lv[lv_rows, lv_cols] += g_lv.sum(dims, keepdim=True) if dims else g_lv
    return bad


def _dmol_chunk(head: _Head, hb, xb, n0, n1, p0, p1):
    """One chunk of a logistic-mixture head, in channels-first algebra: the packed NVAE parameters
    (n, O, p) with pixels contiguous (as the mixture kernel reads them) are W @ h (n, H, p), so a
    channels-first h and its gradient are used in place; x arrives as (n, p, C). One example's GEMMs
    are plain 2-D GEMMs on strided views (measured faster here than matmul's batched path)."""
    from .dmol import packed_views

    num_mixtures, num_bits, log_scale_min = head.mixture
    weight, channels = head.weight, xb.shape[-1]
    h_cf = hb.transpose(1, 2)  # (n, H, p): pixel stride 1 for a channels-first h
    out = weight.new_empty((n1 - n0, weight.shape[0], p1 - p0))
    for i in range(n1 - n0):
        if head.bias is None:
            torch.mm(weight, h_cf[i], out=out[i])
        else:
            torch.addmm(head.bias[:, None], weight, h_cf[i], out=out[i])
    grad = out.new_empty(out.shape) if head.want_grads else None
    lp, bad = head.backend.dmol_log_prob(
        xb.transpose(1, 2).to(out.dtype).contiguous(), *packed_views(out, num_mixtures, channels), num_bits,
        log_scale_min, True, None if grad is None else packed_views(grad, num_mixtures, channels), head.upstream)
    del out
    head.add_log_prob(lp, n0, n1, p0, p1)
    if grad is not None:
        grad = head.weighted(grad, n0, n1)
        target = head.grad_h.transpose(1, 2)[n0:n1, :, p0:p1]  # (n, H, p)
        for i in range(n1 - n0):
            # grad_h block (H, p) = W^T @ grad (O, p); its transpose (p, H) is column-major with a
            # leading dimension when h is channels-first, which BLAS writes in place
            _gemm_into(grad[i].t(), weight, target[i].t())
            head.add_weight_grad(grad[i], h_cf[i].t())
        if head.bias is not None:
            head.add_bias_grad(grad, (0, 2))
    return bad


def _fused_kernel_path(backend, h, logvar, likelihood, want_logvar_grad):
    """Whether the backend's one-kernel head (Triton: output tiles in registers) serves this call: an
    elementwise likelihood with a fixed scalar scale, or the categorical; rows of h that flatten without
    a copy; H small; not under ``torch.use_deterministic_algorithms(True)`` (the kernel adds d/dW and d/db up
    with float32 atomics, in no fixed order: the chunked path's GEMMs and row kernels are deterministic)."""
    kernel = getattr(backend, "linear_elementwise_log_prob", None)
    return (kernel is not None and likelihood != DMOL and not torch.are_deterministic_algorithms_enabled()
            and h.shape[2] <= getattr(backend, "MAX_HEAD_FEATURES", 0)
            and (logvar is None or (logvar.numel() == 1 and not want_logvar_grad))
            and (h.shape[0] <= 1 or h.shape[1] <= 1 or h.stride(0) == h.shape[1] * h.stride(1)))


def _fused_kernel_head(backend, h, weight, bias, x, logvar, likelihood, expected_upstream, row_weights, want_grads):
    num_examples, positions, features = h.shape
    rows_factor = None if row_weights is None else row_weights.repeat_interleave(positions)
    log_prob, grad_h, grad_w, grad_b, invalid = backend.linear_elementwise_log_prob(
        h.reshape(num_examples * positions, features), weight, bias,
        (x.reshape(-1).to(torch.int64) if likelihood == CATEGORICAL else
         x.reshape(x.shape[0] * positions, weight.shape[0])).contiguous(), None if logvar is None else logvar.reshape(1),
        likelihood, want_grads, expected_upstream, rows_factor)
    log_prob = log_prob.view(num_examples, positions).sum(1)
    if not want_grads:
        return log_prob, None, None, None, None, invalid
    grad_h = grad_h.view(h.shape).to(h.dtype)
    if grad_h.stride() != (layout := _new_grad_h(h)).stride():  # (one example or position of a channels-first h)
        grad_h = layout.copy_(grad_h)
    return (log_prob, grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype), None, invalid)


def _head_kernel(h, weight, bias, x, logvar, likelihood, chunk_elements, expected_upstream=1.0, row_weights=None,
                 want_grads=True, want_logvar_grad=False, num_mixtures=0, num_bits=8, log_scale_min=-7.0):
    h, weight = h.detach(), weight.detach()  # the op's own arguments; autograd is LinearLogProbFunction's
    bias = None if bias is None else bias.detach()
    logvar = None if logvar is None else logvar.detach()
    backend = kernels_for(h)
    if _fused_kernel_path(backend, h, logvar, likelihood, want_logvar_grad):
        return _fused_kernel_head(backend, h, weight, bias, x, logvar, likelihood, expected_upstream, row_weights,
                                  want_grads)
    head = _Head(backend, h, weight, bias, logvar, likelihood, expected_upstream, row_weights, want_grads,
                 want_logvar_grad, num_mixtures, num_bits, log_scale_min)
    chunk = _dmol_chunk if likelihood == DMOL else _elementwise_chunk
    num_examples, positions, _ = h.shape
    for n0, n1, p0, p1 in _chunks(num_examples, positions, weight.shape[0], chunk_elements):
        bad = chunk(head, h[n0:n1, p0:p1], _x_rows(x, n0, n1, p0, p1), n0, n1, p0, p1)
        head.invalid = head.invalid + (bad if isinstance(bad, int) else bad.sum())  # (an int, or per-row counts)
    return head.results()  # (the count an int or a tensor)


def _head_fake(h, weight, bias, x, logvar, likelihood, chunk_elements, expected_upstream=1.0, row_weights=None,
               want_grads=True, want_logvar_grad=False, num_mixtures=0, num_bits=8, log_scale_min=-7.0):
    empty = h.new_empty(0)
    return (h.new_empty((h.shape[0],), dtype=acc_dtype(h.dtype)), _new_grad_h(h) if want_grads else empty,
            weight.new_empty(weight.shape) if want_grads else empty,
            bias.new_empty(bias.shape) if want_grads and bias is not None else empty,
            logvar.new_empty(logvar.shape) if want_grads and want_logvar_grad and logvar is not None else empty,
            h.new_empty((), dtype=torch.int64))


def _present(t):
    # absent outputs are None (the eager shortcut) or the dispatcher's (0,) placeholder
    return None if t is None or (t.dim() == 1 and t.shape[0] == 0) else t


def _upstream_factor(grad_out: torch.Tensor, expected: float):
    """1.0 if grad_out is the expected upstream (to a few ulps), c if it is c times it in every row,
    None otherwise (then backward recomputes with per-row weights). A host read of N values; under
    torch.compile or for non-plain tensors None (the recompute is always correct)."""
    if torch.compiler.is_compiling() or not is_plain(grad_out) or is_legacy_batched(grad_out) or grad_out.numel() == 0:
        return None
    # the usual case, the expected upstream itself: on CPU one C++ read (four small torch ops and two host reads
    # below cost 40 us a call after the head's GEMMs)
    values_within = getattr(kernels_for(grad_out), "values_within", None)
    if values_within is not None:
        tolerance = SKIP_CHECK_ULPS * torch.finfo(grad_out.dtype).eps * abs(expected)
        if values_within(grad_out, expected - tolerance, expected + tolerance):
            return 1.0
    first = float(grad_out.reshape(-1)[0])
    tolerance = SKIP_CHECK_ULPS * torch.finfo(grad_out.dtype).eps * max(abs(first), abs(expected))
    if float((grad_out - first).abs().max()) > tolerance:
        return None
    return 1.0 if abs(first - expected) <= tolerance else first / expected


class LinearLogProbFunction(torch.autograd.Function):
    """``torch.ops.vae_fast.linear_log_prob`` with its autograd: the gradients come from forward,
    times the expected upstream gradient; backward returns them (any upstream that is the same
    multiple of the expected one in every row: scaled), or recomputes them chunk by chunk with the
    actual per-row upstream. No double backward (RuntimeError)."""

    @staticmethod
    def forward(h, weight, bias, x, logvar, likelihood, chunk_elements, expected_upstream=1.0, row_weights=None,
                want_grads=True, want_logvar_grad=False, num_mixtures=0, num_bits=8, log_scale_min=-7.0):
        h = _traceable_layout(h)
        return call(torch.ops.vae_fast.linear_log_prob.default, _head_kernel, h, weight, bias, x, logvar, likelihood,
                    chunk_elements, expected_upstream, row_weights, want_grads, want_logvar_grad, num_mixtures,
                    num_bits, log_scale_min)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, weight, bias, x, logvar, likelihood, chunk_elements = inputs[:7]
        ctx.expected_upstream = inputs[7] if len(inputs) > 7 else 1.0
        ctx.want_logvar_grad = inputs[10] if len(inputs) > 10 else False
        ctx.likelihood, ctx.chunk_elements = likelihood, chunk_elements
        ctx.mixture = tuple(inputs[11:14])  # (num_mixtures, num_bits, log_scale_min) when given
        ctx.set_materialize_grads(False)
        mark_non_differentiable(ctx, *output[1:])
        ctx.save_for_backward(h, weight, bias, x, logvar, *output[1:5])

    @staticmethod
    def backward(ctx, grad_out, *unused):
        if grad_out is None:
            return (None,) * 14
        h, weight, bias, x, logvar, *grads = ctx.saved_tensors
        grad_h, grad_w, grad_b, grad_lv = _head_gradients(ctx, grad_out, h, weight, bias, x, logvar, grads)
        needs = ctx.needs_input_grad
        return (grad_h if needs[0] else None, grad_w if needs[1] else None, grad_b if needs[2] else None, None,
                grad_lv if needs[4] else None, *(None,) * 9)


def _head_gradients(ctx, grad_out, h, weight, bias, x, logvar, grads, op_operands=None) -> list:
    """[d/dh, d/dW, d/db, d/dlogvar] for ``grad_out`` from the gradients forward computed (``grads``, times the
    expected upstream; absent ones None or (0,)): themselves, scaled, or recomputed chunk by chunk with grad_out as
    per-row weights. ``h``, ``x``, ``logvar``: the op's operands; or the per-step call's, with ``op_operands``
    turning them into the op's (called for a recompute only; its d/dh is viewed back to h's shape)."""
    if torch.is_grad_enabled():
        under_func = torch._C._are_functorch_transforms_active()
        raise RuntimeError("vae_fast.linear_log_prob: double backward (create_graph=True) is not supported"
                           + (" (torch.func's grad / jacrev / vmap(grad) run backward that way, even for a first "
                              "derivative)" if under_func else "")
                           + "; use the unfused head (F.linear + the likelihood) for higher derivatives"
                           + (" and under torch.func" if under_func else ""))
    grads = [_present(g) for g in grads]
    if all(g is None for g in grads):
        raise RuntimeError("vae_fast.linear_log_prob: called with want_grads=False, nothing to differentiate")
    factor = _upstream_factor(grad_out, ctx.expected_upstream)
    if factor is None:  # per-row upstream: one more chunked pass with those weights
        weights = grad_out.reshape(-1).to(acc_dtype(h.dtype))
        h_shape = h.shape
        if op_operands is not None:
            h, x, logvar = op_operands(ctx, h, weight, x)
        op = torch.ops.vae_fast.linear_log_prob.default
        args = (_traceable_layout(h), weight, bias, x, logvar, ctx.likelihood, ctx.chunk_elements, 1.0, weights, True,
                ctx.want_logvar_grad, *ctx.mixture)
        # (is_grads_batched: batched weights go through the dispatcher, see _validation.is_legacy_batched)
        _, *grads, _ = op(*args) if is_legacy_batched(weights) else call(op, _head_kernel, *args)
        grads = [_present(g) for g in grads]
        if op_operands is not None:
            grads[0] = grads[0].view(h_shape)
    elif factor != 1.0:
        grads = [None if g is None else g * factor for g in grads]
    return grads


register_op(
    "linear_log_prob",
    "(Tensor h, Tensor weight, Tensor? bias, Tensor x, Tensor? logvar, int likelihood, int chunk_elements, "
    "float expected_upstream=1.0, Tensor? row_weights=None, bool want_grads=True, bool want_logvar_grad=False, "
    "int num_mixtures=0, int num_bits=8, float log_scale_min=-7.0) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _head_kernel, _head_fake, LinearLogProbFunction)

apply_linear_log_prob = fast_apply(LinearLogProbFunction, _head_kernel, eager_outputs=(0, 5),  # log_prob, num_invalid
                                   jvp=no_forward_ad("linear_log_prob"))


class LinearStep(torch.autograd.Function):
    """The per-step call of :class:`LinearLogProbFunction` (see :func:`linear_step`): forward(h (N, *, H), weight
    (O, H), bias (O,) | None, x, plan) -> log_prob (N,) in one chunk: the output GEMM, the likelihood's step kernel,
    and the GEMMs of d/dh, d/dW and the column sum of d/db (those of the operands that require grad), with no chunk
    loop, accumulators or op-frame views around them (about 110 us of Python a call on the MNIST head). Its ctx
    holds what backward reads from LinearLogProbFunction's (a float scale as ``scale``); backward is
    :func:`_head_gradients`."""

    @staticmethod
    def forward(ctx, h, weight, bias, x, plan):
        kernels, likelihood, scale, examples, positions, out_features, wants, expected_upstream, chunk_elements = plan
        want_h, want_w, want_b = wants
        want_grads = want_h or want_w or want_b
        h2 = h.view(examples * positions, h.shape[-1])  # (N P, H): h is contiguous (and H may be 0)
        out = torch.mm(h2, weight.t()) if bias is None else torch.addmm(bias, h2, weight.t())
        if likelihood == CATEGORICAL:
            log_prob, grad, bad = kernels.categorical_step_log_prob(out, x, examples, out_features, want_grads,
                                                                    expected_upstream)
            if bad:
                raise_if_invalid(bad, categorical_support_message(out_features))
        else:
            log_prob, grad, _, bad = kernels.elementwise_step_log_prob(out, x, scale, examples, out.numel(), likelihood,
                                                                       want_grads, False, expected_upstream)
            if bad:
                raise_if_invalid(bad, SUPPORT_MESSAGES[likelihood])
        del out
        if want_grads:  # (only the gradients asked for: a frozen decoder's head skips the d/dW GEMM)
            ctx.save_for_backward(h, weight, bias, x, torch.mm(grad, weight).view(h.shape) if want_h else None,
                                  torch.mm(grad.t(), h2) if want_w else None, grad.sum(0) if want_b else None)
            ctx.expected_upstream, ctx.likelihood, ctx.chunk_elements, ctx.scale = (expected_upstream, likelihood,
                                                                                   chunk_elements, scale)
        return log_prob

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, x, *grads = ctx.saved_tensors
        grad_h, grad_w, grad_b = _head_gradients(ctx, grad_out, h, weight, bias, x, None, grads + [None],
                                                 LinearStep.op_operands)[:3]
        needs = ctx.needs_input_grad
        return grad_h if needs[0] else None, grad_w if needs[1] else None, grad_b if needs[2] else None, None, None

    @staticmethod
    def op_operands(ctx, h, weight, x):
        """The saved h (N, *, H) and x as the op's operands h (N, P, H), x (N, P, O) or (N, P) (categorical), and the
        float scale as its (1, 1, 1) logvar operand: for a recompute with per-row weights."""
        examples, positions = h.shape[0], math.prod(h.shape[1:-1])
        x_frame = (examples, positions) if ctx.likelihood == CATEGORICAL else (examples, positions, weight.shape[0])
        return (h.view(examples, positions, h.shape[-1]), x.view(x_frame),
                None if ctx.scale is None else h.new_full((1, 1, 1), ctx.scale))


step_ctx_constants(LinearStep, want_logvar_grad=False, mixture=())
_apply_linear_step = eager_function_apply(LinearStep)
_STEP_DTYPES = (torch.float32, torch.float64)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # (a module's weight and bias are Parameters)


def linear_step(h, weight, bias, x, likelihood: int, scale: float | None, reduction: str,
                max_chunk_bytes: int | None) -> torch.Tensor | None:
    """:func:`vae_fast.linear_log_prob` of a Linear head (channel_dim = -1, no sample dim) with an elementwise
    likelihood (``scale``: None, or the Gaussian's / Laplace's fixed log-variance / log-scale as a float) or the
    categorical, through :class:`LinearStep`; None when the call does not qualify (the caller then checks its
    arguments and takes the chunked op). Returns log_prob (N,).

    The call qualifies when it is plain eager (see :func:`step_kernels_for`), h (N, *, H) with N > 0, weight (O, H),
    bias (O,) or None (tensors or Parameters) and x are plain contiguous CPU tensors, h, weight, bias float32 or
    float64 of one dtype, x of it too with the output's shape (N, *, O), or int64 / uint8 class indices (N, *) for
    the categorical, x does not require grad, and the whole output fits one chunk of the default budget (or of
    ``max_chunk_bytes``). The tests are attribute reads in one expression, as in
    :func:`vae_fast.ops.likelihood.elementwise_step`."""
    categorical = likelihood == CATEGORICAL
    try:
        if not (type(h) in _PLAIN_TYPES and type(weight) in _PLAIN_TYPES and type(x) is torch.Tensor
                and (bias is None or type(bias) in _PLAIN_TYPES) and (dtype := h.dtype) in _STEP_DTYPES
                and weight.dtype == dtype and h.layout is STRIDED and weight.layout is STRIDED and x.layout is STRIDED
                and x.is_cpu and weight.is_cpu and not x.requires_grad
                and len(h_shape := h.shape) > 1 and (examples := h_shape[0]) > 0 and weight.dim() == 2
                and weight.shape[1] == h_shape[-1] and h.is_contiguous() and weight.is_contiguous()
                and x.is_contiguous()):
            return None
        out_features = weight.shape[0]
        if bias is not None and not (bias.dtype == dtype and bias.is_cpu and bias.layout is STRIDED
                                     and bias.shape == (out_features,) and bias.is_contiguous()):
            return None
        if categorical:
            if not ((x.dtype == torch.int64 or x.dtype == torch.uint8) and x.shape == h_shape[:-1]):
                return None
        elif not (x.dtype == dtype and x.shape[:-1] == h_shape[:-1] and x.shape[-1] == out_features):
            return None
    except RuntimeError:  # a nested tensor's shape (see _validation.STRIDED)
        return None
    positions = math.prod(h_shape[1:-1])
    chunk_elements = chunk_elements_for(max_chunk_bytes, h.element_size(), out_features=out_features,
                                        positions=positions)
    if examples * positions * out_features > chunk_elements:  # more than one chunk: the chunked op
        return None
    kernels = step_kernels_for(h, 0)  # (also: h's dtype has a step kernel)
    if kernels is None:
        return None
    if torch.is_grad_enabled():
        wants = (h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    else:
        wants = (False, False, False)
    expected_upstream = -1.0 if reduction == "sum" else -1.0 / examples  # (default_expected_upstream; N > 0)
    return _apply_linear_step(h, weight, bias, x, (kernels, likelihood, scale, examples, positions, out_features, wants,
                                                   expected_upstream, chunk_elements))
