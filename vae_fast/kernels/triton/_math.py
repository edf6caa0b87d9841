"""Triton device functions shared by the latent and likelihood kernels.

They mirror csrc/vf_math.h and the math of csrc/latent.cpp / csrc/likelihood.cpp
line for line, so that both backends compute the same formulas (see those files
for the derivations)."""
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG_2PI = tl.constexpr(1.8378770664093453)


@triton.jit
def log1p_nonneg(t):
    """log1p(t) for t >= 0 from one log (Goldberg: divide the rounding of 1 + t back out)."""
    u = 1.0 + t
    exact = u == 1.0
    den = tl.where(exact, 1.0, u - 1.0)
    return tl.where(exact, t, tl.log(u) * (t / den))


@triton.jit
def philox_normal(seed, index):
    """Element ``index`` of the noise stream ``seed``: tl.randn4x(seed, index // 4)[index % 4],
    the same stream as csrc/vf_math.h's philox_normal_block (one Philox call per 4 normals there)."""
    n0, n1, n2, n3 = tl.randn4x(seed, index >> 2)
    lane = index & 3
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit
def philox_normal_aligned(seed, first, BLOCK: tl.constexpr):
    """The stream's elements first .. first + BLOCK - 1 for ``first % 4 == 0``: one randn4x
    per group of four (a quarter of the Philox work of :func:`philox_normal`), interleaved
    back into stream order with join/reshape."""
    groups = (first >> 2) + tl.arange(0, BLOCK // 4).to(tl.int64)
    n0, n1, n2, n3 = tl.randn4x(seed, groups)
    # join(join(n0, n2), join(n1, n3))[g, i, j] = n_{2i + j}: flattening gives n0 n1 n2 n3 per group
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])


@triton.jit
def scale_terms(s, PARAM: tl.constexpr):
    """(sigma, log sigma^2, d sigma/ds, d logvar/ds) for PARAM 0 = logvar, 1 = logstd, 2 = softplus."""
    if PARAM == 0:
        sigma = tl.exp(0.5 * s)
        return sigma, s, 0.5 * sigma, s * 0.0 + 1.0
    elif PARAM == 1:
        sigma = tl.exp(s)
        return sigma, 2.0 * s, sigma, s * 0.0 + 2.0
    else:
        y = tl.exp(-tl.abs(s))
        log1p_y = log1p_nonneg(y)
        sigma = tl.maximum(s, 0.0) + log1p_y
        # for s < 0: softplus(s) = y q with q = log1p(y) / y -> 1 as y underflows
        q = tl.where(y == 0.0, 1.0, log1p_y / tl.where(y == 0.0, 1.0, y))
        negative = s < 0.0
        logvar = 2.0 * tl.where(negative, s + tl.log(q), tl.log(tl.where(negative, 1.0, sigma)))
        inv_one_plus_y = 1.0 / (1.0 + y)
        dsigma = tl.where(negative, y * inv_one_plus_y, inv_one_plus_y)
        dlogvar = tl.where(negative, 2.0 * inv_one_plus_y / q, 2.0 * inv_one_plus_y / tl.where(negative, 1.0, sigma))
        return sigma, logvar, dsigma, dlogvar


@triton.jit
def continuous_bernoulli_log_norm(l, t):
    """(log C(l), d log C / dl), C(l) = l / tanh(l/2); series in u = l^2 for |l| < 1
    (coefficients c_n = 2 (2^(2n-1) - 1) B_2n / (2n (2n)!); 16 terms reach fp64 rounding;
    fp32 evaluates the same polynomial, its last terms below fp32 rounding, at no cost that
    matters in a memory-bound kernel)."""
    a = tl.abs(l)
    u = l * l
    series = u * 0 + -7.71052751052577917755e-18
    dseries = u * 0 + -1.23368440168412466841e-16
    series = series * u + 8.11731799460810656146e-17
    dseries = dseries * u + 1.21759769919121598422e-15
    series = series * u + -8.58371969794191344226e-16
    dseries = dseries * u + -1.20172075771186788192e-14
    series = series * u + 9.12346795895855629582e-15
    dseries = dseries * u + 1.18605083466461231846e-13
    series = series * u + -9.75487667872164449863e-14
    dseries = dseries * u + -1.17058520144659733984e-12
    series = series * u + 1.05029189004531669891e-12
    dseries = dseries * u + 1.1553210790498483688e-11
    series = series * u + -1.14025538536091058523e-11
    dseries = dseries * u + -1.14025538536091058523e-10
    series = series * u + 1.25042637753154818318e-10
    dseries = dseries * u + 1.12538373977839336487e-9
    series = series * u + -1.38837067837002590997e-9
    dseries = dseries * u + -1.11069654269602072797e-8
    series = series * u + 1.56594795318340291885e-8
    dseries = dseries * u + 1.0961635672283820432e-7
    series = series * u + -1.80278953564888309156e-7
    dseries = dseries * u + -1.08167372138932985494e-6
    series = series * u + 2.13360456416011971568e-6
    dseries = dseries * u + 1.06680228208005985784e-5
    series = series * u + -2.62483465608465608466e-5
    dseries = dseries * u + -1.04993386243386243386e-4
    series = series * u + 3.41710758377425044092e-4
    dseries = dseries * u + 1.02513227513227513228e-3
    series = series * u + -4.86111111111111111111e-3
    dseries = dseries * u + -9.72222222222222222222e-3
    series = series * u + 8.33333333333333333333e-2
    dseries = dseries * u + 8.33333333333333333333e-2
    use_series = a < 1.0
    a_c = tl.where(use_series, 1.0, a)
    t_c = tl.where(use_series, 0.5, t)
    closed = tl.log(a_c * ((1.0 + t_c) / (1.0 - t_c)))  # one log: the factor is in (1, 2.2]
    sign = tl.where(l < 0.0, -1.0, 1.0)
    dclosed = sign * (1.0 / a_c - 2.0 * t_c / (1.0 - t_c * t_c))
    log_c = tl.where(use_series, LN2 + u * series, closed)
    dlog_c = tl.where(use_series, 2.0 * l * dseries, dclosed)
    return log_c, dlog_c


@triton.jit
def expm1_nonpos(y):
    """e^y - 1 for y <= 0 (Kahan: divide the rounding of e^y back out; as csrc/vf_math.h)."""
    u = tl.exp(y)
    u_minus_1 = u - 1.0
    tiny = u == 1.0
    saturated = u_minus_1 == -1.0
    safe_log = tl.where(tiny | saturated, 1.0, tl.log(u))
    return tl.where(tiny, y, tl.where(saturated, -1.0, u_minus_1 * (y / safe_log)))


@triton.jit
def log_sigmoid_and_complement(y):
    """(log sigmoid(y), sigmoid(-y)) sharing t = e^-|y|."""
    t = tl.exp(-tl.abs(y))
    inv_one_plus_t = 1.0 / (1.0 + t)
    log_sig = tl.minimum(y, 0.0) - log1p_nonneg(t)
    return log_sig, tl.where(y >= 0.0, t * inv_one_plus_t, inv_one_plus_t)


@triton.jit
def tanh_via_expm1(y):
    em = expm1_nonpos(-2.0 * tl.abs(y))
    value = -em / (2.0 + em)
    return tl.where(y < 0.0, -value, value)
