"""Triton discretised logistic mixture kernel (the math of csrc/dmol.cpp, see there).

One program per (row, block of PIX pixels) holds an (M, PIX) tile of every channel's
parameters. Pass 1 accumulates a_m = logit_m + sum_c log mass_cm and the mixture's
log-sum-exp; pass 2 (gradients only) recomputes each channel's bin terms from the tile,
which is cheaper on a GPU than keeping C tiles of derivatives live, and writes
responsibility-weighted gradients. Per-block partial sums are reduced afterwards
(deterministic, no atomics).
"""
import triton
import triton.language as tl

from ._math import expm1_nonpos, log_sigmoid_and_complement, tanh_via_expm1


@triton.jit
def _logistic_bin(x, mean, ls_raw, HALF_BIN: tl.constexpr, LOG_SCALE_MIN: tl.constexpr):
    """(log mass, d/dmean, d/dlog_scale) of the bin of x under Logistic(mean, e^log_scale)."""
    clamped = ls_raw < LOG_SCALE_MIN
    ls = tl.where(clamped, LOG_SCALE_MIN, ls_raw)
    s = tl.exp(-ls)
    centered = x - mean
    p = s * (centered + HALF_BIN)
    q = s * (centered - HALF_BIN)
    d = (2.0 * HALF_BIN) * s
    has_upper = x <= 1.0 - HALF_BIN
    has_lower = x >= -1.0 + HALF_BIN
    both = has_upper & has_lower
    log_sig_p, sp = log_sigmoid_and_complement(p)
    log_sig_neg_q, sq = log_sigmoid_and_complement(-q)
    em = expm1_nonpos(-d)
    log_mass = tl.where(has_upper, log_sig_p, 0.0) + tl.where(has_lower, log_sig_neg_q, 0.0) + \
        tl.where(both, tl.log(-em), 0.0)
    sp = tl.where(has_upper, sp, 0.0)
    sq = tl.where(has_lower, sq, 0.0)
    e_d = em + 1.0
    width_term = tl.where(both & (e_d != 0.0), d * e_d / -em, 0.0)
    dmean = -s * (sp - sq)
    dls = tl.where(clamped, 0.0, -p * sp + q * sq - width_term)
    return log_mass, dmean, dls


@triton.jit
def _channel_mean(mean_ptr, m_rs, m_cs, m_ms, coef_ptr, c_rs, c_cs, c_ms, row, mix, pix, tile, x_red, x_green,
                  c: tl.constexpr, HAS_COEFFS: tl.constexpr, COEFF_TANH: tl.constexpr, ACC: tl.constexpr):
    """Channel c's means with PixelCNN++'s coupling, and the coefficients used (0 if none)."""
    offs = mix[:, None] * m_ms + pix[None, :]
    mean = tl.load(mean_ptr + row * m_rs + c * m_cs + offs, mask=tile, other=0.0).to(ACC)
    coef_a = mean * 0.0
    coef_b = mean * 0.0
    if HAS_COEFFS and c > 0:
        coef_offs = row * c_rs + mix[:, None] * c_ms + pix[None, :]
        slot_a = 0 if c == 1 else 1
        coef_a = tl.load(coef_ptr + coef_offs + slot_a * c_cs, mask=tile, other=0.0).to(ACC)
        if COEFF_TANH:
            coef_a = tanh_via_expm1(coef_a)
        mean += coef_a * x_red
        if c == 2:
            coef_b = tl.load(coef_ptr + coef_offs + 2 * c_cs, mask=tile, other=0.0).to(ACC)
            if COEFF_TANH:
                coef_b = tanh_via_expm1(coef_b)
            mean += coef_b * x_green
    return mean, coef_a, coef_b


@triton.jit
def dmol_kernel(
    x_ptr, logit_ptr, l_rs, l_ms, mean_ptr, m_rs, m_cs, m_ms, ls_ptr, s_rs, s_cs, s_ms, coef_ptr, c_rs, c_cs, c_ms,
    partial_ptr, invalid_ptr, expected_upstream_ptr,
    g_logit_ptr, gl_rs, gl_ms, g_mean_ptr, gm_rs, gm_cs, gm_ms, g_ls_ptr, gs_rs, gs_cs, gs_ms,
    g_coef_ptr, gc_rs, gc_cs, gc_ms,
    x_rows, mixtures, pixels, num_pixel_blocks,
    CHANNELS: tl.constexpr, HAS_COEFFS: tl.constexpr, COEFF_TANH: tl.constexpr, WANT_GRAD: tl.constexpr,
    HALF_BIN: tl.constexpr, LOG_SCALE_MIN: tl.constexpr, ACC: tl.constexpr, MIX: tl.constexpr, PIX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    pix = block * PIX + tl.arange(0, PIX).to(tl.int64)
    mix = tl.arange(0, MIX).to(tl.int64)
    pix_mask = pix < pixels
    tile = (mix[:, None] < mixtures) & pix_mask[None, :]
    x_base = x_ptr + (row % x_rows) * CHANNELS * pixels
    x_red = tl.load(x_base + pix, mask=pix_mask, other=0.0).to(ACC)[None, :]
    x_green = x_red
    if CHANNELS > 1:
        x_green = tl.load(x_base + pixels + pix, mask=pix_mask, other=0.0).to(ACC)[None, :]

    # pass 1: a_m = logit_m + sum_c log mass_cm, then both log-sum-exps (max-shifted)
    logits = tl.load(logit_ptr + row * l_rs + mix[:, None] * l_ms + pix[None, :], mask=tile,
                     other=-float("inf")).to(ACC)
    mix_logits = logits
    invalid = tl.zeros([PIX], dtype=tl.int32)
    for c in tl.static_range(CHANNELS):
        xc = tl.load(x_base + c * pixels + pix, mask=pix_mask, other=0.0).to(ACC)
        invalid += tl.where(pix_mask & ~((xc >= -1.0) & (xc <= 1.0)), 1, 0)  # (NaN too)
        mean, _a, _b = _channel_mean(mean_ptr, m_rs, m_cs, m_ms, coef_ptr, c_rs, c_cs, c_ms, row, mix, pix, tile,
                                     x_red, x_green, c, HAS_COEFFS, COEFF_TANH, ACC)
        ls = tl.load(ls_ptr + row * s_rs + c * s_cs + mix[:, None] * s_ms + pix[None, :], mask=tile, other=0.0).to(ACC)
        log_mass, _dm, _dls = _logistic_bin(xc[None, :], mean, ls, HALF_BIN, LOG_SCALE_MIN)
        mix_logits += log_mass
    max_mix = tl.max(mix_logits, axis=0)
    max_mix = tl.where(max_mix == -float("inf"), 0.0, max_mix)  # an all -inf column gives -inf, not NaN
    max_logit = tl.max(logits, axis=0)
    max_logit = tl.where(max_logit == -float("inf"), 0.0, max_logit)
    e_mix = tl.exp(mix_logits - max_mix[None, :])
    e_logit = tl.exp(logits - max_logit[None, :])
    sum_mix = tl.sum(e_mix, axis=0)
    sum_logit = tl.sum(e_logit, axis=0)
    log_prob = (max_mix + tl.log(sum_mix)) - (max_logit + tl.log(sum_logit))
    tl.store(partial_ptr + row * num_pixel_blocks + block, tl.sum(tl.where(pix_mask, log_prob, 0.0), axis=0))
    tl.store(invalid_ptr + row * num_pixel_blocks + block, tl.sum(invalid, axis=0))

    # pass 2: responsibility-weighted derivatives
    if WANT_GRAD:
        upstream = tl.load(expected_upstream_ptr).to(ACC)  # the expected upstream gradient
        resp = e_mix / sum_mix[None, :]
        tl.store(g_logit_ptr + row * gl_rs + mix[:, None] * gl_ms + pix[None, :],
                 (resp - e_logit / sum_logit[None, :]) * upstream, mask=tile)
        resp = resp * upstream
        for c in tl.static_range(CHANNELS):
            xc = tl.load(x_base + c * pixels + pix, mask=pix_mask, other=0.0).to(ACC)
            mean, coef_a, coef_b = _channel_mean(mean_ptr, m_rs, m_cs, m_ms, coef_ptr, c_rs, c_cs, c_ms, row, mix,
                                                 pix, tile, x_red, x_green, c, HAS_COEFFS, COEFF_TANH, ACC)
            ls = tl.load(ls_ptr + row * s_rs + c * s_cs + mix[:, None] * s_ms + pix[None, :], mask=tile,
                         other=0.0).to(ACC)
            _lm, dmean, dls = _logistic_bin(xc[None, :], mean, ls, HALF_BIN, LOG_SCALE_MIN)
            dmean = resp * dmean
            tl.store(g_mean_ptr + row * gm_rs + c * gm_cs + mix[:, None] * gm_ms + pix[None, :], dmean, mask=tile)
            tl.store(g_ls_ptr + row * gs_rs + c * gs_cs + mix[:, None] * gs_ms + pix[None, :], resp * dls, mask=tile)
            if HAS_COEFFS and c > 0:
                g_coef = g_coef_ptr + row * gc_rs + mix[:, None] * gc_ms + pix[None, :]
                slope_a = 1.0 - coef_a * coef_a if COEFF_TANH else 1.0
                tl.store(g_coef + (0 if c == 1 else 1) * gc_cs, dmean * x_red * slope_a, mask=tile)
                if c == 2:
                    slope_b = 1.0 - coef_b * coef_b if COEFF_TANH else 1.0
                    tl.store(g_coef + 2 * gc_cs, dmean * x_green * slope_b, mask=tile)
