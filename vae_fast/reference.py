"""The oracle: textbook formulas in plain PyTorch, meant to be read and evaluated in float64.

Every fused kernel in vae_fast is tested against these functions evaluated in
float64, and these functions are themselves tested against independent
high-precision values (mpmath) in ``tests/test_reference.py``. Readability wins
over speed here; numerically fragile spots use the textbook's own stable
identities (log-sigmoid, log-sum-exp) and say so.

Shapes: ``mu``, ``scale`` are ``(..., Z)``; likelihood parameters are the
decoder output, ``(*batch, *event)``, and results are summed over ``event``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALE_PARAMS = ("logvar", "logstd", "softplus")

# --------------------------------------------------------------------------------------
# Gaussian posterior parameterisations
# --------------------------------------------------------------------------------------


def std_from_scale(scale: torch.Tensor, param: str = "logvar") -> torch.Tensor:
    """sigma from the encoder's raw scale output.

    ``logvar``: sigma = exp(s / 2);  ``logstd``: sigma = exp(s);  ``softplus``: sigma = log(1 + e^s).
    """
    if param == "logvar":
        return torch.exp(0.5 * scale)
    if param == "logstd":
        return torch.exp(scale)
    if param == "softplus":
        return F.softplus(scale)
    raise ValueError(f"param must be one of {SCALE_PARAMS}, got {param!r}")


def logvar_from_scale(scale: torch.Tensor, param: str = "logvar") -> torch.Tensor:
    """log sigma^2 from the encoder's raw scale output (see :func:`std_from_scale`)."""
    if param == "logvar":
        return scale
    if param == "logstd":
        return 2.0 * scale
    return 2.0 * torch.log(std_from_scale(scale, param))


def gaussian_kl(
    mu: torch.Tensor,
    scale: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    param: str = "logvar",
    reduce: bool = True,
) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(prior_mu, exp(prior_logvar))) for diagonal Gaussians.

    Per dim: 1/2 [plv - lv + (sigma^2 + (mu - pmu)^2) / exp(plv) - 1]; the prior
    defaults to N(0, I). ``reduce=True`` sums over the last dim.
    """
    logvar = logvar_from_scale(scale, param)
    prior_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu
    prior_logvar = torch.zeros_like(mu) if prior_logvar is None else prior_logvar
    kl = 0.5 * (prior_logvar - logvar + (torch.exp(logvar) + (mu - prior_mu) ** 2) / torch.exp(prior_logvar) - 1.0)
    return kl.sum(-1) if reduce else kl


def reparameterize(mu: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor, param: str = "logvar") -> torch.Tensor:
    """z = mu + sigma * eps (eps broadcasts with leading sample dims)."""
    return mu + std_from_scale(scale, param) * eps


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) summed over the last dim."""
    return (-0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 / torch.exp(logvar))).sum(-1)


# --------------------------------------------------------------------------------------
# Philox-4x32-10 noise, identical to Triton's tl.randn4x(seed, offset)
# --------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a * b < 2^64 may wrap in int64, but wrapping keeps the low 64 bits exact.
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int], rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 (Salmon et al., SC'11) on int64 tensors holding uint32 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_randn(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normal draw number ``index`` of the stream ``seed``: tl.randn4x(seed, index // 4)[index % 4].

    Philox key = (seed_lo, seed_hi), counter = (g_lo, g_hi, 0, 0) with g = index // 4; each
    output word w becomes u = int32(w) * 4.6566127342e-10 (negatives mirrored, formed in
    float32 as Triton does); Box-Muller on (u0, u1) and (u2, u3) gives
    (r cos theta, r sin theta) with r = sqrt(-2 log max(u, 1e-7)), theta = 2 pi u'.
    The transform is evaluated in float64.
    """
    index = index.to(torch.int64)
    group, lane = index >> 2, index & 3
    counter = (group & _MASK32, (group >> 32) & _MASK32, torch.zeros_like(group), torch.zeros_like(group))
    words = philox4x32(counter, (seed & _MASK32, (seed >> 32) & _MASK32))

    def to_uniform(word: torch.Tensor) -> torch.Tensor:
        signed = torch.where(word >= 2**31, word - 2**32, word)
        signed = torch.where(signed < 0, -signed - 1, signed)
        return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=word.device)

    u0, u1, u2, u3 = (to_uniform(w) for w in words)
    # the first uniform of each pair sets the radius, the second the angle (angle formed in fp32 like Triton)
    radius_u = torch.where(lane < 2, u0, u2).double().clamp(min=float(torch.tensor(1.0e-7, dtype=torch.float32, device="cpu")))
    angle = (torch.where(lane < 2, u1, u3) * torch.tensor(6.283185307179586, dtype=torch.float32, device=u1.device)).double()
    radius = torch.sqrt(-2.0 * torch.log(radius_u))
    return torch.where(lane % 2 == 0, radius * torch.cos(angle), radius * torch.sin(angle))


def latent_noise(seed: int, num_samples: int, batch: int, dim: int) -> torch.Tensor:
    """The eps tensor ``(num_samples, batch, dim)`` the fused latent kernels draw for ``seed``
    (element (k, b, j) uses counter k*batch*dim + b*dim + j)."""
    index = torch.arange(num_samples * batch * dim, dtype=torch.int64, device="cpu")
    return philox_randn(seed, index).reshape(num_samples, batch, dim)


# --------------------------------------------------------------------------------------
# Reconstruction log-likelihoods: summed over every dim after the first `batch_dims`
# --------------------------------------------------------------------------------------


def _sum_event(values: torch.Tensor, batch_dims: int) -> torch.Tensor:
    if values.dim() == batch_dims:
        return values
    return values.flatten(batch_dims).sum(-1)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    """sum x log sigmoid(l) + (1 - x) log sigmoid(-l)  (x may be grey values in [0, 1])."""
    return _sum_event(x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits), batch_dims)


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda), lambda = sigmoid(l): C = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) = l / tanh(l / 2)
    (C = 2 at l = 0, the limit)."""
    safe = torch.where(logits == 0, torch.ones_like(logits), logits)
    return torch.where(logits == 0, torch.full_like(logits, math.log(2.0)), torch.log(safe / torch.tanh(safe / 2)))


def continuous_bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019): Bernoulli term + log C(lambda)."""
    per_pixel = x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits) + continuous_bernoulli_log_norm(logits)
    return _sum_event(per_pixel, batch_dims)


def gaussian_log_prob(mean: torch.Tensor, x: torch.Tensor, logvar=0.0, batch_dims: int = 1) -> torch.Tensor:
    """sum -1/2 [log 2 pi + lv + (x - mean)^2 / exp(lv)]."""
    logvar = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)
    per_pixel = -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 / torch.exp(logvar))
    return _sum_event(per_pixel.expand(torch.broadcast_shapes(mean.shape, x.shape)), batch_dims)


def mean_squared_error_log_prob(mean: torch.Tensor, x: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    """-1/D sum (x - mean)^2 over the D event elements (0 for an empty event): minus the per-example MSE."""
    per_pixel = -((x - mean) ** 2).expand(torch.broadcast_shapes(mean.shape, x.shape))
    return _sum_event(per_pixel, batch_dims) / max(math.prod(per_pixel.shape[batch_dims:]), 1)


def laplace_log_prob(mean: torch.Tensor, x: torch.Tensor, log_scale=0.0, batch_dims: int = 1) -> torch.Tensor:
    """sum -[log 2b + |x - mean| / b], b = exp(log_scale)."""
    log_scale = torch.as_tensor(log_scale, dtype=mean.dtype, device=mean.device)
    per_pixel = -(math.log(2.0) + log_scale + (x - mean).abs() / torch.exp(log_scale))
    return _sum_event(per_pixel.expand(torch.broadcast_shapes(mean.shape, x.shape)), batch_dims)


def categorical_log_prob(logits: torch.Tensor, x: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    """sum log softmax(logits)[x] over pixels; logits (..., C), integer x (...)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    x = x.expand(logits.shape[:-1])
    return _sum_event(torch.gather(log_probs, -1, x.unsqueeze(-1).long()).squeeze(-1), batch_dims)


def log_sigmoid_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(a) - sigmoid(b)) for a > b without cancellation:
    sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b - a))."""
    return F.logsigmoid(a) + F.logsigmoid(-b) + torch.log(-torch.expm1(b - a))


def discretized_logistic_mixture_log_prob(
    x: torch.Tensor,
    logit_probs: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    coeffs: torch.Tensor | None = None,
    num_bits: int = 8,
    log_scale_min: float = -7.0,
) -> torch.Tensor:
    """Discretised mixture of logistics (PixelCNN++, Salimans et al. 2017), per example ``(B,)``.

    x ``(B, C, H, W)`` in [-1, 1]; logit_probs ``(B, M, H, W)``; means, log_scales, coeffs
    ``(B, C, M, H, W)``. For C = 3, channel means depend on earlier channels:
    m_g += c0 x_r, m_b += c1 x_r + c2 x_g (coeffs as given, e.g. already tanh-squashed).
    log_scales are clamped below at ``log_scale_min`` as in PixelCNN++. Bin half-width
    1 / (2^bits - 1); the edge bins extend to -inf / +inf. The bin mass is computed exactly
    (:func:`log_sigmoid_difference`), with no pdf fallback in the tails.
    """
    x = x.unsqueeze(2)  # (B, C, 1, H, W)
    means = means
    if coeffs is not None and means.shape[1] == 3:
        m_r = means[:, 0:1]
        m_g = means[:, 1:2] + coeffs[:, 0:1] * x[:, 0:1]
        m_b = means[:, 2:3] + coeffs[:, 1:2] * x[:, 0:1] + coeffs[:, 2:3] * x[:, 1:2]
        means = torch.cat([m_r, m_g, m_b], dim=1)
    log_scales = torch.clamp(log_scales, min=log_scale_min)
    inv_s = torch.exp(-log_scales)
    half_bin = 1.0 / (2**num_bits - 1)
    plus = inv_s * (x - means + half_bin)
    minus = inv_s * (x - means - half_bin)
    lowest = x < -1 + half_bin  # first bin: (-inf, -1 + half_bin]
    highest = x > 1 - half_bin  # last bin: [1 - half_bin, inf)
    safe_plus = torch.where(lowest | highest, minus + 1.0, plus)  # keep the unused branch finite
    log_mass = torch.where(
        lowest, F.logsigmoid(plus), torch.where(highest, F.logsigmoid(-minus), log_sigmoid_difference(safe_plus, minus))
    )
    log_mix = torch.log_softmax(logit_probs, dim=1) + log_mass.sum(1)  # (B, M, H, W)
    return torch.logsumexp(log_mix, dim=1).flatten(1).sum(-1)


# --------------------------------------------------------------------------------------
# Importance-weighted bound
# --------------------------------------------------------------------------------------


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K) sum_k exp(v_k), max-shifted."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def iwae_bound(log_px_given_z: torch.Tensor, log_pz: torch.Tensor, log_qz: torch.Tensor) -> torch.Tensor:
    """IWAE-K bound (Burda et al., 2016): log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x); inputs ``(K, B)``."""
    return log_mean_exp(log_px_given_z + log_pz - log_qz, dim=0)
