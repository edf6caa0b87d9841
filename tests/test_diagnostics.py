"""IWAE bound and posterior diagnostics on models whose answers are known in closed form."""
import math

import pytest
import torch

import vae_fast
from vae_fast import diagnostics


def ppca(seed=0, data_dim=6, latent=3, sigma2=0.3, batch=7):
    """Probabilistic PCA with orthogonal-column W: the exact posterior is a diagonal Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(data_dim, latent, generator=gen, dtype=torch.float64))
    weight = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)[:latent]
    bias = torch.randn(data_dim, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, data_dim, generator=gen, dtype=torch.float64) * 2
    m = weight.T @ weight + sigma2 * torch.eye(latent, dtype=torch.float64)  # diagonal
    post_mu = torch.linalg.solve(m, weight.T @ (x - bias).T).T
    post_logvar = torch.log(sigma2 / torch.diagonal(m)).expand(batch, latent).clone()
    cov = weight @ weight.T + sigma2 * torch.eye(data_dim, dtype=torch.float64)
    log_px = torch.distributions.MultivariateNormal(bias, cov).log_prob(x)
    log_sigma2 = torch.tensor(math.log(sigma2), dtype=torch.float64)
    decode = lambda z: (z @ weight.T + bias, log_sigma2)  # noqa: E731
    return x, post_mu, post_logvar, decode, log_px


@pytest.mark.parametrize("k", [1, 7, 100])
def test_iwae_with_the_exact_posterior_equals_log_px_for_any_k(k):
    x, mu, lv, decode, log_px = ppca()
    bound = vae_fast.iwae_bound(x, mu, lv, decode, k=k, likelihood="gaussian", chunk_size=30,
                                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bound, log_px, rtol=0, atol=1e-8)
    # the ELBO here uses the analytic KL, exact only in expectation over z: many samples
    gap = diagnostics.posterior_gap(x, mu, lv, decode, k=k, likelihood="gaussian", num_elbo_samples=4000,
                                    generator=torch.Generator().manual_seed(2))
    assert gap.abs().max().item() < 0.05


def test_iwae_with_a_wrong_posterior_rises_toward_log_px():
    x, mu, lv, decode, log_px = ppca(batch=200)
    wrong_mu, wrong_lv = mu + 0.4, lv + 0.7
    bounds = [vae_fast.iwae_bound(x, wrong_mu, wrong_lv, decode, k=k, likelihood="gaussian", chunk_size=250,
                                  generator=torch.Generator().manual_seed(k)).mean().item() for k in (1, 10, 1000)]
    assert bounds[0] < bounds[1] < bounds[2]
    # a lower bound in expectation; the mean of 200 IWAE-1000 estimates has a few-thousandths std
    assert abs(log_px.mean().item() - bounds[2]) < 0.02
    assert log_px.mean().item() - bounds[0] > 0.1  # the ELBO's gap that IWAE closes


def test_one_dimensional_toy_with_the_prior_as_q():
    # p(z) = N(0, 1), p(x|z) = N(z, 1), x = 1: log p(x) = log N(1; 0, 2); ELBO with q = p(z)
    # 16 copies of x: the mean of 16 independent IWAE-5000 estimates (one has a 0.0085-nat std)
    x = torch.ones(16, 1, dtype=torch.float64)
    mu = torch.zeros(16, 1, dtype=torch.float64)
    lv = torch.zeros(16, 1, dtype=torch.float64)
    decode = lambda z: z  # noqa: E731
    log_px = -1.5155121234846454
    assert math.log(1 / math.sqrt(4 * math.pi)) - 1 / 4 == pytest.approx(log_px, abs=1e-15)
    elbo = vae_fast.elbo(x, mu, lv, decode, likelihood="gaussian", num_samples=20000, reduction="none",
                         generator=torch.Generator().manual_seed(0)).elbo.mean().item()
    assert elbo == pytest.approx(-1.9189385332046727, abs=0.03)  # E_q[log p(x|z)]: -log sqrt(2 pi) - 1
    bound = vae_fast.iwae_bound(x, mu, lv, decode, k=5000, likelihood="gaussian",
                                generator=torch.Generator().manual_seed(2)).mean().item()
    assert abs(bound - log_px) < 0.01


def test_mutual_information_and_aggregate_kl_of_a_known_posterior():
    # x ~ N(0, 2), q(z|x) = N(x/2, 1/2) (the exact posterior of the toy model): I(x; z) = ln(2)/2,
    # the aggregate posterior is N(0, 1) = p(z), so KL(q(z) || p(z)) = 0
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4000, 1, generator=gen, dtype=torch.float64) * math.sqrt(2)
    mu, lv = x / 2, torch.full_like(x, math.log(0.5))
    mi = diagnostics.mutual_information(mu, lv, samples=2, generator=gen).item()
    assert mi == pytest.approx(0.5 * math.log(2), abs=0.03)
    agg = diagnostics.aggregate_kl(mu, lv, samples=2, generator=gen).item()
    assert abs(agg) < 0.03
    # ELBO surgery: E_x KL(q(z|x) || p(z)) = I(x; z) + KL(q(z) || p(z))
    assert diagnostics.kl_per_dim(mu, lv).sum().item() == pytest.approx(mi + agg, abs=0.05)


def test_active_units_and_kl_per_dim():
    gen = torch.Generator().manual_seed(4)
    mu = torch.randn(100, 5, generator=gen)
    mu[:, [0, 2, 4]] = 0.3  # three dims ignore x
    assert diagnostics.active_units(mu) == 2
    lv = torch.zeros(100, 5)
    expected = 0.5 * (mu ** 2).mean(0)
    torch.testing.assert_close(diagnostics.kl_per_dim(mu, lv), expected)


def test_bad_arguments():
    x, mu, lv, decode, _ = ppca()
    with pytest.raises(ValueError, match="k must be >= 1"):
        vae_fast.iwae_bound(x, mu, lv, decode, k=0, likelihood="gaussian")
    with pytest.raises(ValueError, match="chunk_size"):
        vae_fast.iwae_bound(x, mu, lv, decode, k=3, likelihood="gaussian", chunk_size=0)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        vae_fast.iwae_bound(x, mu, lv, decode, k=3, likelihood="poisson")
    with pytest.raises(ValueError, match="threshold"):
        diagnostics.active_units(mu, threshold=-1.0)
    with pytest.raises(ValueError, match="mu must hold at least 2 examples"):  # (a variance of one: NaN, 0 units)
        diagnostics.active_units(mu[:1])
    for estimator in (diagnostics.mutual_information, diagnostics.aggregate_kl):
        with pytest.raises(ValueError, match=r"mu must have shape \(N, Z\) or \(N, C, H, W\) with N >= 1"):
            estimator(mu[:0], lv[:0])
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            estimator(mu, lv, chunk_size=0)
        with pytest.raises(ValueError, match="logvar must have mu's shape"):
            estimator(mu, lv[:, :1])


def test_diagnostics_of_a_conv_latent_are_those_of_its_flattened_vector():
    # (they took the last dim for the latent: a silently wrong aggregate KL, and a RuntimeError from the MI)
    gen = torch.Generator().manual_seed(6)
    mu, lv = torch.randn(8, 2, 3, 3, generator=gen), 0.3 * torch.randn(8, 2, 3, 3, generator=gen)
    for estimator in (diagnostics.mutual_information, diagnostics.aggregate_kl):
        conv = estimator(mu, lv, samples=2, generator=torch.Generator().manual_seed(1))
        flat = estimator(mu.flatten(1), lv.flatten(1), samples=2, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(conv, flat, rtol=0, atol=0)
    # the IWAE bound and the posterior gap over the latent's elements (iwae_bound raised a shape error)
    x = torch.rand(8, 18, generator=gen).round()
    weight = torch.randn(18, 18, generator=gen) / 4
    for fn in (lambda *a, **kw: vae_fast.iwae_bound(*a, k=5, chunk_size=2, **kw),
               lambda *a, **kw: diagnostics.posterior_gap(*a, k=5, **kw)):
        conv = fn(x, mu, lv, lambda z: z.flatten(-3) @ weight, generator=torch.Generator().manual_seed(2))
        flat = fn(x, mu.flatten(1), lv.flatten(1), lambda z: z @ weight, generator=torch.Generator().manual_seed(2))
        assert conv.shape == (8,)
        torch.testing.assert_close(conv, flat)


# ------------------------------------------------------------------ IWAE training objectives


def iwae_setup(seed=5, samples=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 6, generator=gen, dtype=torch.float64)
    mu = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    lv = torch.randn(3, 2, generator=gen, dtype=torch.float64) * 0.5
    weight = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    eps = torch.randn(samples, 3, 2, generator=gen, dtype=torch.float64)
    return x, mu, lv, weight, eps


def reference_log_weights(x, mu, lv, weight, eps, stop_q=False):
    from vae_fast import reference as ref

    z = ref.reparameterize(mu, lv, eps)
    log_lik = ref.continuous_bernoulli_log_prob(z @ weight, x, batch_dims=2)
    q_mu, q_lv = (mu.detach(), lv.detach()) if stop_q else (mu, lv)
    return log_lik + ref.gaussian_log_density(z, torch.zeros_like(mu), torch.zeros_like(lv)) - \
        ref.gaussian_log_density(z, q_mu, q_lv), z


def test_iwae_objective_value_and_gradients_match_the_reference():
    from vae_fast import reference as ref

    x, mu, lv, weight, eps = iwae_setup()
    leaves = [t.clone().requires_grad_() for t in (mu, lv, weight)]
    out = vae_fast.elbo(x, leaves[0], leaves[1], lambda z: z @ leaves[2], likelihood="continuous_bernoulli",
                        eps=eps, num_samples=4, objective="iwae", reduction="sum")
    out.loss.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (mu, lv, weight)]
    log_w, _ = reference_log_weights(x, *ref_leaves, eps)
    expected = -ref.log_mean_exp(log_w, 0).sum()
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-10)


def test_dreg_gradients_weight_each_samples_path_by_its_squared_weight():
    x, mu, lv, weight, eps = iwae_setup(seed=6)
    leaves = [t.clone().requires_grad_() for t in (mu, lv, weight)]
    out = vae_fast.elbo(x, leaves[0], leaves[1], lambda z: z @ leaves[2], likelihood="continuous_bernoulli",
                        eps=eps, num_samples=4, objective="iwae_dreg", reduction="sum")
    out.loss.backward()
    # reference: d log w_k / d z_k with q's parameters held fixed, weighted by w~_k^2, chained through z_k
    ref_mu, ref_lv = mu.clone().requires_grad_(), lv.clone().requires_grad_()
    log_w, z = reference_log_weights(x, ref_mu, ref_lv, weight, eps, stop_q=True)
    w_norm = torch.softmax(log_w.detach(), dim=0)
    surrogate = -(w_norm.pow(2) * log_w).sum()
    surrogate.backward()
    torch.testing.assert_close(leaves[0].grad, ref_mu.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(leaves[1].grad, ref_lv.grad, rtol=1e-9, atol=1e-10)
    # the decoder gets the ordinary IWAE gradient
    iwae_weight = weight.clone().requires_grad_()
    vae_fast.elbo(x, mu, lv, lambda z: z @ iwae_weight, likelihood="continuous_bernoulli", eps=eps, num_samples=4,
                  objective="iwae", reduction="sum").loss.backward()
    torch.testing.assert_close(leaves[2].grad, iwae_weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, vae_fast.elbo(x, mu, lv, lambda z: z @ weight, likelihood="continuous_bernoulli",
                                                       eps=eps, num_samples=4, objective="iwae", reduction="sum").loss)


def test_dreg_with_a_conv_latent_half_precision_and_torch_compile():
    # the weights the gradient hook applies are (K, B, 1, ...) against z: a conv latent (K, B, C, H, W) raised a
    # shape error in backward (or, had its dims lined up, broadcast silently wrong); a bfloat16 latent's hook changed
    # the gradient's dtype (RuntimeError); torch.compile(fullgraph=True) failed tracing the hook's late-filled list
    x, mu, lv, weight, eps = iwae_setup(seed=7)
    batch, latent = mu.shape
    conv = (2, latent // 2, 1) if latent % 2 == 0 else (latent, 1, 1)

    def dreg(m, v, w, noise):
        return vae_fast.elbo(x, m, v, lambda z: z.flatten(-3) @ w if z.dim() > 3 else z @ w, eps=noise,
                             likelihood="continuous_bernoulli", num_samples=4, objective="iwae_dreg").loss

    flat = [t.clone().requires_grad_() for t in (mu, lv, weight)]
    want = torch.autograd.grad(dreg(*flat, eps), flat)
    as_conv = [t.clone().view(batch, *conv).requires_grad_() for t in (mu, lv)] + [weight.clone().requires_grad_()]
    got = torch.autograd.grad(dreg(*as_conv, eps.view(4, batch, *conv)), as_conv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-12, atol=1e-12)
    half = [t.detach().to(torch.bfloat16).requires_grad_() for t in (mu, lv)]
    grads = torch.autograd.grad(vae_fast.elbo(x.float(), *half, lambda z: z.float() @ weight.float(),
                                              eps=eps.to(torch.bfloat16), num_samples=4, objective="iwae_dreg").loss,
                                half)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    compiled = torch.compile(dreg, fullgraph=True)
    for _ in range(2):  # (the second call reuses the compiled graph: the weights are filled afresh)
        got = torch.autograd.grad(compiled(*flat, eps), flat)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_objective_arguments():
    x, mu, lv, weight, _ = iwae_setup()
    with pytest.raises(ValueError, match="objective must be one of"):
        vae_fast.elbo(x, mu, lv, lambda z: z @ weight, objective="vimco")
    with pytest.raises(ValueError, match="beta and free_bits apply to objective='elbo' only"):
        vae_fast.elbo(x, mu, lv, lambda z: z @ weight, objective="iwae", num_samples=3, beta=0.5)


def test_trained_amortised_encoder_finds_the_true_posterior_not_the_prior():
    """ELBO = log p(x) - KL(q(z|x) || p(z|x)): training q (a linear encoder, whose family holds the
    exact pPCA posterior) with the fused ELBO against a fixed decoder drives KL(q || p(z|x)) to ~0,
    while KL(q || p(z)) converges to its non-zero analytic value E_x KL(p(z|x) || p(z))."""
    from vae_fast import reference as ref

    torch.manual_seed(0)
    data_dim, latent, sigma2 = 6, 3, 0.3
    q, _ = torch.linalg.qr(torch.randn(data_dim, latent, dtype=torch.float64))
    weight = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    bias = torch.randn(data_dim, dtype=torch.float64)
    m = weight.T @ weight + sigma2 * torch.eye(latent, dtype=torch.float64)
    post_lv = torch.log(sigma2 / torch.diagonal(m))
    data = torch.randn(4096, latent, dtype=torch.float64) @ weight.T + bias + math.sqrt(sigma2) * torch.randn(
        4096, data_dim, dtype=torch.float64)
    post_mu = torch.linalg.solve(m, weight.T @ (data - bias).T).T
    encoder = torch.nn.Linear(data_dim, latent).double()
    encoder_lv = torch.nn.Parameter(torch.zeros(latent, dtype=torch.float64))
    steps = 2000
    opt = torch.optim.Adam([*encoder.parameters(), encoder_lv], lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-5)
    log_sigma2 = torch.tensor(math.log(sigma2), dtype=torch.float64)
    for _ in range(steps):
        x = data[torch.randint(0, data.shape[0], (512,))]
        mu = encoder(x)
        loss = vae_fast.elbo(x, mu, encoder_lv.expand_as(mu), lambda z: (z @ weight.T + bias, log_sigma2),
                             likelihood="gaussian", num_samples=4).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        mu, lv = encoder(data), encoder_lv.expand(data.shape[0], latent)
        kl_to_posterior = ref.gaussian_kl(mu, lv, post_mu, post_lv.expand_as(mu)).mean().item()
        kl_to_prior = ref.gaussian_kl(mu, lv).mean().item()
        kl_to_prior_exact = ref.gaussian_kl(post_mu, post_lv.expand_as(mu)).mean().item()
    assert kl_to_posterior < 1e-3
    assert kl_to_prior_exact > 1.0  # the posterior is far from the prior ...
    assert kl_to_prior == pytest.approx(kl_to_prior_exact, rel=1e-3)  # ... and q sits on the posterior
