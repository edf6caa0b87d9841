"""Triton latent kernels: one program per (batch row, chunk of the latent dim), looping over its columns
(a row is one chunk up to ``ROW_CHUNK`` elements of kernels/triton/__init__.py: a conv latent of a few
large images still spreads over the GPU).

mu and scale are read through their row strides (unit column stride): the halves of a chunked
encoder output (``moments.chunk(2, dim=1)``) go in without a copy. Outputs are contiguous.

Forward: z = mu + sigma * eps for K samples and the analytic KL (per row, and per
dim if asked) in one pass. Backward: eps is recomputed from the Philox stream (tl.randn4x)
— the same Philox stream as csrc/latent.cpp — and never stored; the noise of an element depends on
its index only, not on the chunking. A chunk's KL is accumulated in registers and stored once (a
row's partial sums are added afterwards in a fixed order), so results are deterministic.
"""
import triton
import triton.language as tl

from ._math import LN2, philox_normal, philox_normal_aligned, scale_terms


@triton.jit
def prior_terms(mu, row, cols, mask, prior_mu_ptr, pm_row_stride, pm_col_stride,
                prior_logvar_ptr, plv_row_stride, plv_col_stride, HAS_PRIOR: tl.constexpr, ACC: tl.constexpr):
    """(prior log-variance, mu - prior mean, 1 / prior std) for one block of a row; the prior
    is read through its broadcast strides, N(0, I) when absent.

    1 / prior std = e^(-plv/2), not the variance's e^-plv: diff^2 e^-plv is formed as
    (diff e^(-plv/2))^2, finite in float32 for plv down to -177 (e^-plv overflows below -88.7,
    and then 0 * inf gave NaN where q = p)."""
    if HAS_PRIOR:
        pmu = tl.load(prior_mu_ptr + row * pm_row_stride + cols * pm_col_stride, mask=mask, other=0.0).to(ACC)
        plv = tl.load(prior_logvar_ptr + row * plv_row_stride + cols * plv_col_stride, mask=mask, other=0.0).to(ACC)
        return plv, mu - pmu, tl.exp(-0.5 * plv)
    else:
        return mu * 0.0, mu, mu * 0.0 + 1.0


@triton.jit
def scaled_by(value, inv_prior_std):
    """value e^(-plv/2) with 0 * inf = 0 (an exactly matching prior mean contributes nothing)."""
    return tl.where(value == 0.0, 0.0, value * inv_prior_std)


@triton.jit
def latent_forward_kernel(
    mu_ptr, mu_row_stride, scale_ptr, scale_row_stride,
    prior_mu_ptr, pm_row_stride, pm_col_stride,
    prior_logvar_ptr, plv_row_stride, plv_col_stride,
    eps_ptr, seed_ptr,
    z_ptr, kl_ptr, kl_per_dim_ptr, log_ratio_ptr,
    batch, dim, samples,
    PARAM: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_EPS: tl.constexpr, WANT_KL_PER_DIM: tl.constexpr,
    WANT_LOG_RATIO: tl.constexpr, DIM_MULTIPLE_OF_4: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program (row, chunk): columns [chunk * CHUNK, min(dim, (chunk + 1) * CHUNK)) of a row (CHUNK >= dim when
    a row is one chunk; else a multiple of BLOCK, and so of 4); its KL sum goes to slot row * chunks + chunk of
    kl_ptr, its log-ratio sums to slot (k * batch + row) * chunks + chunk of log_ratio_ptr (zeroed by the caller)."""
    # int64 before multiplying by strides: batch * dim * samples may exceed 2^31
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.num_programs(1)
    slot = row * chunks + tl.program_id(1)  # (sample k's log-ratio slot: slot + k * batch * chunks)
    col_begin = tl.program_id(1) * CHUNK
    col_end = tl.minimum(col_begin + CHUNK, dim)
    seed = tl.load(seed_ptr)
    kl_acc = tl.zeros([BLOCK], dtype=ACC)
    for j0 in range(col_begin, col_end, BLOCK):
        cols = j0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < col_end
        offs = row * dim + cols  # outputs are contiguous; mu and scale rows may be strided
        # 1. load q's parameters (and the prior's, through its broadcast strides)
        mu = tl.load(mu_ptr + row * mu_row_stride + cols, mask=mask, other=0.0).to(ACC)
        s = tl.load(scale_ptr + row * scale_row_stride + cols, mask=mask, other=0.0).to(ACC)
        sigma, logvar, _, _ = scale_terms(s, PARAM)
        plv, diff, inv_prior_std = prior_terms(
            mu, row, cols, mask, prior_mu_ptr, pm_row_stride, pm_col_stride,
            prior_logvar_ptr, plv_row_stride, plv_col_stride, HAS_PRIOR, ACC)
        # 2. KL = exp(d - ln 2) - (1 + d)/2 + (diff / prior_std)^2 / 2, d = lv - plv (finite up to d = 89 in fp32)
        d = logvar - plv
        scaled_diff = scaled_by(diff, inv_prior_std)
        kl = tl.exp(d - LN2) - 0.5 * (1.0 + d) + 0.5 * scaled_diff * scaled_diff
        kl_acc += tl.where(mask, kl, 0.0)
        if WANT_KL_PER_DIM:
            tl.store(kl_per_dim_ptr + offs, kl, mask=mask)
        # 3. z for each sample; eps from Philox counter (k * batch + row) * dim + col
        for k in range(samples):
            flat = (k * batch + row) * dim + cols
            if HAS_EPS:
                eps = tl.load(eps_ptr + flat, mask=mask, other=0.0).to(ACC)
            elif DIM_MULTIPLE_OF_4:  # the block starts on a Philox group boundary
                eps = philox_normal_aligned(seed, (k * batch + row) * dim + j0, BLOCK).to(ACC)
            else:
                eps = philox_normal(seed, flat).to(ACC)
            z = mu + sigma * eps
            tl.store(z_ptr + flat, z, mask=mask)
            if WANT_LOG_RATIO:
                # log q(z|x) - log p(z) = sum 1/2 [plv - lv - eps^2 + (z - pmu)^2 e^-plv]; this program
                # is its slot's only writer, so a load-add-store accumulates deterministically
                pz = scaled_by(sigma * eps + diff, inv_prior_std)  # (z - prior mean) / prior std
                term = 0.5 * ((plv - logvar) - eps * eps + pz * pz)
                ratio_ptr = log_ratio_ptr + slot + k * batch * chunks
                tl.store(ratio_ptr, tl.load(ratio_ptr) + tl.sum(tl.where(mask, term, 0.0), axis=0))
    tl.store(kl_ptr + slot, tl.sum(kl_acc, axis=0))


@triton.jit
def latent_backward_kernel(
    mu_ptr, mu_row_stride, scale_ptr, scale_row_stride,
    prior_mu_ptr, pm_row_stride, pm_col_stride,
    prior_logvar_ptr, plv_row_stride, plv_col_stride,
    eps_ptr, seed_ptr,
    grad_z_ptr, grad_kl_ptr, grad_kl_per_dim_ptr,
    grad_mu_ptr, grad_scale_ptr, grad_prior_mu_ptr, grad_prior_logvar_ptr,
    batch, dim, samples,
    PARAM: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_EPS: tl.constexpr, HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_KL: tl.constexpr, HAS_GRAD_KL_PER_DIM: tl.constexpr, WANT_PRIOR_GRAD: tl.constexpr,
    DIM_MULTIPLE_OF_4: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Program (row, chunk): the gradients of columns [chunk * CHUNK, min(dim, (chunk + 1) * CHUNK))."""
    row = tl.program_id(0).to(tl.int64)
    col_begin = tl.program_id(1) * CHUNK
    col_end = tl.minimum(col_begin + CHUNK, dim)
    seed = tl.load(seed_ptr)
    if HAS_GRAD_KL:
        row_grad_kl = tl.load(grad_kl_ptr + row).to(ACC)
    else:
        row_grad_kl = 0.0
    for j0 in range(col_begin, col_end, BLOCK):
        cols = j0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < col_end
        offs = row * dim + cols
        mu = tl.load(mu_ptr + row * mu_row_stride + cols, mask=mask, other=0.0).to(ACC)
        s = tl.load(scale_ptr + row * scale_row_stride + cols, mask=mask, other=0.0).to(ACC)
        sigma, logvar, dsigma, dlogvar = scale_terms(s, PARAM)
        # 1. sum_k dL/dz_k and sum_k dL/dz_k * eps_k, with eps recomputed, not loaded
        sum_gz = mu * 0.0
        sum_gz_eps = mu * 0.0
        if HAS_GRAD_Z:
            for k in range(samples):
                flat = (k * batch + row) * dim + cols
                if HAS_EPS:
                    eps = tl.load(eps_ptr + flat, mask=mask, other=0.0).to(ACC)
                elif DIM_MULTIPLE_OF_4:
                    eps = philox_normal_aligned(seed, (k * batch + row) * dim + j0, BLOCK).to(ACC)
                else:
                    eps = philox_normal(seed, flat).to(ACC)
                gz = tl.load(grad_z_ptr + flat, mask=mask, other=0.0).to(ACC)
                sum_gz += gz
                sum_gz_eps += gz * eps
        # 2. KL derivatives (see csrc/latent.cpp)
        plv, diff, inv_prior_std = prior_terms(
            mu, row, cols, mask, prior_mu_ptr, pm_row_stride, pm_col_stride,
            prior_logvar_ptr, plv_row_stride, plv_col_stride, HAS_PRIOR, ACC)
        dkl_dlogvar = tl.exp(logvar - plv - LN2) - 0.5
        scaled_diff = scaled_by(diff, inv_prior_std)
        dkl_dmu = scaled_by(scaled_diff, inv_prior_std)
        g_kl = row_grad_kl + mu * 0.0
        if HAS_GRAD_KL_PER_DIM:
            g_kl += tl.load(grad_kl_per_dim_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(grad_mu_ptr + offs, sum_gz + g_kl * dkl_dmu, mask=mask)
        tl.store(grad_scale_ptr + offs, sum_gz_eps * dsigma + g_kl * dkl_dlogvar * dlogvar, mask=mask)
        if WANT_PRIOR_GRAD:
            tl.store(grad_prior_mu_ptr + offs, -g_kl * dkl_dmu, mask=mask)
            tl.store(grad_prior_logvar_ptr + offs, -g_kl * (dkl_dlogvar + 0.5 * scaled_diff * scaled_diff), mask=mask)
