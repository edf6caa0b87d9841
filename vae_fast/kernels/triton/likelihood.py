"""Triton reconstruction kernels with the gradient computed in the forward pass.

Elementwise likelihoods (Bernoulli, continuous Bernoulli, Gaussian, mean squared error, Laplace): one program
per (row, chunk of columns) of the decoder output; the chunk's log-likelihood is accumulated in
registers and stored once (the row's value when the row is one chunk; partial sums reduced
afterwards otherwise), d log p / d theta is written in the same pass.
Categorical: one program per (row, block of pixels); a block of PIXELS x C logits
is loaded once, log-softmax and its gradient come from that tile, and per-block
partial sums are reduced afterwards (deterministic, no atomics).
"""
import triton
import triton.language as tl

from ._math import LN2, LOG_2PI, continuous_bernoulli_log_norm, log1p_nonneg


@triton.jit
def elementwise_terms(theta, x, lv, LIKELIHOOD: tl.constexpr):
    """(log p, d log p / d theta, d log p / d lv, out-of-support flag) per element for the
    elementwise likelihoods (codes of ops/codes.py); lv is the Gaussian's log-variance or the
    Laplace's log-scale (ignored otherwise). Shared by the row kernel and the fused-head kernel.
    Out of the support: x outside [0, 1] for the Bernoulli family, NaN for every likelihood."""
    if LIKELIHOOD == 2:  # Gaussian: theta is the mean (0 * inf -> 0 where x = mean, as in C++)
        diff = x - theta
        inv_var = tl.exp(-lv)
        scaled_sq = tl.where(diff == 0.0, 0.0, diff * diff * inv_var)
        value = -0.5 * (scaled_sq + lv + LOG_2PI)
        grad = tl.where(diff == 0.0, 0.0, diff * inv_var)
        grad_lv = 0.5 * (scaled_sq - 1.0)
        bad = x != x
    elif LIKELIHOOD == 4:  # Laplace: theta is the mean, lv the log-scale s = log b
        diff = x - theta
        inv_b = tl.exp(-lv)
        scaled = tl.where(diff == 0.0, 0.0, tl.abs(diff) * inv_b)
        value = -scaled - lv - LN2
        grad = tl.where(diff > 0.0, inv_b, tl.where(diff < 0.0, -inv_b, 0.0))
        grad_lv = scaled - 1.0
        bad = x != x
    elif LIKELIHOOD == 3:  # mean squared error: -(x - mean)^2 here, the row kernel divides by D
        diff = x - theta
        value = -diff * diff
        grad = 2.0 * diff
        grad_lv = diff * 0.0
        bad = x != x
    else:  # Bernoulli family: theta is the logit; sigmoid and softplus share t = exp(-|l|)
        bad = ~((x >= 0.0) & (x <= 1.0))  # (NaN too)
        t = tl.exp(-tl.abs(theta))
        inv_one_plus_t = 1.0 / (1.0 + t)
        softplus = tl.maximum(theta, 0.0) + log1p_nonneg(t)
        sigmoid = tl.where(theta >= 0.0, inv_one_plus_t, t * inv_one_plus_t)
        value = x * theta - softplus
        grad = x - sigmoid
        if LIKELIHOOD == 1:
            log_c, dlog_c = continuous_bernoulli_log_norm(theta, t)
            value += log_c
            grad += dlog_c
        grad_lv = grad * 0.0
    return value, grad, grad_lv, bad


@triton.jit
def elementwise_kernel(
    theta_ptr, x_ptr, logvar_ptr, lv_row_stride, lv_col_stride,
    log_prob_ptr, grad_ptr, grad_logvar_ptr, invalid_ptr, expected_upstream_ptr,
    x_rows, dim,
    LIKELIHOOD: tl.constexpr, WANT_GRAD: tl.constexpr, WANT_LOGVAR_GRAD: tl.constexpr,
    LOGVAR_GRAD_PER_ROW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Program (row, chunk) scores columns [chunk * CHUNK, min(dim, (chunk + 1) * CHUNK)) of a row and writes
    its sums (log p, the invalid count, a per-row logvar gradient) to slot row * chunks + chunk: the row's own
    values when a row is one chunk (chunks = 1, CHUNK >= dim)."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * dim may exceed 2^31
    x_row = row % x_rows                 # K decoder samples share one x
    col_begin = tl.program_id(1) * CHUNK
    col_end = tl.minimum(col_begin + CHUNK, dim)
    slot = row * tl.num_programs(1) + tl.program_id(1)
    upstream = tl.load(expected_upstream_ptr).to(ACC)  # the expected upstream gradient (ops/likelihood.py)
    if LIKELIHOOD == 3:  # the mean squared error's 1/D, folded into the gradient's factor and applied to the sum
        inv_dim = 1.0 / tl.maximum(dim, 1).to(ACC)
        upstream = upstream * inv_dim
    total = tl.zeros([BLOCK], dtype=ACC)
    lv_total = tl.zeros([BLOCK], dtype=ACC)  # (LOGVAR_GRAD_PER_ROW: a logvar constant along the row gets the row's sum)
    invalid = tl.zeros([BLOCK], dtype=tl.int32)
    for j0 in range(col_begin, col_end, BLOCK):
        cols = j0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < col_end
        offs = row * dim + cols
        theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + x_row * dim + cols, mask=mask, other=0.0).to(ACC)
        if LIKELIHOOD == 2 or LIKELIHOOD == 4:
            lv = tl.load(logvar_ptr + row * lv_row_stride + cols * lv_col_stride, mask=mask, other=0.0).to(ACC)
        else:
            lv = theta * 0.0
        value, grad, grad_lv, bad = elementwise_terms(theta, x, lv, LIKELIHOOD)
        invalid += tl.where(mask & bad, 1, 0)
        total += tl.where(mask, value, 0.0)
        if WANT_GRAD:
            tl.store(grad_ptr + offs, grad * upstream, mask=mask)
        if WANT_LOGVAR_GRAD:
            if LOGVAR_GRAD_PER_ROW:
                lv_total += tl.where(mask, grad_lv, 0.0)
            else:
                tl.store(grad_logvar_ptr + offs, grad_lv * upstream, mask=mask)
    if LIKELIHOOD == 3:
        tl.store(log_prob_ptr + slot, tl.sum(total, axis=0) / tl.maximum(dim, 1).to(ACC))
    else:
        tl.store(log_prob_ptr + slot, tl.sum(total, axis=0))
    if WANT_LOGVAR_GRAD and LOGVAR_GRAD_PER_ROW:
        tl.store(grad_logvar_ptr + slot, tl.sum(lv_total, axis=0))  # (unscaled, see kernels/protocol.py)
    tl.store(invalid_ptr + slot, tl.sum(invalid, axis=0))


@triton.jit
def head_row_block(h_ptr, h_row_stride, h_col_stride, row_factor_ptr, expected_upstream_ptr, rows, features,
                   HAS_ROW_FACTOR: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """A fused head program's rows: (their indices, mask, feature indices, mask, the (BLOCK_M, BLOCK_H)
    block of h in registers, each row's upstream factor: row_factor[r], or the expected upstream)."""
    rows_idx = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows_idx < rows
    hcols = tl.arange(0, BLOCK_H).to(tl.int64)
    h_mask = hcols < features
    h = tl.load(h_ptr + rows_idx[:, None] * h_row_stride + hcols[None, :] * h_col_stride,
                mask=row_mask[:, None] & h_mask[None, :], other=0.0).to(ACC)
    if HAS_ROW_FACTOR:
        factor = tl.load(row_factor_ptr + rows_idx, mask=row_mask, other=0.0).to(ACC)
    else:
        factor = tl.zeros([BLOCK_M], dtype=ACC) + tl.load(expected_upstream_ptr).to(ACC)
    return rows_idx, row_mask, hcols, h_mask, h, factor


@triton.jit
def head_output_tile(h, w_ptr, b_ptr, o0, hcols, h_mask, features, out_features, HAS_BIAS: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_O: tl.constexpr):
    """One output tile of a fused head, in registers: (its columns, their mask, the weight tile
    (BLOCK_O, BLOCK_H), h W^T + b (BLOCK_M, BLOCK_O))."""
    ocols = o0 + tl.arange(0, BLOCK_O).to(tl.int64)
    o_mask = ocols < out_features
    w = tl.load(w_ptr + ocols[:, None] * features + hcols[None, :], mask=o_mask[:, None] & h_mask[None, :],
                other=0.0).to(ACC)
    out = tl.dot(h, tl.trans(w))
    if HAS_BIAS:
        out += tl.load(b_ptr + ocols, mask=o_mask, other=0.0).to(ACC)[None, :]
    return ocols, o_mask, w, out


@triton.jit
def head_tile_gradients(g, h, w, ocols, o_mask, hcols, h_mask, grad_w_ptr, grad_b_ptr, features,
                        HAS_BIAS: tl.constexpr):
    """A tile's gradient g (BLOCK_M, BLOCK_O) into d/dW (g^T h) and d/db (sum g) by float32 atomic adds;
    returns its share of d/dh, g W."""
    tl.atomic_add(grad_w_ptr + ocols[:, None] * features + hcols[None, :], tl.dot(tl.trans(g), h),
                  mask=o_mask[:, None] & h_mask[None, :])
    if HAS_BIAS:
        tl.atomic_add(grad_b_ptr + ocols, tl.sum(g, axis=0), mask=o_mask)
    return tl.dot(g, w)


@triton.jit
def linear_elementwise_kernel(
    h_ptr, h_row_stride, h_col_stride, w_ptr, b_ptr, x_ptr, log_scale_ptr, row_factor_ptr,
    log_prob_ptr, grad_h_ptr, grad_w_ptr, grad_b_ptr, invalid_ptr, expected_upstream_ptr,
    rows, x_rows, out_features, features,
    LIKELIHOOD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROW_FACTOR: tl.constexpr, WANT_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """A fused Linear head with an elementwise likelihood, Cut-Cross-Entropy style: each program
    takes BLOCK_M rows of h (all H <= BLOCK_H features in registers) and walks the outputs in tiles of
    BLOCK_O; each output tile h W^T + b lives only in registers, where its log-likelihood, its
    gradient g, g W (d/dh, accumulated over the tiles) and g^T h, sum g (d/dW, d/db: float32 atomic
    adds) are formed. The output never reaches memory. log_scale_ptr: a fixed Gaussian log-variance /
    Laplace log-scale (one value). Row r is scored against x row r % x_rows; per-row log p is written (the caller
    sums an example's positions); gradients are times the expected upstream, or the row factor."""
    rows_idx, row_mask, hcols, h_mask, h, factor = head_row_block(
        h_ptr, h_row_stride, h_col_stride, row_factor_ptr, expected_upstream_ptr, rows, features, HAS_ROW_FACTOR,
        ACC, BLOCK_M, BLOCK_H)
    x_row = rows_idx % x_rows
    if LIKELIHOOD == 2 or LIKELIHOOD == 4:
        log_scale = tl.load(log_scale_ptr).to(ACC)
    else:
        log_scale = 0.0
    log_prob = tl.zeros([BLOCK_M], dtype=ACC)
    invalid = tl.zeros([BLOCK_M], dtype=tl.int32)
    grad_h = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
    for o0 in range(0, out_features, BLOCK_O):
        ocols, o_mask, w, theta = head_output_tile(h, w_ptr, b_ptr, o0, hcols, h_mask, features, out_features,
                                                   HAS_BIAS, ACC, BLOCK_O)
        tile_mask = row_mask[:, None] & o_mask[None, :]
        x = tl.load(x_ptr + x_row[:, None] * out_features + ocols[None, :], mask=tile_mask, other=0.0).to(ACC)
        value, grad, _, bad = elementwise_terms(theta, x, theta * 0.0 + log_scale, LIKELIHOOD)
        log_prob += tl.sum(tl.where(tile_mask, value, 0.0), axis=1)
        invalid += tl.sum(tl.where(tile_mask & bad, 1, 0), axis=1)  # (x outside the support)
        if WANT_GRAD:
            g = tl.where(tile_mask, grad * factor[:, None], 0.0)
            grad_h += head_tile_gradients(g, h, w, ocols, o_mask, hcols, h_mask, grad_w_ptr, grad_b_ptr, features,
                                          HAS_BIAS)
    tl.store(log_prob_ptr + rows_idx, log_prob, mask=row_mask)
    tl.store(invalid_ptr + rows_idx, invalid, mask=row_mask)
    if WANT_GRAD:
        tl.store(grad_h_ptr + rows_idx[:, None] * features + hcols[None, :], grad_h,
                 mask=row_mask[:, None] & h_mask[None, :])


@triton.jit
def categorical_kernel(
    logits_ptr, target_ptr, partial_ptr, grad_ptr, invalid_ptr, expected_upstream_ptr,
    x_rows, pixels, classes, num_pixel_blocks,
    WANT_GRAD: tl.constexpr, ACC: tl.constexpr, PIXELS: tl.constexpr, CLASSES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    pix = block * PIXELS + tl.arange(0, PIXELS).to(tl.int64)
    cls = tl.arange(0, CLASSES).to(tl.int64)
    pix_mask = pix < pixels
    tile_mask = pix_mask[:, None] & (cls[None, :] < classes)
    # 1. load the targets; out-of-range ones are counted, then clamped so nothing reads out of bounds
    # (int64, or uint8 8-bit pixels: widened here, in registers)
    target = tl.load(target_ptr + (row % x_rows) * pixels + pix, mask=pix_mask, other=0).to(tl.int64)
    bad = pix_mask & ((target < 0) | (target >= classes))
    target = tl.where(bad, 0, target)
    # 2. one tile of logits -> max-shifted log-sum-exp per pixel
    offs = (row * pixels + pix)[:, None] * classes + cls[None, :]
    logits = tl.load(logits_ptr + offs, mask=tile_mask, other=-float("inf")).to(ACC)
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(pix_mask, row_max, 0.0)
    shifted = logits - row_max[:, None]
    lse = row_max + tl.log(tl.sum(tl.exp(shifted), axis=1))
    is_target = cls[None, :] == target[:, None]
    target_logit = tl.sum(tl.where(is_target & tile_mask, logits, 0.0), axis=1)
    log_prob = tl.where(pix_mask, target_logit - lse, 0.0)
    # 3. gradient of log p: onehot - softmax, written from the same tile
    if WANT_GRAD:
        upstream = tl.load(expected_upstream_ptr).to(ACC)
        grad = tl.where(is_target, 1.0, 0.0) - tl.exp(logits - lse[:, None])
        tl.store(grad_ptr + offs, grad * upstream, mask=tile_mask)
    tl.store(partial_ptr + row * num_pixel_blocks + block, tl.sum(log_prob, axis=0))
    tl.store(invalid_ptr + row * num_pixel_blocks + block, tl.sum(bad.to(tl.int32), axis=0))


@triton.jit
def scale_rows_kernel(grad_ptr, factor_ptr, row_len, TOLERANCE: tl.constexpr, BLOCK: tl.constexpr):
    """grad[r, :] *= factor[r], except where factor[r] is 1 to within TOLERANCE: then the block
    does nothing, reads nothing (a device-side decision, no host sync)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    factor = tl.load(factor_ptr + row)
    if (tl.abs(factor - 1.0) > TOLERANCE) | (factor != factor):  # a NaN upstream gradient propagates
        mask = cols < row_len
        offs = row * row_len + cols
        values = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        tl.store(grad_ptr + offs, (values * factor).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def linear_categorical_kernel(
    h_ptr, h_row_stride, h_col_stride, w_ptr, b_ptr, target_ptr, row_factor_ptr,
    log_prob_ptr, grad_h_ptr, grad_w_ptr, grad_b_ptr, invalid_ptr, expected_upstream_ptr,
    rows, x_rows, classes, features,
    HAS_BIAS: tl.constexpr, HAS_ROW_FACTOR: tl.constexpr, WANT_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """A fused Linear head with a categorical likelihood (Cut Cross-Entropy): pass 1 walks the class
    tiles of h W^T + b in registers for a max-shifted log-sum-exp (online: running max and rescaled
    sum) and the target's logit; pass 2 (gradients) forms each tile again, its gradient
    (onehot - softmax) * upstream, g W into d/dh and g^T h, sum g into d/dW, d/db (float32 atomics).
    The logits never reach memory. Targets outside [0, classes) are counted and score class 0."""
    rows_idx, row_mask, hcols, h_mask, h, factor = head_row_block(
        h_ptr, h_row_stride, h_col_stride, row_factor_ptr, expected_upstream_ptr, rows, features, HAS_ROW_FACTOR,
        ACC, BLOCK_M, BLOCK_H)
    target = tl.load(target_ptr + rows_idx % x_rows, mask=row_mask, other=0)
    bad = row_mask & ((target < 0) | (target >= classes))
    target = tl.where(bad, 0, target)
    running_max = tl.zeros([BLOCK_M], dtype=ACC) - float("inf")
    running_sum = tl.zeros([BLOCK_M], dtype=ACC)
    target_logit = tl.zeros([BLOCK_M], dtype=ACC)
    for o0 in range(0, classes, BLOCK_O):
        ocols, o_mask, w, logits = head_output_tile(h, w_ptr, b_ptr, o0, hcols, h_mask, features, classes, HAS_BIAS,
                                                    ACC, BLOCK_O)
        logits = tl.where(o_mask[None, :], logits, -float("inf"))
        tile_max = tl.max(logits, axis=1)
        new_max = tl.maximum(running_max, tile_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(ocols[None, :] == target[:, None], logits, 0.0), axis=1)
    lse = running_max + tl.log(running_sum)
    tl.store(log_prob_ptr + rows_idx, target_logit - lse, mask=row_mask)
    tl.store(invalid_ptr + rows_idx, bad.to(tl.int32), mask=row_mask)
    if WANT_GRAD:
        grad_h = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
        for o0 in range(0, classes, BLOCK_O):  # the same tiles again, now with the log-sum-exp known
            ocols, o_mask, w, logits = head_output_tile(h, w_ptr, b_ptr, o0, hcols, h_mask, features, classes,
                                                        HAS_BIAS, ACC, BLOCK_O)
            tile_mask = row_mask[:, None] & o_mask[None, :]
            onehot = tl.where(ocols[None, :] == target[:, None], 1.0, 0.0)
            g = tl.where(tile_mask, (onehot - tl.exp(logits - lse[:, None])) * factor[:, None], 0.0)
            grad_h += head_tile_gradients(g, h, w, ocols, o_mask, hcols, h_mask, grad_w_ptr, grad_b_ptr, features,
                                          HAS_BIAS)
        tl.store(grad_h_ptr + rows_idx[:, None] * features + hcols[None, :], grad_h,
                 mask=row_mask[:, None] & h_mask[None, :])
