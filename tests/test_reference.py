"""The oracle checked against independent high-precision values (mpmath, 50 digits),
closed forms and published test vectors — never against the formulas being tested."""
import math

import mpmath as mp
import pytest
import torch

from vae_fast import reference as ref

mp.mp.dps = 50


def mpf(t):
    return [mp.mpf(float(v)) for v in t.reshape(-1)]


def close(actual, expected, rtol=1e-13, atol=1e-13):
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64).reshape(actual.shape),
                               rtol=rtol, atol=atol)


# ------------------------------------------------------------------ Gaussian KL


def test_kl_closed_form_values():
    # KL(N(1, 1) || N(0, 1)) = 1/2; KL(N(0, e) || N(0, 1)) = (e - 1 - 1) / 2; KL(q || q) = 0
    one = torch.ones(1, 1, dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    assert ref.gaussian_kl(one, zero).item() == pytest.approx(0.5, abs=1e-15)
    assert ref.gaussian_kl(zero, one).item() == pytest.approx((math.e - 2) / 2, abs=1e-15)
    assert ref.gaussian_kl(one, one, one, one).item() == pytest.approx(0.0, abs=1e-15)
    # KL(N(0, 1) || N(2, 4)) = log 2 + (1 + 4) / 8 - 1/2
    expected = math.log(2) + 5 / 8 - 0.5
    assert ref.gaussian_kl(zero, zero, 2 * one, math.log(4) * one).item() == pytest.approx(expected, abs=1e-15)


def mp_kl(mu, lv, pm, plv):
    return mp.mpf(0.5) * (plv - lv + (mp.exp(lv) + (mu - pm) ** 2) / mp.exp(plv) - 1)


@pytest.mark.parametrize("param", ["logvar", "logstd", "softplus"])
def test_kl_against_mpmath_including_extremes(param):
    gen = torch.Generator().manual_seed(0)
    mu = torch.cat([torch.randn(20, generator=gen, dtype=torch.float64) * 3, torch.tensor([1e3, -1e3], dtype=torch.float64)])
    s = torch.cat([torch.randn(20, generator=gen, dtype=torch.float64) * 3, torch.tensor([-30.0, 30.0], dtype=torch.float64)])
    pm = torch.randn(22, generator=gen, dtype=torch.float64)
    plv = torch.randn(22, generator=gen, dtype=torch.float64)

    def mp_logvar(v):
        if param == "logvar":
            return v
        if param == "logstd":
            return 2 * v
        return 2 * mp.log(mp.log1p(mp.exp(v)))

    for prior in (False, True):
        expected = [
            mp_kl(m, mp_logvar(v), p if prior else mp.mpf(0), q if prior else mp.mpf(0))
            for m, v, p, q in zip(mpf(mu), mpf(s), mpf(pm), mpf(plv))
        ]
        got = ref.gaussian_kl(mu[:, None], s[:, None], pm[:, None] if prior else None, plv[:, None] if prior else None,
                              param=param)
        close(got, [float(e) for e in expected], rtol=1e-12, atol=1e-12)


def test_reparameterize_and_log_density():
    mu = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    s = torch.tensor([[math.log(4.0), 0.0]], dtype=torch.float64)
    eps = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    close(ref.reparameterize(mu, s, eps), [2.5, -3.0])
    z = torch.tensor([[0.3, 0.1]], dtype=torch.float64)
    expected = sum(float(mp.log(mp.npdf(zz, m, mp.sqrt(mp.exp(v))))) for zz, m, v in zip([0.3, 0.1], [0.5, -1.0], [math.log(4.0), 0.0]))
    close(ref.gaussian_log_density(z, mu, s), [expected])


# ------------------------------------------------------------------ Philox


def philox_python(counter, key, rounds=10):
    """Philox-4x32 with Python integers (independent of the torch version under test)."""
    m = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & m, p1 & m, ((p0 >> 32) ^ c3 ^ k1) & m, p0 & m
        k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
    return c0, c1, c2, c3


# Known-answer vectors of Random123 (kat_vectors, philox4x32_10).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert philox_python(counter, key) == expected
    words = ref.philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


def test_philox_randn_matches_box_muller_of_python_philox():
    seed = 0x1234_5678_9ABC_DEF0 & (2**62 - 1)
    index = torch.tensor([0, 1, 2, 3, 4, 2**33 + 5, 2**40 + 2], dtype=torch.int64)
    got = ref.philox_randn(seed, index)
    for i, value in zip(index.tolist(), got.tolist()):
        w = philox_python((( i >> 2) & 0xFFFFFFFF, (i >> 34) & 0xFFFFFFFF, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))

        def uniform(word):
            signed = word - 2**32 if word >= 2**31 else word
            signed = -signed - 1 if signed < 0 else signed
            return float(torch.tensor(signed, dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32))

        pair = (w[0], w[1]) if (i & 3) < 2 else (w[2], w[3])
        r = math.sqrt(-2 * math.log(max(uniform(pair[0]), float(torch.tensor(1e-7, dtype=torch.float32)))))
        theta = float(torch.tensor(uniform(pair[1]), dtype=torch.float32) * torch.tensor(6.283185307179586, dtype=torch.float32))
        expected = r * (math.cos(theta) if i % 2 == 0 else math.sin(theta))
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------ likelihoods


def mp_log_sigmoid(x):
    return -mp.log1p(mp.exp(-x))


def test_bernoulli_against_mpmath_extreme_logits():
    logits = torch.tensor([[-50.0, -3.0, -1e-8, 0.0, 2.5, 50.0, 1e4, -1e4]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0, 0.3, 1.0, 0.7, 0.0, 1.0, 0.0]], dtype=torch.float64)
    expected = sum(xx * mp_log_sigmoid(l) + (1 - xx) * mp_log_sigmoid(-l) for l, xx in zip(mpf(logits), mpf(x)))
    close(ref.bernoulli_log_prob(logits, x), [float(expected)], rtol=1e-14)


def mp_log_cb_norm(l):
    return mp.log(2) if l == 0 else mp.log(l / mp.tanh(l / 2))


def test_continuous_bernoulli_normaliser_against_mpmath_and_definition():
    logits = torch.tensor([0.0, 1e-12, -4e-7, 1e-3, 0.5, -0.999, 1.0, 3.0, -30.0, 50.0, 1e4], dtype=torch.float64)
    got = ref.continuous_bernoulli_log_norm(logits)
    close(got, [float(mp_log_cb_norm(l)) for l in mpf(logits)], rtol=1e-14, atol=1e-15)
    # and C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) in the lambda parameterisation
    for l in (0.3, -2.0, 7.0):
        lam = 1 / (1 + mp.exp(-l))
        c = 2 * mp.atanh(1 - 2 * lam) / (1 - 2 * lam)
        assert float(mp.log(c)) == pytest.approx(float(mp_log_cb_norm(mp.mpf(l))), rel=1e-14)


def test_continuous_bernoulli_log_prob_against_mpmath():
    logits = torch.tensor([[-50.0, -1e-7, 0.0, 1e-7, 2.0, 50.0]], dtype=torch.float64)
    x = torch.tensor([[0.2, 0.5, 1.0, 0.0, 0.9, 0.1]], dtype=torch.float64)
    expected = sum(xx * mp_log_sigmoid(l) + (1 - xx) * mp_log_sigmoid(-l) + mp_log_cb_norm(l)
                   for l, xx in zip(mpf(logits), mpf(x)))
    close(ref.continuous_bernoulli_log_prob(logits, x), [float(expected)], rtol=1e-14)


@pytest.mark.parametrize("logvar", [0.0, -30.0, 30.0, "tensor"])
def test_gaussian_against_mpmath(logvar):
    mean = torch.tensor([[0.1, -2.0, 3.0]], dtype=torch.float64)
    x = torch.tensor([[0.0, -1.5, 2.0]], dtype=torch.float64)
    lv = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64) if logvar == "tensor" else torch.tensor(logvar, dtype=torch.float64)
    lvs = mpf(lv.expand_as(mean))
    expected = sum(mp.log(mp.npdf(xx, m, mp.sqrt(mp.exp(v)))) for xx, m, v in zip(mpf(x), mpf(mean), lvs))
    close(ref.gaussian_log_prob(mean, x, lv), [float(expected)], rtol=1e-13)


def test_categorical_against_mpmath():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 256, generator=gen, dtype=torch.float64) * 10
    logits[0, 0, 7] = 1e4
    x = torch.randint(0, 256, (2, 3), generator=gen)
    got = ref.categorical_log_prob(logits, x)
    for b in range(2):
        total = mp.mpf(0)
        for p in range(3):
            row = mpf(logits[b, p])
            total += row[int(x[b, p])] - mp.log(mp.fsum(mp.exp(v) for v in row))
        assert got[b].item() == pytest.approx(float(total), rel=1e-13)


def mp_logistic_cdf(v):
    return 1 / (1 + mp.exp(-v))


def mp_dmol(x, logit_probs, means, log_scales, coeffs, bits=8, log_scale_min=-7.0):
    """Direct 50-digit evaluation, pixel by pixel."""
    bsz, channels, height, width = x.shape
    mixtures = logit_probs.shape[1]
    half = mp.mpf(1) / (2**bits - 1)
    totals = []
    for b in range(bsz):
        total = mp.mpf(0)
        for h in range(height):
            for w in range(width):
                weights = [mp.mpf(float(logit_probs[b, m, h, w])) for m in range(mixtures)]
                log_norm = mp.log(mp.fsum(mp.exp(v) for v in weights))
                terms = []
                for m in range(mixtures):
                    log_p = weights[m] - log_norm
                    xs = [mp.mpf(float(x[b, c, h, w])) for c in range(channels)]
                    for c in range(channels):
                        mean = mp.mpf(float(means[b, c, m, h, w]))
                        if coeffs is not None and channels == 3:
                            k = [mp.mpf(float(coeffs[b, j, m, h, w])) for j in range(3)]
                            mean += (0, k[0] * xs[0], k[1] * xs[0] + k[2] * xs[1])[c]
                        inv_s = mp.exp(-max(mp.mpf(float(log_scales[b, c, m, h, w])), mp.mpf(log_scale_min)))
                        upper = mp_logistic_cdf(inv_s * (xs[c] - mean + half)) if xs[c] < 1 - half else mp.mpf(1)
                        lower = mp_logistic_cdf(inv_s * (xs[c] - mean - half)) if xs[c] > -1 + half else mp.mpf(0)
                        log_p += mp.log(upper - lower)
                    terms.append(log_p)
                total += mp.log(mp.fsum(mp.exp(t) for t in terms))
        totals.append(total)
    return totals


@pytest.mark.parametrize("channels", [1, 3])
def test_discretized_logistic_mixture_against_mpmath(channels):
    gen = torch.Generator().manual_seed(2)
    bsz, mixtures, size = 2, 3, 2
    pixels = torch.randint(0, 256, (bsz, channels, size, size), generator=gen)
    pixels[0, :, 0, 0] = 0
    pixels[1, :, 1, 1] = 255
    x = (pixels.double() / 127.5 - 1)
    logit_probs = torch.randn(bsz, mixtures, size, size, generator=gen, dtype=torch.float64)
    means = torch.rand(bsz, channels, mixtures, size, size, generator=gen, dtype=torch.float64) * 2 - 1
    log_scales = torch.randn(bsz, channels, mixtures, size, size, generator=gen, dtype=torch.float64) - 3
    log_scales[0, 0, 0, 0, 1] = -9.0  # below the clamp
    coeffs = torch.tanh(torch.randn(bsz, channels, mixtures, size, size, generator=gen, dtype=torch.float64)) if channels == 3 else None
    got = ref.discretized_logistic_mixture_log_prob(x, logit_probs, means, log_scales, coeffs)
    expected = mp_dmol(x, logit_probs, means, log_scales, coeffs)
    close(got, [float(e) for e in expected], rtol=1e-12)


def test_discretized_logistic_far_tail_is_exact_not_the_pdf_fallback():
    # single logistic, mean 0.9, log-scale -7, pixel 64: the mass is tiny and PixelCNN++'s
    # fallback (log pdf - log 127.5) is about 2 nats off; the reference must be exact.
    x = torch.full((1, 1, 1, 1), 64 / 127.5 - 1, dtype=torch.float64)
    args = (torch.zeros(1, 1, 1, 1, dtype=torch.float64), torch.full((1, 1, 1, 1, 1), 0.9, dtype=torch.float64),
            torch.full((1, 1, 1, 1, 1), -7.0, dtype=torch.float64))
    got = ref.discretized_logistic_mixture_log_prob(x, *args)
    xm, half, inv_s = mp.mpf(64) / mp.mpf(127.5) - 1, mp.mpf(1) / 255, mp.exp(7)
    exact = mp.log(mp_logistic_cdf(inv_s * (xm - mp.mpf(0.9) + half)) - mp_logistic_cdf(inv_s * (xm - mp.mpf(0.9) - half)))
    close(got, [float(exact)], rtol=1e-12)
    centered = inv_s * (xm - mp.mpf(0.9))
    fallback = centered - 7 - 2 * mp.log1p(mp.exp(centered)) - mp.log(mp.mpf(127.5))
    assert abs(float(fallback - exact)) > 1.0


def test_log_mean_exp_and_iwae_bound():
    values = torch.tensor([[-1000.0, 0.0], [-1001.0, 1.0], [-1002.0, 2.0]], dtype=torch.float64)
    expected = [float(mp.log(mp.fsum(mp.exp(mp.mpf(v)) for v in col) / 3)) for col in values.T.tolist()]
    close(ref.log_mean_exp(values, 0), expected)
    ll, lpz, lqz = values, torch.zeros_like(values), torch.ones_like(values)
    close(ref.iwae_bound(ll, lpz, lqz), [e - 1 for e in expected])
